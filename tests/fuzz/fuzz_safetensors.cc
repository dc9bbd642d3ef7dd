// libFuzzer target: the safetensors parser (core/safetensors.h) on arbitrary bytes, at the
// limits the server reads uploads with (SafetensorsLimits' defaults). Every header field, dtype,
// shape, offset and length must be validated before use: a crash, a sanitizer report, a tensor
// view outside the buffer, or more tensors than the limit is a bug.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/dtype.h"
#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fpxint::core::SafetensorsLimits limits;  // the production limits
  auto r = fpxint::core::SafetensorsReader::FromBuffer(absl::MakeConstSpan(data, size), limits);
  if (!r.ok()) return 0;
  if ((*r)->tensors().size() > limits.max_tensors) std::abort();
  for (const fpxint::core::TensorInfo& t : (*r)->tensors()) {
    absl::Span<const uint8_t> bytes = (*r)->Data(t);
    // The view must lie inside the input.
    if (!bytes.empty() && (bytes.data() < data || bytes.data() + bytes.size() > data + size)) {
      std::abort();
    }
    if ((*r)->Find(t.name) == nullptr) std::abort();
    if (fpxint::core::IsFloating(t.dtype) && t.numel() > 0 && t.numel() < (1 << 16)) {
      std::vector<double> out(static_cast<size_t>(t.numel()));
      fpxint::core::ConvertToDouble(t.dtype, bytes.data(), t.numel(), out.data());
    }
  }
  (void)(*r)->Metadata("format");
  return 0;
}
