// File: model/lowbit_ops.h
//
// The TorchScript operators that run expanded layers on packed low-bit weights (issue: real
// low-bit inference). Registered as library "fpxint" by linking fpxint_model (C++) or by loading
// libfpxint_ops.so (Python: torch.ops.load_library(".../libfpxint_ops.so")):
//
//   class  torch.classes.fpxint.PackedWeight   one layer's weight: K packed b-bit terms with
//          their scales (core::LowbitLinear) and the weight's original shape. Pickled with the
//          module (its packed image as a uint8 tensor), so a saved model keeps its weights packed.
//          Methods: terms(), shape(), resident_bytes().
//   fpxint::linear(Tensor x, PackedWeight w, Tensor? bias, int terms) -> Tensor
//          y = x · (Σ_{k<=terms} Ŵ_k)ᵀ + bias over the last dim of x (also aten::matmul against a
//          constant weight, whose transpose w holds).
//   fpxint::conv2d(Tensor x, PackedWeight w, Tensor? bias, int[] stride, int[] padding,
//                  int[] dilation, int groups, int terms, int act_bits=0, int act_terms=0,
//                  int act_grid=0, int act_granularity=0, int act_variant=0,
//                  int[] tail_ops=[], float[] tail_values=[]) -> Tensor
//          conv2d, depthwise and grouped included; with act_bits > 0 on x's activation expansion
//          (as fpxint::act_expand); then the bias (float32, one per output channel) and the
//          tail's elementwise steps (as fpxint::post_'s), per channel on the depthwise schedule.
//   fpxint::dequantize(PackedWeight w, int terms) -> Tensor
//          Σ_{k<=terms} Ŵ_k in the weight's original shape (for layers of other kinds).
//   fpxint::linear_wa(x, w, bias, terms, act_bits, act_terms, unsigned_first, truncate,
//                     granularity) -> Tensor
//   fpxint::conv2d_wa(x, w, bias, stride, padding, dilation, groups, terms, act_bits, act_terms,
//                     unsigned_first, truncate, granularity) -> Tensor
//          W×A (docs/ALGORITHM.md §3): x is expanded dynamically into act_terms b-bit terms (scales by
//          `granularity`, an ActGranularity: per row / per pixel / per tensor) and the integer
//          products with the weight terms run on core::IntLinear (int32, VNNI), all pairs or the
//          order-truncated ones. Weights must be sym with one scale per row; conv2d_wa takes
//          groups == 1 with per-pixel scales (1x1, no padding) or per-tensor scales (stride 1).
//   fpxint::linear_folded(x, w, bias, terms, act_bits, act_terms) -> Tensor
//   fpxint::conv2d_folded(x, w, bias, stride, padding, dilation, groups, terms, act_bits,
//                         act_terms) -> Tensor
//          Folded W×A (docs/ALGORITHM.md §3a): variant D weights and activations (grid mid, per
//          row / per pixel scales; conv: 1x1 without padding, ungrouped). With every weight term
//          and K_a·b_a <= 8, all K_w·K_a term products are one u8 × s8 product
//          (core::FoldedIntLinear); any other precision runs the activation's variant D expansion
//          through the weight-only op.
//
// terms <= 0 (or beyond K) means all terms: any precision from one packed model.
//
// Scheduling (weight-only), by activation rows M (rows of x, or N·OH·OW output pixels), all on
// the packed codes (core::LowbitLinear): up to 8 rows, dot products on the codes; linear layers
// with 17-48 rows and at most 1024 inputs, the panel schedule (32 weight rows dequantized into L1
// at a time, in the vector lanes against row-major activations; AVX-512); everything else, the
// transposed schedule (16 rows dequantized at a time, broadcast against the activations
// transposed, which convolutions hand over as their im2col columns without a copy); depthwise
// convolutions (dilation 1, width stride 1) beyond 8 pixels run straight on the image
// (core::LowbitLinear::DepthwiseConv2d; AVX-512). Other grouped convolutions beyond 8 pixels,
// and any call beyond FPXINT_PACKED_MAX_ROWS rows when it is set,
// take the dense path: a transient fp32 copy of Σ Ŵ_k (one layer at a time) for LibTorch's GEMM
// or convolution. The W×A ops run their integer kernels up to 16 rows (or the variable's value)
// and the dense path beyond. Either way the resident weights stay packed. Threads: LibTorch's
// intra-op pool (at::parallel_for, which needs this directory compiled with OpenMP), the pool
// every other op of the same network already uses.
#ifndef FPXINT_MODEL_LOWBIT_OPS_H_
#define FPXINT_MODEL_LOWBIT_OPS_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/lowbit_linear.h"

namespace c10 {
struct IValue;  // only model/*.cc, which include LibTorch, call the functions that use it
}

namespace fpxint::model {

inline constexpr char kPackedWeightClass[] = "__torch__.torch.classes.fpxint.PackedWeight";
inline constexpr char kLinearOp[] = "fpxint::linear";
inline constexpr char kConv2dOp[] = "fpxint::conv2d";
inline constexpr char kDequantizeOp[] = "fpxint::dequantize";
inline constexpr char kLinearWaOp[] = "fpxint::linear_wa";
inline constexpr char kConv2dWaOp[] = "fpxint::conv2d_wa";
inline constexpr char kLinearFoldedOp[] = "fpxint::linear_folded";
inline constexpr char kConv2dFoldedOp[] = "fpxint::conv2d_folded";
inline constexpr char kPostOp[] = "fpxint::post_";
// Activation rows up to which the packed kernels run (above: transient fp32 + LibTorch); -1, the
// default, is automatic (weight-only: no bound; W×A: 16). FPXINT_PACKED_MAX_ROWS sets it (0 forces
// the dense path, a large value the packed kernels everywhere).
int64_t PackedMaxRows();
void SetPackedMaxRows(int64_t rows);  // process-wide; for benchmarks and tests

// A PackedWeight object holding `w`, whose dense form has `shape` (w's [out, in] flattened).
c10::IValue MakePackedWeight(core::LowbitLinear w, std::vector<int64_t> shape);
// What a PackedWeight holds; terms == 0 when `v` is not a PackedWeight.
struct PackedWeightInfo {
  int terms = 0;
  std::vector<int64_t> shape;
  size_t bytes = 0;  // packed codes, scales and offsets (+ the W×A view's, once used)
  const core::LowbitLinear* linear = nullptr;  // the packed terms; valid while `v` lives
};
PackedWeightInfo InspectPackedWeight(const c10::IValue& v);
// Whether fpxint::linear_wa / conv2d_wa take `v` (core::IntLinear::ViewOf: sym codes, one scale
// per row, b in 2..8). Builds the integer view it checks, which those ops then use.
bool TakesIntegerOps(const c10::IValue& v);
// Whether fpxint::linear_folded / conv2d_folded fold `v` (core::FoldedIntLinear::FromLowbit:
// variant D codes by content, K·b <= 8). Builds the folded panels, which those ops then use.
bool TakesFoldedOps(const c10::IValue& v);

// Keeps the registration in binaries that link fpxint_model statically.
void EnsureLowbitOpsRegistered();

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_LOWBIT_OPS_H_
