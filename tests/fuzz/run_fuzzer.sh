#!/usr/bin/env bash
# tests/fuzz/run_fuzzer.sh FUZZER SEEDS_DIR REGRESSIONS_DIR WORK_DIR
# Runs one libFuzzer target for $FPXINT_FUZZ_SECONDS (default 10; `make fuzz` runs longer) on a
# working corpus in WORK_DIR (seeded from SEEDS_DIR), after replaying every input of
# REGRESSIONS_DIR (crashes found earlier, kept as regression tests). A crash fails the run and
# leaves the input in WORK_DIR/crashes/ with the command to add it to the regressions.
set -euo pipefail
fuzzer="$1" seeds="$2" regressions="$3" work="$4"
name="$(basename "$fuzzer")"
seconds="${FPXINT_FUZZ_SECONDS:-10}"
mkdir -p "$work/corpus" "$work/crashes"
cp -n "$seeds"/* "$work/corpus/" 2>/dev/null || true
# The targets parse at the production limits; an input may not make them allocate more than
# 2 GiB at once (-malloc_limit_mb) or in all (-rss_limit_mb).
opts=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 -max_len=65536 -print_final_stats=1
      "-artifact_prefix=$work/crashes/")
if [[ -d $regressions ]] && compgen -G "$regressions/*" >/dev/null; then
  echo "$name: replaying $(ls "$regressions" | wc -l) regression input(s) from $regressions"
  "$fuzzer" "${opts[@]}" "$regressions"/*
fi
echo "$name: fuzzing for ${seconds}s (corpus $work/corpus: $(ls "$work/corpus" | wc -l) inputs)"
set +e
"$fuzzer" "${opts[@]}" -max_total_time="$seconds" "$work/corpus" 2> "$work/log.txt"
rc=$?
set -e
grep -E "^stat::|Done [0-9]+ runs|INFO: Loaded" "$work/log.txt" | sed "s/^/$name: /" || true
if [[ $rc -ne 0 ]]; then
  tail -n 60 "$work/log.txt"
  echo "$name: FAILED (exit $rc). Crash inputs: $(ls "$work/crashes")" >&2
  echo "$name: keep each as a regression: cp $work/crashes/* $regressions/ (then fix the bug)" >&2
  exit 1
fi
echo "$name: corpus now $(ls "$work/corpus" | wc -l) inputs; no crash"
