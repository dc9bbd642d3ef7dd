#!/usr/bin/env bash
# scripts/demo.sh BUILD_DIR — the end-to-end demo of the service (`make demo` runs it after
# `make build models`):
#
#   start fpxint-server on a free local port with a temporary data directory, upload the real
#   PaddleOCR PP-OCRv4 recognizer (TorchScript), serve it in FP32, quantize it at W4x1 (plain
#   4-bit round-to-nearest), W4x2, W4A4x2 and an error budget (--target-rel-error 0.1) with
#   LAYER jobs that deploy their results, read the rendered test lines through the Open
#   Inference Protocol endpoint (ModelInfer), print the table (model, b, K, size, character
#   accuracy, latency vs FP), stop the server with SIGTERM and remove everything.
#
# Environment:
#   FPXINT_DEMO_LIMIT   rendered lines to read per model (default 100, at most 320)
#   FPXINT_MODELS_DIR   use these models instead of scripts/fetch_models.sh (needs ocr/...)
#   TMPDIR              where the temporary directory goes (removed at the end, also on errors)
# Exit: 0 demo done and the server exited 0 on SIGTERM; 1 anything else (the message says what).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd -P)"
PY=/usr/bin/python3  # Debian's interpreter, with python3-numpy and python3-grpcio (setup.sh)
T0=$(date +%s.%N)

fail() { echo "demo: error: $*" >&2; exit 1; }
step_no=0
step_name="setup"
step() {
  step_no=$((step_no + 1))
  step_name="$*"
  printf '\n== %d. %s ==\n' "$step_no" "$*"
}
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
show() {  # show CMD...: print the command as a person would type it, then run it
  local shown=("$@")
  shown[0]="$(basename "$1")"
  echo "\$ ${shown[*]}"
  "$@"
}

build_arg="${1:-build}"
[[ -d "$build_arg" ]] || fail "build directory '$build_arg' not found (make build)"
build="$(cd "$build_arg" && pwd -P)"
FPXINT="$build/bin/fpxint"
SERVER="$build/bin/fpxint-server"
for b in "$FPXINT" "$SERVER"; do
  [[ -x "$b" ]] || fail "$b not found or not executable (make build)"
done
limit="${FPXINT_DEMO_LIMIT:-100}"
[[ "$limit" =~ ^[1-9][0-9]*$ ]] || fail "FPXINT_DEMO_LIMIT must be a positive integer, not '$limit'"
"$PY" -c 'import numpy, grpc, grpc_tools' 2>/dev/null ||
  fail "$PY cannot import numpy, grpc and grpc_tools (python3-numpy python3-grpcio" \
    "python3-grpc-tools; scripts/setup.sh installs them)"

# The demo's own server and client: no token file, no TLS, whatever the caller's environment says.
unset FPXINT_TOKEN FPXINT_TLS_CA FPXINT_CLIENT_TLS_CERT FPXINT_CLIENT_TLS_KEY \
  FPXINT_TOKEN_FILE FPXINT_TLS_CERT FPXINT_TLS_KEY FPXINT_TLS_CLIENT_CA \
  FPXINT_ALLOW_TORCHSCRIPT_UPLOADS FPXINT_MAX_UPLOAD_BYTES FPXINT_MAX_MESSAGE_BYTES \
  FPXINT_INFER_INSTANCES FPXINT_WORKERS FPXINT_QUEUE_LIMIT FPXINT_THREADS FPXINT_SERVER \
  FPXINT_TIMEOUT FPXINT_LISTEN FPXINT_DATA_DIR FPXINT_PORT_FILE FPXINT_SHUTDOWN_GRACE \
  FPXINT_METRICS_LISTEN FPXINT_METRICS_PORT_FILE

work=""
server_pid=""
server_rc=""
child_pid=""

run_wait() {  # run_wait CMD...: in the background + wait, so that SIGTERM/SIGINT reach the traps
  # at once (bash runs a trap only after a foreground child has finished)
  local rc=0
  "$@" &
  child_pid=$!
  wait "$child_pid" || rc=$?
  child_pid=""
  return "$rc"
}

