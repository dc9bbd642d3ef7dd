#!/usr/bin/env bash
# tests/e2e/test_demo.sh BUILD_DIR — runs the product demo (scripts/demo.sh) on a few lines and
# checks what it prints:
#   * the table has the four rows (FP32, W4x1, W4x2, W4A4x2), each on every requested line;
#   * FP32 reads the lines (>= 95 % characters), W4x2 and W4A4x2 are within 2 points of FP,
#     plain 4-bit RTN (W4x1) is at least 50 points below FP (docs/RESULTS.md: 0.00 % on all 320
#     lines, FP 99.95 %);
#   * the W4A4x2 job (variant D, mid grid) reports folded term products;
#   * the expansions are smaller than the FP model (W4x1 > 6x, W4x2 and W4A4x2 > 3x);
#   * the server stopped cleanly (exit 0 after SIGTERM) and no temporary file is left.
# Needs FPXINT_MODELS_DIR (the real models; the test never downloads). FPXINT_DEMO_LIMIT: lines
# (default 20). Fails (exit 1) with the demo's output when anything is missing or wrong.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO="$(cd "$HERE/../.." && pwd -P)"
build="${1:-${FPXINT_BUILD_DIR:-}}"
limit="${FPXINT_DEMO_LIMIT:-20}"

failures=0
out=""
fail() { echo "test_demo: FAIL: $*" >&2; failures=$((failures + 1)); }
fatal() {
  echo "test_demo: FAIL: $*" >&2
  [[ -n "$out" && -f "$out" ]] && { echo "--- demo output ---" >&2; cat "$out" >&2; }
  exit 1
}

[[ -n "$build" ]] || fatal "usage: tests/e2e/test_demo.sh BUILD_DIR (or FPXINT_BUILD_DIR)"
[[ -x "$build/bin/fpxint" && -x "$build/bin/fpxint-server" ]] ||
  fatal "$build/bin/fpxint or $build/bin/fpxint-server missing (build first)"
[[ -n "${FPXINT_MODELS_DIR:-}" ]] ||
  fatal "FPXINT_MODELS_DIR is not set (the models from scripts/fetch_models.sh; never downloaded here)"
for f in ocr_rec.pt ocr_eval.safetensors ocr_eval_labels.json ppocr_keys_v1.txt; do
  [[ -s "$FPXINT_MODELS_DIR/ocr/$f" ]] || fatal "missing model file $FPXINT_MODELS_DIR/ocr/$f"
done

# The demo's temporary files must all go: give it a TMPDIR of its own and check it stays empty.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/fpxint-test-demo.XXXXXX")"
out="$(mktemp "${TMPDIR:-/tmp}/fpxint-test-demo-out.XXXXXX")"
trap 'rm -rf "$tmp" "$out"' EXIT

t0=$SECONDS
rc=0
(cd "$REPO" && TMPDIR="$tmp" FPXINT_DEMO_LIMIT="$limit" scripts/demo.sh "$build") >"$out" 2>&1 || rc=$?
echo "test_demo: scripts/demo.sh exited $rc after $((SECONDS - t0)) s (FPXINT_DEMO_LIMIT=$limit)"
[[ $rc -eq 0 ]] || fatal "scripts/demo.sh exited with code $rc"

# -- the table ---------------------------------------------------------------------------------
# Row: MODEL ... SIZE_MB RATIOx PROBE CHAR_ACC OK/N P50 MEAN VSx (the last fields, counted from the
# end, so the model label may have spaces).
row() {  # row NAME -> "acc ok/n ratio p50 vs" of the row whose first field is NAME
  awk -v name="$1" '$1 == name && $NF ~ /x$/ { print $(NF-4), $(NF-3), $(NF-6), $(NF-2), $NF; exit }' "$out"
}
declare -A acc ratio
for m in ocr_rec ocr_rec_w4x1 ocr_rec_w4x2 ocr_rec_w4a4x2 ocr_rec_budget; do
  r="$(row "$m")"
  if [[ -z "$r" ]]; then
    fail "no table row for $m"
    continue
  fi
  read -r a ok rt p50 vs <<<"$r"
  echo "test_demo: $m: char acc $a %, lines $ok, size ${rt} smaller, p50 $p50 ms ($vs of FP)"
  [[ "$a" =~ ^-?[0-9]+\.[0-9]+$ ]] || fail "$m: char accuracy '$a' is not a number"
  [[ "$ok" =~ ^[0-9]+/([0-9]+)$ && "${BASH_REMATCH[1]}" == "$limit" ]] ||
    fail "$m: '$ok' lines: expected N/$limit (every requested line read)"
  acc[$m]="$a"
  ratio[$m]="${rt%x}"
