// File: core/internal/kernels_inl.h
//
// Per-element formulas shared by the scalar reference and the tails of the SIMD kernels, so that
// every variant computes exactly the same operations in the same order. The clamps mirror
// vmaxpd/vminpd: max(q, lo) = q > lo ? q : lo; min(q, hi) = q < hi ? q : hi.
#ifndef FPXINT_CORE_INTERNAL_KERNELS_INL_H_
#define FPXINT_CORE_INTERNAL_KERNELS_INL_H_

#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "core/kernels.h"

namespace fpxint::core::internal {

// Each kernel TU is compiled with its own -m flags. Everything below has internal linkage, so
// that the linker can never fold an AVX-512 instance of a helper into the reference table.
namespace {

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

// One value of DigitsRowFn (core/kernels.h): the operations of QuantizeOne<kMid> term by term,
// and of TermRow's accumulation.
inline void DigitsOne(float x, const DigitsParams& p, int64_t i, float* sum,
                      uint8_t* const* codes, uint8_t* folded, int64_t* folded_sum) {
  double r = x, acc = 0.0, u = 0.0;
  const double radix = static_cast<double>(1 << p.bits);
  for (int k = 0; k < p.terms; ++k) {
    const double s = p.scale[k];
    double q = std::floor(r / s);
    q = q > p.lo ? q : p.lo;
    q = q < p.hi ? q : p.hi;
    const double d = (q + 0.5) * s;
    r = r - d;
    acc = acc + d;
    u = u * radix + q;
    if (codes != nullptr) codes[k][i] = static_cast<uint8_t>(static_cast<int32_t>(q));
  }
  if (sum != nullptr) sum[i] = static_cast<float>(acc);
  if (folded != nullptr) {
    const int32_t b = static_cast<int32_t>(u) + p.fold_shift;
    folded[i] = static_cast<uint8_t>(b);
    *folded_sum += b;
  }
}

inline void DigitsTail(const float* x, int64_t begin, int64_t n, const DigitsParams& p,
                       float* sum, uint8_t* const* codes, uint8_t* folded, int64_t* folded_sum) {
  for (int64_t i = begin; i < n; ++i) DigitsOne(x[i], p, i, sum, codes, folded, folded_sum);
}

inline void DigitsScalar(const float* x, int64_t n, const DigitsParams& p, float* sum,
                         uint8_t* const* codes, uint8_t* folded, int64_t* folded_sum) {
  if (folded_sum != nullptr) *folded_sum = 0;
  DigitsTail(x, 0, n, p, sum, codes, folded, folded_sum);
}

inline bool F32AbsMaxImpl(const float* __restrict x, int64_t n, float* max_abs) {
  float m = 0.0f;
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    m = a > m ? a : m;
    bad |= !(a <= 3.40282347e38f);  // Inf, or NaN (every comparison false)
  }
  *max_abs = m;
  return bad == 0;
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

// Packing per core/packing.h; written as plain loops that each TU's compiler flags vectorize.
inline void PackImpl(const uint8_t* __restrict codes, int64_t n, int bits, uint8_t* __restrict out) {
  const int per = (bits == 1 || bits == 2 || bits == 4) ? 8 / bits : 1;
  if (per == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = codes[i];
    return;
  }
  const uint8_t mask = static_cast<uint8_t>((1u << bits) - 1);
  const int64_t full = n / per;
  if (bits == 4) {
    for (int64_t j = 0; j < full; ++j) {
      out[j] = static_cast<uint8_t>((codes[2 * j] & 0xF) | (codes[2 * j + 1] << 4));
    }
  } else if (bits == 2) {
    for (int64_t j = 0; j < full; ++j) {
      out[j] = static_cast<uint8_t>((codes[4 * j] & 3) | ((codes[4 * j + 1] & 3) << 2) |
                                    ((codes[4 * j + 2] & 3) << 4) | (codes[4 * j + 3] << 6));
    }
  } else {
    for (int64_t j = 0; j < full; ++j) {
      uint8_t byte = 0;
      for (int t = 0; t < 8; ++t) byte |= static_cast<uint8_t>((codes[j * 8 + t] & 1) << t);
      out[j] = byte;
    }
  }
  if (full * per < n) {
    uint8_t byte = 0;
    for (int64_t i = full * per, t = 0; i < n; ++i, ++t) {
      byte |= static_cast<uint8_t>((codes[i] & mask) << (t * bits));
    }
    out[full] = byte;
  }
}

inline void F32ToF64Impl(const uint8_t* __restrict src, int64_t n, double* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) {
    float v;
    __builtin_memcpy(&v, src + 4 * i, 4);
    dst[i] = v;
  }
}

inline void BF16ToF64Impl(const uint8_t* __restrict src, int64_t n, double* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    __builtin_memcpy(&h, src + 2 * i, 2);
    dst[i] = BFloat16ToFloat(h);
  }
}

inline void F16ToF64Scalar(const uint8_t* __restrict src, int64_t n, double* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    __builtin_memcpy(&h, src + 2 * i, 2);
    dst[i] = HalfToFloat(h);
  }
}

inline void InitStats(SegmentStats* st) {
  st->min = INFINITY;
  st->max = -INFINITY;
  st->sumsq = 0;
}

}  // namespace

// Each SIMD table is defined in its own translation unit, compiled with its own flags.
extern const KernelTable kRefKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;

}  // namespace fpxint::core::internal

#endif  // FPXINT_CORE_INTERNAL_KERNELS_INL_H_
