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

const KernelTable kRefKernels = {"ref", QuantizeRef<GridOp::kSym>, QuantizeRef<GridOp::kAsym>,
                                 QuantizeRef<GridOp::kMid>, StatsRef,
    PackImpl, F32ToF64Impl};

}  // namespace fpxint::core::internal
