#!/usr/bin/env bash
# fpxint-quantize-step.sh — one MLOps pipeline step: upload a model to fpxint-server, quantize it
# with the FP=xINT series expansion, fail the pipeline when the quantized model's error is above a
# threshold, and leave the job record and the artifacts in an output directory.
#
# Usage:
#   fpxint-quantize-step.sh --model-file FILE --name NAME --out DIR [--max-rel-error X]
#                           [--target-rel-error T] [--job-file SPEC.yaml | quantize flags...]
#                           [-- more quantize flags]
# Inputs (flags, or environment for CI systems):
#   --model-file FILE      model to quantize (.safetensors or TorchScript .pt)     MODEL_FILE
#   --name NAME            name to upload it under                                 MODEL_NAME
#   --out DIR              where job.json, upload.json and the artifacts go        OUTPUT_DIR
#   --max-rel-error X      quality gate (default 0.05)                             MAX_REL_ERROR
#   --target-rel-error T   error budget: K per layer chosen to meet T (layer/model) TARGET_REL_ERROR
#   --job-file SPEC        YAML/JSON job spec (the model key is set from --name)   JOB_FILE
#   --input SIG            TorchScript input signature, e.g. x:FP32:1,3,48,320     MODEL_INPUT
#   anything else          passed to `fpxint quantize` (e.g. --granularity layer --bits 4 --terms 2)
#   FPXINT_SERVER, FPXINT_TOKEN, FPXINT_TLS_CA   where the server is and how to reach it
#   FPXINT_BIN             the fpxint CLI (default: fpxint on PATH)
# Outputs (in --out): upload.json, job.json (the job, with report and quality_gate), the job's
# artifacts (packed .safetensors, report.json, any TorchScript exports), and `job_id`, `state`,
# `rel_error` as one-line files for systems that read outputs from files (Kubeflow, Argo).
# Exit code: 0 passed; 5 job failed or error above the threshold; others as the fpxint CLI.
set -euo pipefail

fpxint="${FPXINT_BIN:-fpxint}"
model_file="${MODEL_FILE:-}"
name="${MODEL_NAME:-}"
out="${OUTPUT_DIR:-}"
max_rel_error="${MAX_REL_ERROR:-0.05}"
target_rel_error="${TARGET_REL_ERROR:-}"
job_file="${JOB_FILE:-}"
input_sig="${MODEL_INPUT:-}"
quantize_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model-file) model_file="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --max-rel-error) max_rel_error="$2"; shift 2 ;;
    --target-rel-error) target_rel_error="$2"; shift 2 ;;
    --job-file) job_file="$2"; shift 2 ;;
    --input) input_sig="$2"; shift 2 ;;
    --) shift; quantize_args+=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) quantize_args+=("$1"); shift ;;
  esac
done
usage() { echo "fpxint-quantize-step: $1 (see --help)" >&2; exit 2; }
[[ -n $model_file ]] || usage "--model-file (or MODEL_FILE) is required"
[[ -f $model_file ]] || usage "model file '$model_file' does not exist"
[[ -n $name ]] || usage "--name (or MODEL_NAME) is required"
[[ -n $out ]] || usage "--out (or OUTPUT_DIR) is required"
mkdir -p "$out"

log() { echo "[fpxint-step] $*" >&2; }

log "waiting for fpxint-server at ${FPXINT_SERVER:-127.0.0.1:8001}"
"$fpxint" --quiet health --wait 60

log "uploading $model_file as $name"
upload_args=(upload "$model_file" --name "$name")
[[ -n $input_sig ]] && upload_args+=(--input "$input_sig")
"$fpxint" --json "${upload_args[@]}" > "$out/upload.json"

log "quantizing (gate: relative error <= $max_rel_error)"
q=(quantize --model "$name" --max-rel-error "$max_rel_error")
[[ -n $job_file ]] && q+=(--job-file "$job_file")
[[ -n $target_rel_error ]] && q+=(--target-rel-error "$target_rel_error")
set +e
"$fpxint" --json "${q[@]}" "${quantize_args[@]}" > "$out/job.json"
rc=$?
set -e
# A JSON document is always written. Its keys are unique where read here (top-level "id" and
# "state", quality_gate's "rel_error"), so sed reads them without needing python or jq.
read_field() { sed -n "s/^ *\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$out/job.json" | head -n1; }
job_id="$(read_field id)"
state="$(read_field state)"
rel_error="$(read_field rel_error)"
printf '%s\n' "$job_id" > "$out/job_id"
printf '%s\n' "$state" > "$out/state"
printf '%s\n' "$rel_error" > "$out/rel_error"
if [[ $rc -ne 0 ]]; then
  log "FAILED (exit $rc): job ${job_id:-?} state ${state:-?} rel_error ${rel_error:-?}; see $out/job.json"
  exit "$rc"
fi
log "downloading the artifacts of $job_id"
"$fpxint" --quiet download "$job_id" --all -o "$out"
log "passed: job $job_id, rel_error $rel_error <= $max_rel_error; outputs in $out"
