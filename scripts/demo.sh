#!/usr/bin/env bash
# scripts/demo.sh BUILD_DIR — the end-to-end demo the project has so far (`make demo` runs it):
# expand the real PaddleOCR PP-OCRv4 recognizer's weights (2.69 M parameters, fetched by
# scripts/fetch_models.sh) with the FP=xINT series expansion and print the error per term, then
# the character accuracy of the quantized network against FP and plain round-to-nearest.
set -euo pipefail
build="${1:-build}"
fpxint="$build/bin/fpxint"
[[ -x "$fpxint" ]] || { echo "demo: $fpxint not found; run make build" >&2; exit 1; }
models="$(scripts/fetch_models.sh)"
src="$models/ocr/ocr_rec.safetensors"
work="$(mktemp -d "${TMPDIR:-/tmp}/fpxint-demo.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "== fpxint demo: FP=xINT tensor expansion of a real pretrained network =="
echo "model: PaddleOCR PP-OCRv4 text recognizer ($src)"
echo "no calibration data, no fine-tuning: each term quantizes what the previous terms left"
echo
echo "-- fpxint expand --bits 4 --terms 4 --grid sym --scale channel"
"$fpxint" expand "$src" -o "$work/w4x4.safetensors" --bits 4 --terms 4 --grid sym --scale channel
echo
echo "-- the same weights under other settings (relative Frobenius error of all expanded weights)"
run() {  # label, then expand flags
  local label="$1"; shift
  "$fpxint" expand "$src" -o "$work/x.safetensors" --json -q "$@" > "$work/$label.json"
}
run w4_sym_channel --bits 4 --terms 4 --grid sym --scale channel
run w4_mid_group64 --bits 4 --terms 4 --grid mid --scale group --group-size 64
run w4_asym_channel --bits 4 --terms 4 --grid asym --scale channel
run w4_digits --bits 4 --terms 4 --grid mid --variant digits --scale channel
run w2_mid_channel --bits 2 --terms 4 --grid mid --scale channel
run w8_sym_channel --bits 8 --terms 2 --grid sym --scale channel
/usr/bin/python3 - "$work" <<'PY'
import json, sys, os
work = sys.argv[1]
rows = ["w4_sym_channel", "w4_mid_group64", "w4_asym_channel", "w4_digits", "w2_mid_channel",
        "w8_sym_channel"]
print(f"{'setting':18s} {'b':>2s}  " + "  ".join(f"{'K=' + str(k):>9s}" for k in range(1, 5))
      + "   size (K=max)")
for r in rows:
    rep = json.load(open(os.path.join(work, r + ".json")))
    errs = [f"{s['rel_fro']:9.2e}" for s in rep["summary"]] + [f"{'':9s}"] * (4 - len(rep["summary"]))
    print(f"{r:18s} {rep['spec']['bits']:2d}  " + "  ".join(errs)
          + f"   {rep['bytes_out'] / 2**20:5.2f} MB of {rep['bytes_in'] / 2**20:5.2f} MB")
print("\nK=1 is plain round-to-nearest at b bits; every further term divides the error by about")
print("2^b (mid, asym) or 2^b - 2 (sym).")
PY
echo
echo "-- the quantized network itself: reading 100 rendered text lines (fpxint-eval; the full"
echo "   sweep is make eval, docs/RESULTS.md). rtn4 = plain 4-bit round-to-nearest; w4xK = K"
echo "   4-bit weight terms; w4a4x2 = weights and activations, 2 terms of 4 bits each."
"$build/bin/fpxint-eval" ocr_rec --models-dir "$models" --limit 100 -c fp,rtn4,w4x2,w4x3,w4a4x2
