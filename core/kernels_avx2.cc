// AVX2 kernels (4 doubles per vector). Compiled with -mavx2 only; selected at run time.
#include <immintrin.h>

#include <cstring>

#include "core/internal/kernels_inl.h"

namespace fpxint::core::internal {
namespace {

inline void StoreCodes4(__m256d q, uint8_t* dst) {
  const __m128i qi = _mm256_cvtpd_epi32(q);  // exact: q is integral and in [-128, 255]
  const __m128i pick = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const int32_t bytes = _mm_cvtsi128_si32(_mm_shuffle_epi8(qi, pick));  // low byte of each lane
  std::memcpy(dst, &bytes, 4);
}

// Running min / max / Σy² over 4 lanes.
struct Acc256 {
  __m256d vmin = _mm256_set1_pd(INFINITY);
  __m256d vmax = _mm256_set1_pd(-INFINITY);
  __m256d vsq = _mm256_setzero_pd();
  void Add(__m256d y) {
    vmin = _mm256_min_pd(vmin, y);
    vmax = _mm256_max_pd(vmax, y);
    vsq = _mm256_add_pd(vsq, _mm256_mul_pd(y, y));
  }
  void Finish(SegmentStats* st) const {
    alignas(32) double a[4], b[4], c[4];
    _mm256_store_pd(a, vmin);
    _mm256_store_pd(b, vmax);
    _mm256_store_pd(c, vsq);
    for (int i = 0; i < 4; ++i) {
      st->min = a[i] < st->min ? a[i] : st->min;
      st->max = b[i] > st->max ? b[i] : st->max;
    }
    st->sumsq = (c[0] + c[1]) + (c[2] + c[3]);
  }
};

template <GridOp G>
void QuantizeAvx2(const TermParams& p, double* r, uint8_t* codes, int64_t n, SegmentStats* out) {
  InitStats(out);
  const __m256d s = _mm256_set1_pd(p.scale), z = _mm256_set1_pd(p.zero);
  const __m256d lo = _mm256_set1_pd(p.lo), hi = _mm256_set1_pd(p.hi), half = _mm256_set1_pd(0.5);
  Acc256 acc;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d x = _mm256_loadu_pd(r + i);
    __m256d q = _mm256_div_pd(x, s);
    if constexpr (G == GridOp::kSym) {
      q = _mm256_round_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else if constexpr (G == GridOp::kAsym) {
      q = _mm256_round_pd(_mm256_add_pd(q, z), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      q = _mm256_round_pd(q, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    }
    q = _mm256_max_pd(q, lo);
    q = _mm256_min_pd(q, hi);
    __m256d d;
    if constexpr (G == GridOp::kSym) {
      d = _mm256_mul_pd(q, s);
    } else if constexpr (G == GridOp::kAsym) {
      d = _mm256_mul_pd(s, _mm256_sub_pd(q, z));
    } else {
      d = _mm256_mul_pd(_mm256_add_pd(q, half), s);
    }
    const __m256d y = _mm256_sub_pd(x, d);
    _mm256_storeu_pd(r + i, y);
    StoreCodes4(q, codes + i);
    acc.Add(y);
  }
  acc.Finish(out);
  QuantizeTail<G>(p, r, codes, i, n, out);
}

void StatsAvx2(const double* r, int64_t n, SegmentStats* out) {
  InitStats(out);
  Acc256 acc;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) acc.Add(_mm256_loadu_pd(r + i));
  acc.Finish(out);
  StatsTail(r, i, n, out);
}

}  // namespace

constexpr KernelTable kAvx2Kernels = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  KernelTable t{};
  t.name = "avx2";
  t.quantize_sym = QuantizeAvx2<GridOp::kSym>;
  t.quantize_asym = QuantizeAvx2<GridOp::kAsym>;
  t.quantize_mid = QuantizeAvx2<GridOp::kMid>;
  t.stats = StatsAvx2;
  t.pack = PackImpl;
  t.f32_to_f64 = F32ToF64Impl;
  t.bf16_to_f64 = BF16ToF64Impl;
  t.f16_to_f64 = F16ToF64Scalar;
  t.digits_mid = DigitsScalar;  // the scalar loop
  t.f32_abs_max = F32AbsMaxImpl;
  return t;
}();

}  // namespace fpxint::core::internal
