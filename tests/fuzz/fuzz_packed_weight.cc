// libFuzzer target: the packed weight image (core::LowbitLinear::Deserialize), which arrives
// inside user-supplied TorchScript files (fpxint.PackedWeight's pickled state). Any accepted
// image must re-serialize to the same bytes and run a forward pass and a dequantization without
// reading out of bounds.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/lowbit_linear.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto w = fpxint::core::LowbitLinear::Deserialize(bytes);
  if (!w.ok()) return 0;
  if (w->Serialize() != bytes) std::abort();
  // Accepted images are at most as large as the input, so these buffers are bounded too.
  if (w->out_features() * w->in_features() > (int64_t{1} << 22)) return 0;
  // Batch 3: the small-batch kernels; batch 12: the transposed (large-batch) schedule; batch 20
  // on the panel schedule where the CPU has it (AVX-512).
  std::vector<float> x(static_cast<size_t>(20 * w->in_features()), 0.5f);
  std::vector<float> y(static_cast<size_t>(20 * w->out_features()));
  w->Forward(x.data(), 3, y.data());
  w->Forward(x.data(), 12, y.data());
  w->Forward(x.data(), 1, y.data(), 1);
  if (fpxint::core::ActiveLinearKernels().gemm_wr != nullptr) {
    w->ForwardPanels(x.data(), w->in_features(), 20, 0, w->out_features(), y.data(),
                     w->out_features());
  }
  std::vector<float> dense(static_cast<size_t>(w->out_features() * w->in_features()));
  w->Dequantize(dense.data());
  return 0;
}