stop_server() {  # SIGTERM, wait up to 30 s; sets server_rc; returns 0 only for a clean exit 0
  local pid="$server_pid" i t_stop
  [[ -n "$pid" ]] || return 0
  server_pid=""
  t_stop=$(date +%s.%N)
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    server_rc="killed"
    echo "demo: error: fpxint-server (pid $pid) did not exit within 30 s of SIGTERM; killed" >&2
    return 1
  fi
  server_rc=0
  wait "$pid" || server_rc=$?
  local dt
  dt=$(awk -v a="$t_stop" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  if [[ "$server_rc" != 0 ]]; then
    echo "demo: error: fpxint-server exited with code $server_rc after SIGTERM (expected 0)" >&2
    return 1
  fi
  echo "server stopped cleanly: exit 0 after SIGTERM (${dt} s)"
}

server_log_tail() {
  [[ -n "$work" && -f "$work/server.log" ]] || return 0
  echo "--- fpxint-server log (last 25 lines) ---" >&2
  tail -n 25 "$work/server.log" >&2
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [[ -n "$child_pid" ]]; then
    kill -TERM "$child_pid" 2>/dev/null
    wait "$child_pid" 2>/dev/null
  fi
  if [[ -n "$server_pid" ]]; then
    echo "demo: stopping fpxint-server (pid $server_pid)" >&2
    stop_server >&2 || rc=1
  fi
  if [[ $rc -ne 0 ]]; then
    echo "demo: FAILED in step $step_no ($step_name), exit $rc" >&2
    server_log_tail
  fi
  if [[ -n "$work" ]]; then
    rm -rf "$work"
    [[ -e "$work" ]] && { echo "demo: error: could not remove $work" >&2; rc=1; }
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "demo: interrupted" >&2; exit 130' INT
trap 'echo "demo: terminated" >&2; exit 143' TERM

echo "fpxint demo: the FP=xINT series expansion of a real network, end to end through the service"
echo "(upload -> quantize jobs -> deploy -> Open Inference Protocol), on the PaddleOCR PP-OCRv4"
echo "text recognizer (2.69 M parameters). No calibration data, no fine-tuning."

# ------------------------------------------------------------------------------------------------
step "the model and the test lines"
if [[ -n "${FPXINT_MODELS_DIR:-}" ]]; then
  models="$FPXINT_MODELS_DIR"
  echo "models: $models (FPXINT_MODELS_DIR)"
else
  echo "\$ scripts/fetch_models.sh --only ocr   (downloads and converts once, then cached)"
  models="$("$REPO/scripts/fetch_models.sh" --only ocr)" || fail "scripts/fetch_models.sh failed"
  echo "models: $models"
fi
ocr="$models/ocr"
for f in ocr_rec.pt ocr_eval.safetensors ocr_eval_labels.json ppocr_keys_v1.txt; do
  [[ -s "$ocr/$f" ]] || fail "missing $ocr/$f (run scripts/fetch_models.sh)"
done
echo "recognizer: $ocr/ocr_rec.pt (TorchScript, input x FP32 [N,3,48,320])"
echo "test lines: $ocr/ocr_eval.safetensors (Brown-corpus lines rendered with DejaVu fonts)"

# ------------------------------------------------------------------------------------------------
step "start fpxint-server on a free local port with a temporary data directory"
work="$(mktemp -d "${TMPDIR:-/tmp}/fpxint-demo.XXXXXX")"
echo "temporary directory: $work"
server_args=(--listen 127.0.0.1:0 --port-file "$work/port" --data-dir "$work/data")
server_help="$("$SERVER" --help 2>&1)" || fail "$SERVER --help failed: $server_help"
if [[ "$server_help" == *--metrics-listen* ]]; then  # Prometheus metrics: local, any free port
  server_args+=(--metrics-listen 127.0.0.1:0)
  [[ "$server_help" == *--metrics-port-file* ]] && server_args+=(--metrics-port-file "$work/metrics")
fi
echo "\$ fpxint-server ${server_args[*]}"
"$SERVER" "${server_args[@]}" >"$work/server.log" 2>&1 </dev/null &
server_pid=$!
addr=""
for ((i = 0; i < 300; i++)); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    rc=0
    wait "$server_pid" || rc=$?
    server_pid=""
    fail "fpxint-server exited with code $rc before it was serving"
  fi
  if [[ -s "$work/port" ]]; then
    addr="$(head -n 1 "$work/port")"
    [[ "$addr" =~ ^127\.0\.0\.1:[0-9]+$ ]] && break
    addr=""
  fi
  sleep 0.1
done
[[ -n "$addr" ]] || fail "fpxint-server wrote no port file within 30 s"
export FPXINT_SERVER="$addr"
echo "server pid $server_pid listening on $addr (log: $work/server.log); FPXINT_SERVER=$addr"
show "$FPXINT" health --wait 30
if [[ -s "$work/metrics" ]]; then
  echo "Prometheus metrics: http://$(head -n 1 "$work/metrics")/metrics"
fi

# ------------------------------------------------------------------------------------------------
step "upload the FP32 TorchScript model and serve it as it is"
echo "\$ fpxint upload $ocr/ocr_rec.pt --name ocr_rec --input x:FP32:-1,3,48,320"
if ! "$FPXINT" --json upload "$ocr/ocr_rec.pt" --name ocr_rec --input x:FP32:-1,3,48,320 \
  >"$work/upload.json"; then
  cat "$work/upload.json" >&2 || true
  fail "fpxint upload failed"
fi
"$PY" - "$work/upload.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"uploaded {m['name']}  ({m['format'].lower()}, {int(m['size_bytes']) / 2**20:.1f} MB, "
      f"sha256 {m['sha256'][:16]}, verified by the server)")
PY
show "$FPXINT" models load ocr_rec
show "$FPXINT" models get ocr_rec

# ------------------------------------------------------------------------------------------------
step "quantize: four LAYER jobs, each deployed for inference"
echo "W4x1 = one 4-bit term (plain round-to-nearest), W4x2 = two 4-bit terms, W4A4x2 = two"
echo "4-bit terms for the weights and two for the activations (expanded from each input), both"
echo "variant D on the mid grid, so each layer's four term products fold into one 8-bit integer"
echo "product; budget = 1 to 3 4-bit terms per layer, chosen so the output error on a data-free"
echo "probe is <= 0.1."
quantize() {  # quantize LABEL FLAGS...: run the job, keep its --json document, show the job
  local label="$1"
  shift
  echo
  echo "\$ fpxint quantize --model ocr_rec --granularity layer $* --wait"
  if ! "$FPXINT" --json quantize --model ocr_rec --granularity layer "$@" --wait \
    >"$work/$label.json"; then
    cat "$work/$label.json" >&2 || true
    fail "fpxint quantize ($label) failed"
  fi
  local id
  id="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$work/$label.json")"
  show "$FPXINT" jobs get "$id"
}
quantize w4x1 --bits 4 --terms 1 --deploy-as ocr_rec_w4x1
quantize w4x2 --bits 4 --terms 2 --deploy-as ocr_rec_w4x2
quantize w4a4x2 --bits 4 --terms 2 --grid mid --variant digits --act-bits 4 --act-terms 2 \
  --act-grid mid --act-variant digits --deploy-as ocr_rec_w4a4x2
quantize budget --bits 4 --target-rel-error 0.1 --max-terms 3 --deploy-as ocr_rec_budget
echo
show "$FPXINT" models list

# ------------------------------------------------------------------------------------------------
step "one line through the CLI: fpxint infer (ModelInfer), any precision with --terms"
"$PY" "$SCRIPT_DIR/demo_oip.py" write-line --ocr-dir "$ocr" --line 0 "$work/line0.npy"
show "$FPXINT" infer ocr_rec_w4x2 -i "$work/line0.npy" -o "$work/line0.w4x2.npy" --max-values 4
"$PY" "$SCRIPT_DIR/demo_oip.py" decode --ocr-dir "$ocr" --line 0 "$work/line0.w4x2.npy"
echo "the same deployed W4x2 model with only its first term (K'=1, request parameter fpxint_terms):"
show "$FPXINT" infer ocr_rec_w4x2 -i "$work/line0.npy" --terms 1 -o "$work/line0.w4x2k1.npy" \
  --max-values 4
"$PY" "$SCRIPT_DIR/demo_oip.py" decode --ocr-dir "$ocr" --line 0 "$work/line0.w4x2k1.npy"

# ------------------------------------------------------------------------------------------------
step "read $limit rendered test lines through the OIP endpoint (scripts/demo_oip.py, grpcio)"
# TMPDIR: the Python client's generated stubs go into the demo's directory too.
TMPDIR="$work" run_wait "$PY" "$SCRIPT_DIR/demo_oip.py" table --server "$addr" --ocr-dir "$ocr" \
  --fp ocr_rec --fp-upload "$work/upload.json" --limit "$limit" \
  --job "$work/w4x1.json" --job "$work/w4x2.json" --job "$work/w4a4x2.json" \
  --job "$work/budget.json"

# ------------------------------------------------------------------------------------------------
step "stop the server (SIGTERM) and remove the temporary directory"
stop_server
grep -E 'SIGTERM|shut' "$work/server.log" | sed 's/^/  server log: /' || true
rm -rf "$work"
[[ -e "$work" ]] && fail "could not remove $work"
echo "removed $work"
work=""
echo
echo "demo finished in $(elapsed) s. Offline tools: fpxint expand (README.md); the full accuracy"
echo "record on four real networks: make eval (docs/RESULTS.md)."
