#!/usr/bin/env bash
# The layering of docs/ARCHITECTURE.md ("Layers"), enforced: the core includes nothing of gRPC,
# protobuf or LibTorch, LibTorch headers appear only in model/*.cc and model/internal/, and the CLI binary does not
# load LibTorch (it must start fast; it links gRPC and the generated stubs, which is fine).
set -euo pipefail
src="$1"
cli="$2"
fail=0
if grep -rnE '#include\s*[<"](grpc|grpcpp|google/protobuf|torch|ATen|c10)/' "$src/core"; then
  echo "FAIL: core/ must not include gRPC, protobuf or LibTorch" >&2
  fail=1
fi
# LibTorch headers stay in the model layer's implementation: its .cc files and its private
# headers under model/internal/, which nothing outside model/*.cc includes. Never in a public
# header, never in server/.
if grep -rnE '#include\s*[<"](torch|ATen|c10)/' "$src/server" "$src/client" "$src/proto" \
     $(find "$src/model" -name '*.h' -not -path '*/internal/*'); then
  echo "FAIL: LibTorch headers outside model/*.cc and model/internal/" >&2
  fail=1
fi
if grep -rln 'model/internal/' "$src/server" "$src/client" "$src/proto" "$src/core" "$src/bench" \
     $(find "$src/model" -name '*.h' -not -path '*/internal/*'); then
  echo "FAIL: model/internal/ included outside model/*.cc" >&2
  fail=1
fi
# Match library names only (the first field of ldd): load addresses are random hex and once
# contained "c10" (0x...dfc1000), which made this check flaky.
if ldd "$cli" | awk '{print $1}' | grep -E '^lib(torch|c10|caffe2|openblas)'; then
  echo "FAIL: $cli links LibTorch libraries it must not" >&2
  fail=1
fi
# The CLI starts in well under 100 ms.
start=$(date +%s%N)
"$cli" --version >/dev/null
ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "fpxint --version: ${ms} ms"
[[ $fail == 0 ]] && echo "layering OK"
exit $fail
