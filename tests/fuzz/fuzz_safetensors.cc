// libFuzzer target: the safetensors parser (core/safetensors.h) on arbitrary bytes, at the
// limits the server reads uploads with (SafetensorsLimits' defaults). Every header field, dtype,
// shape, offset and length must be validated before use: a crash, a sanitizer report, a tensor
// view outside the buffer, or more tensors than the limit is a bug.
#include <algorithm>
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
  // Written back, the tensors read as themselves: names, dtypes (an unsupported one keeps its
  // spelling), shapes and bytes.
  if (size < (1 << 16)) {
    fpxint::core::SafetensorsWriter w;
    for (const fpxint::core::TensorInfo& t : (*r)->tensors()) {
      if (!w.Add(t.name, t.dtype, t.shape, (*r)->Data(t), t.dtype_name).ok()) std::abort();
    }
    const std::vector<uint8_t> again = w.Serialize();
    auto r2 = fpxint::core::SafetensorsReader::FromBuffer(again, limits);
    if (!r2.ok() || (*r2)->tensors().size() != (*r)->tensors().size()) std::abort();
    for (const fpxint::core::TensorInfo& t : (*r)->tensors()) {
      const fpxint::core::TensorInfo* u = (*r2)->Find(t.name);
      if (u == nullptr || u->dtype != t.dtype || u->dtype_name != t.dtype_name ||
          u->shape != t.shape) {
        std::abort();
      }
      const auto a = (*r)->Data(t), b = (*r2)->Data(*u);
      if (a.size() != b.size() || !std::equal(a.begin(), a.end(), b.begin())) std::abort();
    }
  }
  return 0;
}