done
grep -q 'ocr_rec (FP32)' "$out" || fail "the FP32 row is not labelled 'ocr_rec (FP32)'"
grep -q 'no calibration data, no fine-tuning' "$out" || fail "'no calibration data, no fine-tuning' not printed"
grep -q '^sample: line' "$out" || fail "no sample line printed"

cmp() {  # cmp "EXPR" MESSAGE: awk-evaluated condition on the numbers
  awk "BEGIN { exit !($1) }" || fail "$2"
}
if [[ ${#acc[@]} -eq 5 ]]; then
  fp="${acc[ocr_rec]}"
  cmp "$fp >= 95" "FP32 char accuracy $fp % < 95 %: the served FP model does not read the lines"
  cmp "${acc[ocr_rec_w4x2]} >= $fp - 2" "W4x2 ${acc[ocr_rec_w4x2]} % not within 2 points of FP $fp %"
  cmp "${acc[ocr_rec_w4a4x2]} >= $fp - 2" \
    "W4A4x2 ${acc[ocr_rec_w4a4x2]} % not within 2 points of FP $fp %"
  cmp "${acc[ocr_rec_w4x1]} <= $fp - 50" \
    "W4x1 (plain RTN) ${acc[ocr_rec_w4x1]} % is not at least 50 points below FP $fp %"
  cmp "${ratio[ocr_rec]} == 1" "FP32 size ratio ${ratio[ocr_rec]}x, expected 1.00x"
  cmp "${ratio[ocr_rec_w4x1]} > 6" "W4x1 only ${ratio[ocr_rec_w4x1]}x smaller than FP"
  cmp "${ratio[ocr_rec_w4x2]} > 3" "W4x2 only ${ratio[ocr_rec_w4x2]}x smaller than FP"
  cmp "${ratio[ocr_rec_w4a4x2]} > 3" "W4A4x2 only ${ratio[ocr_rec_w4a4x2]}x smaller than FP"
  # The error-budgeted job through the server: within 0.3 points of FP, still > 3x smaller.
  cmp "${acc[ocr_rec_budget]} >= $fp - 0.3" \
    "budget ${acc[ocr_rec_budget]} % not within 0.3 points of FP $fp %"
  cmp "${ratio[ocr_rec_budget]} > 3" "budget only ${ratio[ocr_rec_budget]}x smaller than FP"
fi
grep -q '^  error budget: target 1.000e-01, measured ' "$out" ||
  fail "the budget job's allocation (jobs get) was not shown"
# W4A4x2 is variant D on the mid grid both sides: its job report says the products fold.
grep -q 'W×A products: folded' "$out" || fail "the W4A4x2 job does not report folded term products"

# -- the CLI path and the steps ----------------------------------------------------------------
grep -q '^\$ fpxint infer ocr_rec_w4x2' "$out" || fail "fpxint infer was not shown"
grep -q '^decoded .*, 0 edits)$' "$out" || fail "the CLI inference of line 0 (W4x2) did not read it exactly"
for id in w4x1 w4x2 w4a4x2 budget; do
  grep -q "deployed for inference as ocr_rec_$id" "$out" || fail "job for ocr_rec_$id not shown deployed"
done

# -- clean stop, nothing left --------------------------------------------------------------------
grep -q '^server stopped cleanly: exit 0 after SIGTERM' "$out" ||
  fail "no 'server stopped cleanly: exit 0 after SIGTERM' line"
grep -q 'server log: .*shut down cleanly' "$out" || fail "the server log does not say 'shut down cleanly'"
work="$(sed -n 's/^temporary directory: //p' "$out" | head -n 1)"
if [[ -z "$work" ]]; then
  fail "the demo did not print its temporary directory"
else
  [[ "$work" == "$tmp"/* ]] || fail "temporary directory $work is not under TMPDIR=$tmp"
  [[ ! -e "$work" ]] || fail "temporary directory $work still exists"
  grep -q "^removed $work\$" "$out" || fail "no 'removed $work' line"
fi
left="$(find "$tmp" -mindepth 1 -maxdepth 1 | head -n 5)"
[[ -z "$left" ]] || fail "left behind in TMPDIR: $left"
if [[ -n "$work" && -f "$out" ]]; then
  port="$(sed -n 's/^server pid [0-9]* listening on \(127\.0\.0\.1:[0-9]*\).*/\1/p' "$out" | head -n 1)"
  pid="$(sed -n 's/^server pid \([0-9]*\) listening.*/\1/p' "$out" | head -n 1)"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
    [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == fpxint-server* ]]; then
    fail "fpxint-server (pid $pid, $port) is still running"
  fi
fi

if [[ $failures -ne 0 ]]; then
  echo "--- demo output ---" >&2
  cat "$out" >&2
  echo "test_demo: $failures check(s) failed" >&2
  exit 1
fi
echo "test_demo: OK"
