// Scalar reference kernels: no intrinsics, compiled for the baseline x86-64 ISA.
#include "core/internal/kernels_inl.h"

namespace fpxint::core::internal {
namespace {

template <GridOp G>
void QuantizeRef(const TermParams& p, double* r, uint8_t* codes, int64_t n, SegmentStats* out) {
  InitStats(out);
  QuantizeTail<G>(p, r, codes, 0, n, out);
}

void StatsRef(const double* r, int64_t n, SegmentStats* out) {
  InitStats(out);
  StatsTail(r, 0, n, out);
}

}  // namespace

constexpr KernelTable kRefKernels = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  KernelTable t{};
  t.name = "ref";
  t.quantize_sym = QuantizeRef<GridOp::kSym>;
  t.quantize_asym = QuantizeRef<GridOp::kAsym>;
  t.quantize_mid = QuantizeRef<GridOp::kMid>;
  t.stats = StatsRef;
  t.pack = PackImpl;
  t.f32_to_f64 = F32ToF64Impl;
  t.bf16_to_f64 = BF16ToF64Impl;
  t.f16_to_f64 = F16ToF64Scalar;
  t.digits_mid = DigitsScalar;
  t.f32_abs_max = F32AbsMaxImpl;
  return t;
}();

}  // namespace fpxint::core::internal
