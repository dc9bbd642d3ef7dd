// fpxint::act_expand and fpxint::act_expand_terms: dynamic activation expansion for layer
// expansion (SPEC.md §3).
#include "model/act_expand_op.h"

#include <ATen/Parallel.h>
#include <torch/script.h>

#include "core/expansion.h"
#include "model/aten_pool.h"

namespace fpxint::model {
namespace {

// Expands x from its own values, one scale per group of `granularity` (ActGranularity).
// Returns the expansion over the rows of the 2-D view `rows_view` of x that it used.
core::TensorExpansion ExpandActivation(const at::Tensor& x, int64_t bits, int64_t terms,
                                       int64_t grid, int64_t granularity, bool unsigned_first) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fpxint::act_expand: expects float32, got ",
              x.scalar_type());
  TORCH_CHECK(terms >= 1, "fpxint::act_expand: terms must be >= 1");
  TORCH_CHECK(x.is_contiguous(), "fpxint::act_expand: internal: x must be contiguous");
  const int64_t n = x.numel();
  int64_t cols = n;
  const bool per_tensor = static_cast<ActGranularity>(granularity) == ActGranularity::kTensor;
  switch (static_cast<ActGranularity>(granularity)) {
    case ActGranularity::kTensor:  // one scale; rows only split the work
      cols = x.dim() >= 1 && x.size(-1) > 0 ? x.size(-1) : n;
      break;
    case ActGranularity::kRow:  // x is [..., C]: one scale per row
    case ActGranularity::kPixel:  // x was permuted to [N, H, W, C] by the caller
      cols = x.dim() >= 1 ? x.size(-1) : n;
      break;
    case ActGranularity::kChannel:  // x is [N, C, H, W]: one scale per (n, c)
      TORCH_CHECK(x.dim() == 4, "fpxint::act_expand: per-channel scales need NCHW input");
      cols = x.size(2) * x.size(3);
      break;
    default: TORCH_CHECK(false, "fpxint::act_expand: granularity ", granularity, " unknown");
  }
  const int64_t rows = cols == 0 ? 0 : n / cols;
  core::ExpansionSpec spec;
  spec.bits = static_cast<int>(bits);
  spec.terms = static_cast<int>(terms);
  spec.grid = static_cast<core::Grid>(grid);
  spec.scale = rows > 1 && !per_tensor ? core::ScaleGranularity::kChannel
                                        : core::ScaleGranularity::kTensor;
  spec.unsigned_first =
      unsigned_first && spec.grid == core::Grid::kSym && x.min().item<float>() >= 0;
  const std::vector<int64_t> shape = {rows, cols};
  const auto bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(x.data_ptr<float>()),
                                         static_cast<size_t>(n) * 4);
  core::ExpandOptions options;
  options.pool = &AtenPool();
  absl::StatusOr<core::TensorExpansion> e =
      core::ExpandTensor(core::DType::kF32, shape, bytes, spec, options);
  TORCH_CHECK(e.ok(), "fpxint::act_expand: ", std::string(e.status().message()));
  return *std::move(e);
}

// Per-pixel scales work on the NHWC view, so that each pixel's channels are one row.
at::Tensor GroupView(const at::Tensor& x, int64_t granularity) {
  if (static_cast<ActGranularity>(granularity) == ActGranularity::kPixel) {
    TORCH_CHECK(x.dim() == 4, "fpxint::act_expand: per-pixel scales need NCHW input");
    return x.permute({0, 2, 3, 1}).contiguous();
  }
  return x.contiguous();
}

at::Tensor FromGroupView(const at::Tensor& v, int64_t granularity) {
  if (static_cast<ActGranularity>(granularity) == ActGranularity::kPixel) {
    return v.permute({0, 3, 1, 2}).contiguous();
  }
  return v;
}

at::Tensor ToFloat(const std::vector<double>& v, const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(v.size()), int64_t{1} << 15, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = static_cast<float>(v[static_cast<size_t>(i)]);
  });
  return out;
}

at::Tensor ActExpand(const at::Tensor& x_in, int64_t bits, int64_t terms, int64_t grid,
                     int64_t granularity, bool unsigned_first) {
  if (x_in.numel() == 0) return x_in.clone();
  const at::Tensor x = GroupView(x_in, granularity);
  const core::TensorExpansion e =
      ExpandActivation(x, bits, terms, grid, granularity, unsigned_first);
  return FromGroupView(
      ToFloat(core::Reconstruct(e, static_cast<int>(e.terms.size()), &AtenPool()), x),
      granularity);
}

std::vector<at::Tensor> ActExpandTerms(const at::Tensor& x_in, int64_t bits, int64_t terms,
                                       int64_t grid, int64_t granularity, bool unsigned_first) {
  std::vector<at::Tensor> out;
  if (x_in.numel() == 0) {
    for (int64_t j = 0; j < terms; ++j) out.push_back(x_in.clone());
    return out;
  }
  const at::Tensor x = GroupView(x_in, granularity);
  const core::TensorExpansion e =
      ExpandActivation(x, bits, terms, grid, granularity, unsigned_first);
  std::vector<double> term(static_cast<size_t>(x.numel()));
  for (int64_t j = 0; j < terms; ++j) {
    std::fill(term.begin(), term.end(), 0.0);
    if (j < static_cast<int64_t>(e.terms.size())) {  // fewer terms: the rest are exact zeros
      at::parallel_for(0, e.layout.rows, 1, [&](int64_t b, int64_t end) {
        core::AccumulateTermRows(e.spec, e.layout, e.terms[j], static_cast<int>(j + 1), b, end,
                                 term.data());
      });
    }
    out.push_back(FromGroupView(ToFloat(term, x), granularity));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(fpxint, m) {
  m.def("act_expand(Tensor x, int bits, int terms, int grid, int granularity, "
        "bool unsigned_first) -> Tensor",
        &ActExpand);
  m.def("act_expand_terms(Tensor x, int bits, int terms, int grid, int granularity, "
        "bool unsigned_first) -> Tensor[]",
        &ActExpandTerms);
}

void EnsureActExpandOpRegistered() {}

}  // namespace fpxint::model
