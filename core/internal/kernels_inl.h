// File: core/internal/kernels_inl.h
//
// Per-element formulas shared by the scalar reference and the tails of the SIMD kernels, so that
// every variant computes exactly the same operations in the same order. The clamps mirror
// vmaxpd/vminpd: max(q, lo) = q > lo ? q : lo; min(q, hi) = q < hi ? q : hi.
#ifndef FPXINT_CORE_INTERNAL_KERNELS_INL_H_
#define FPXINT_CORE_INTERNAL_KERNELS_INL_H_

#include <cmath>
#include <cstdint>

#include "core/kernels.h"

namespace fpxint::core::internal {

enum class GridOp { kSym, kAsym, kMid };

template <GridOp G>
inline double QuantizeOne(const TermParams& p, double* r, uint8_t* code) {
  const double x = *r;
  double q;
  if constexpr (G == GridOp::kSym) {
    q = std::nearbyint(x / p.scale);
  } else if constexpr (G == GridOp::kAsym) {
    q = std::nearbyint(x / p.scale + p.zero);
  } else {
    q = std::floor(x / p.scale);
  }
  q = q > p.lo ? q : p.lo;
  q = q < p.hi ? q : p.hi;
  double y;
  if constexpr (G == GridOp::kSym) {
    const double d = q * p.scale;
    y = x - d;
  } else if constexpr (G == GridOp::kAsym) {
    const double c = q - p.zero;
    const double d = p.scale * c;
    y = x - d;
  } else {
    const double c = q + 0.5;
    const double d = c * p.scale;
    y = x - d;
  }
  *r = y;
  *code = static_cast<uint8_t>(static_cast<int32_t>(q));
  return y;
}

// Scalar loop over [begin, n), merged into *st (min/max/sumsq already initialised).
template <GridOp G>
inline void QuantizeTail(const TermParams& p, double* r, uint8_t* codes, int64_t begin, int64_t n,
                         SegmentStats* st) {
  for (int64_t i = begin; i < n; ++i) {
    const double y = QuantizeOne<G>(p, r + i, codes + i);
    st->min = y < st->min ? y : st->min;
    st->max = y > st->max ? y : st->max;
    st->sumsq += y * y;
  }
}

inline void StatsTail(const double* r, int64_t begin, int64_t n, SegmentStats* st) {
  for (int64_t i = begin; i < n; ++i) {
    const double y = r[i];
    st->min = y < st->min ? y : st->min;
    st->max = y > st->max ? y : st->max;
    st->sumsq += y * y;
  }
}

inline void InitStats(SegmentStats* st) {
  st->min = INFINITY;
  st->max = -INFINITY;
  st->sumsq = 0;
}

// Each SIMD table is defined in its own translation unit, compiled with its own flags.
extern const KernelTable kRefKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;

}  // namespace fpxint::core::internal

#endif  // FPXINT_CORE_INTERNAL_KERNELS_INL_H_
