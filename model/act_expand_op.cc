// fpxint::act_expand: dynamic activation expansion for layer expansion (SPEC.md §3).
#include "model/act_expand_op.h"

#include <torch/script.h>

#include "core/expansion.h"
#include "core/thread_pool.h"

namespace fpxint::model {
namespace {

at::Tensor ActExpand(const at::Tensor& x_in, int64_t bits, int64_t terms, int64_t grid,
                     bool per_row, bool unsigned_first) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "fpxint::act_expand: expects float32, got ",
              x_in.scalar_type());
  TORCH_CHECK(terms >= 1, "fpxint::act_expand: terms must be >= 1");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  if (n == 0) return x.clone();
  const int64_t cols = per_row && x.dim() >= 1 ? x.size(-1) : n;
  const int64_t rows = n / cols;
  core::ExpansionSpec spec;
  spec.bits = static_cast<int>(bits);
  spec.terms = static_cast<int>(terms);
  spec.grid = static_cast<core::Grid>(grid);
  spec.scale = per_row ? core::ScaleGranularity::kChannel : core::ScaleGranularity::kTensor;
  spec.unsigned_first = unsigned_first && spec.grid == core::Grid::kSym && x.min().item<float>() >= 0;
  const std::vector<int64_t> shape = {rows, cols};
  const auto bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(x.data_ptr<float>()),
                                         static_cast<size_t>(n) * 4);
  absl::StatusOr<core::TensorExpansion> e = core::ExpandTensor(core::DType::kF32, shape, bytes, spec);
  TORCH_CHECK(e.ok(), "fpxint::act_expand: ", std::string(e.status().message()));
  const std::vector<double> sum = core::Reconstruct(*e, static_cast<int>(terms));
  at::Tensor out = at::empty_like(x);
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(sum[i]);
  return out;
}

}  // namespace

TORCH_LIBRARY(fpxint, m) {
  m.def("act_expand(Tensor x, int bits, int terms, int grid, bool per_row, bool unsigned_first) -> Tensor",
        &ActExpand);
}

void EnsureActExpandOpRegistered() {}

}  // namespace fpxint::model
