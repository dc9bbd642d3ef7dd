// fpxint::act_expand and fpxint::act_expand_terms: dynamic activation expansion for layer
// expansion (docs/ALGORITHM.md §3).
#include "model/act_expand_op.h"

#include <ATen/Parallel.h>
#include <torch/script.h>

#include "core/expansion.h"
#include "model/aten_pool.h"

namespace fpxint::model {
namespace {

// The expansion spec and the 2-D [rows, cols] view of x that `granularity` (ActGranularity)
// means: one scale for the tensor, one per row of that view, or one per sample (the `blocks`
// slices of x along its first dimension, each expanded on its own).
struct ActView {
  core::ExpansionSpec spec;
  int64_t rows = 0, cols = 0;
  int64_t blocks = 1;  // rows % blocks == 0
};

ActView ViewFor(const at::Tensor& x, int64_t bits, int64_t terms, int64_t grid,
                int64_t granularity, bool unsigned_first, int64_t variant) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fpxint::act_expand: expects float32, got ",
              x.scalar_type());
  TORCH_CHECK(terms >= 1, "fpxint::act_expand: terms must be >= 1");
  TORCH_CHECK(x.is_contiguous(), "fpxint::act_expand: internal: x must be contiguous");
  const int64_t n = x.numel();
  int64_t cols = n;
  const auto g = static_cast<ActGranularity>(granularity);
  const bool per_tensor = g == ActGranularity::kTensor || g == ActGranularity::kSample;
  switch (g) {
    case ActGranularity::kTensor:  // one scale; rows only split the work
    case ActGranularity::kSample:  // one scale per block of rows
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
  ActView v;
  v.cols = cols;
  v.rows = cols == 0 ? 0 : n / cols;
  v.blocks = SampleBlocks(g, x.dim(), x.dim() >= 1 ? x.size(0) : 1, v.rows);
  v.spec.bits = static_cast<int>(bits);
  v.spec.terms = static_cast<int>(terms);
  v.spec.grid = static_cast<core::Grid>(grid);
  TORCH_CHECK(variant == static_cast<int64_t>(core::Variant::kRescaled) ||
                  variant == static_cast<int64_t>(core::Variant::kDigits),
              "fpxint::act_expand: variant ", variant, " unknown; accepted 0 (R), 1 (D)");
  v.spec.variant = static_cast<core::Variant>(variant);
  v.spec.scale = v.rows > 1 && !per_tensor ? core::ScaleGranularity::kChannel
                                            : core::ScaleGranularity::kTensor;
  v.spec.unsigned_first =
      unsigned_first && v.spec.grid == core::Grid::kSym && x.min().item<float>() >= 0;
  return v;
}

// Expands x from its own values (core::ExpandReconstructF32: no codes are stored) into the sum
// of its terms (`sum`, may be undefined) and/or each term alone (`terms`, may be empty).
void ExpandInto(const at::Tensor& x, const ActView& v, const at::Tensor& sum,
                const std::vector<at::Tensor>& terms) {
  core::ExpandOptions options;
  options.pool = &AtenPool();
  std::vector<float*> term_ptrs;
  for (const at::Tensor& t : terms) term_ptrs.push_back(t.data_ptr<float>());
  const absl::Status s = core::ExpandReconstructF32(
      x.data_ptr<float>(), v.rows, v.cols, v.spec, options,
      sum.defined() ? sum.data_ptr<float>() : nullptr, term_ptrs, v.blocks);
  TORCH_CHECK(s.ok(), "fpxint::act_expand: ", std::string(s.message()));
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

at::Tensor ActExpand(const at::Tensor& x_in, int64_t bits, int64_t terms, int64_t grid,
                     int64_t granularity, bool unsigned_first, int64_t variant) {
  if (x_in.numel() == 0) return x_in.clone();
  const at::Tensor x = GroupView(x_in, granularity);
  const ActView v = ViewFor(x, bits, terms, grid, granularity, unsigned_first, variant);
  at::Tensor out = at::empty_like(x);
  ExpandInto(x, v, out, {});
  return FromGroupView(out, granularity);
}

std::vector<at::Tensor> ActExpandTerms(const at::Tensor& x_in, int64_t bits, int64_t terms,
                                       int64_t grid, int64_t granularity, bool unsigned_first,
                                       int64_t variant) {
  std::vector<at::Tensor> out;
  if (x_in.numel() == 0) {
    for (int64_t j = 0; j < terms; ++j) out.push_back(x_in.clone());
    return out;
  }
  const at::Tensor x = GroupView(x_in, granularity);
  const ActView v = ViewFor(x, bits, terms, grid, granularity, unsigned_first, variant);
  for (int64_t j = 0; j < terms; ++j) out.push_back(at::empty_like(x));
  ExpandInto(x, v, at::Tensor(), out);
  for (at::Tensor& t : out) t = FromGroupView(t, granularity);
  return out;
}

}  // namespace

TORCH_LIBRARY(fpxint, m) {
  // `variant` (a core::Variant) defaults to R, so networks saved before it existed still load.
  m.def("act_expand(Tensor x, int bits, int terms, int grid, int granularity, "
        "bool unsigned_first, int variant=0) -> Tensor",
        &ActExpand);
  m.def("act_expand_terms(Tensor x, int bits, int terms, int grid, int granularity, "
        "bool unsigned_first, int variant=0) -> Tensor[]",
        &ActExpandTerms);
}

void EnsureActExpandOpRegistered() {}

}  // namespace fpxint::model
