// AVX-512 kernels (8 doubles per vector). Compiled with -mavx512f -mavx512vl -mavx512bw
// -mavx512dq; selected at run time.
#include <immintrin.h>

#include "core/internal/kernels_inl.h"

namespace fpxint::core::internal {
namespace {

// Running min / max / Σy² over 8 lanes.
struct Acc512 {
  __m512d vmin = _mm512_set1_pd(INFINITY);
  __m512d vmax = _mm512_set1_pd(-INFINITY);
  __m512d vsq = _mm512_setzero_pd();
  void Add(__m512d y) {
    vmin = _mm512_min_pd(vmin, y);
    vmax = _mm512_max_pd(vmax, y);
    vsq = _mm512_add_pd(vsq, _mm512_mul_pd(y, y));
  }
  void Finish(SegmentStats* out) const {
    out->min = _mm512_reduce_min_pd(vmin);
    out->max = _mm512_reduce_max_pd(vmax);
    out->sumsq = _mm512_reduce_add_pd(vsq);
  }
};

template <GridOp G>
void QuantizeAvx512(const TermParams& p, double* r, uint8_t* codes, int64_t n, SegmentStats* out) {
  InitStats(out);
  const __m512d s = _mm512_set1_pd(p.scale), z = _mm512_set1_pd(p.zero);
  const __m512d lo = _mm512_set1_pd(p.lo), hi = _mm512_set1_pd(p.hi), half = _mm512_set1_pd(0.5);
  Acc512 acc;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d x = _mm512_loadu_pd(r + i);
    __m512d q = _mm512_div_pd(x, s);
    if constexpr (G == GridOp::kSym) {
      q = _mm512_roundscale_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else if constexpr (G == GridOp::kAsym) {
      q = _mm512_roundscale_pd(_mm512_add_pd(q, z), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      q = _mm512_roundscale_pd(q, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    }
    q = _mm512_max_pd(q, lo);
    q = _mm512_min_pd(q, hi);
    __m512d d;
    if constexpr (G == GridOp::kSym) {
      d = _mm512_mul_pd(q, s);
    } else if constexpr (G == GridOp::kAsym) {
      d = _mm512_mul_pd(s, _mm512_sub_pd(q, z));
    } else {
      d = _mm512_mul_pd(_mm512_add_pd(q, half), s);
    }
    const __m512d y = _mm512_sub_pd(x, d);
    _mm512_storeu_pd(r + i, y);
    // vpmovdb truncates each int32 to its low byte: the two's complement code.
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i),
                     _mm256_cvtepi32_epi8(_mm512_cvtpd_epi32(q)));
    acc.Add(y);
  }
  acc.Finish(out);
  QuantizeTail<G>(p, r, codes, i, n, out);
}

// 16 floats as 16 doubles at dst.
inline void StoreAsF64(__m512 f, double* dst) {
  _mm512_storeu_pd(dst, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
  _mm512_storeu_pd(dst + 8,
                   _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
}

// 16 bfloat16 -> 16 float32 (zero-extend, shift into the high half) -> 16 doubles.
void BF16ToF64Avx512(const uint8_t* src, int64_t n, double* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
    StoreAsF64(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)), dst + i);
  }
  BF16ToF64Impl(src + 2 * i, n - i, dst + i);
}

// vcvtph2ps is exact for every float16, subnormals included (NaNs stay NaNs).
void F16ToF64Avx512(const uint8_t* src, int64_t n, double* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    StoreAsF64(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i))),
               dst + i);
  }
  F16ToF64Scalar(src + 2 * i, n - i, dst + i);
}

void StatsAvx512(const double* r, int64_t n, SegmentStats* out) {
  InitStats(out);
  Acc512 acc;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc.Add(_mm512_loadu_pd(r + i));
  acc.Finish(out);
  StatsTail(r, i, n, out);
}

// DigitsRowFn over 8 values per vector: every term's division, floor, clamp and subtraction on
// a register, so that the residual never goes to memory.
void DigitsAvx512(const float* x, int64_t n, const DigitsParams& p, float* sum,
                  uint8_t* const* codes, uint8_t* folded, int64_t* folded_sum) {
  const __m512d lo = _mm512_set1_pd(p.lo), hi = _mm512_set1_pd(p.hi), half = _mm512_set1_pd(0.5);
  const __m512d radix = _mm512_set1_pd(static_cast<double>(1 << p.bits));
  const __m256i shift = _mm256_set1_epi32(p.fold_shift);
  __m512i usum = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m512d r = _mm512_cvtps_pd(_mm256_loadu_ps(x + i));
    __m512d acc = _mm512_setzero_pd(), u = _mm512_setzero_pd();
    for (int k = 0; k < p.terms; ++k) {
      const __m512d s = _mm512_set1_pd(p.scale[k]);
      __m512d q = _mm512_roundscale_pd(_mm512_div_pd(r, s), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      q = _mm512_min_pd(_mm512_max_pd(q, lo), hi);
      const __m512d d = _mm512_mul_pd(_mm512_add_pd(q, half), s);
      r = _mm512_sub_pd(r, d);
      acc = _mm512_add_pd(acc, d);
      u = _mm512_add_pd(_mm512_mul_pd(u, radix), q);
      if (codes != nullptr) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes[k] + i),
                         _mm256_cvtepi32_epi8(_mm512_cvtpd_epi32(q)));
      }
    }
    if (sum != nullptr) _mm256_storeu_ps(sum + i, _mm512_cvtpd_ps(acc));
    if (folded != nullptr) {
      const __m256i b = _mm256_add_epi32(_mm512_cvtpd_epi32(u), shift);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(folded + i), _mm256_cvtepi32_epi8(b));
      usum = _mm512_add_epi64(usum, _mm512_cvtepi32_epi64(b));
    }
  }
  if (folded_sum != nullptr) *folded_sum = _mm512_reduce_add_epi64(usum);
  DigitsTail(x, i, n, p, sum, codes, folded, folded_sum);
}

bool F32AbsMaxAvx512(const float* x, int64_t n, float* max_abs) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    m = _mm512_max_ps(m, a);
    bad |= _mm512_fpclass_ps_mask(a, 0x01 | 0x80 | 0x08);  // QNaN, SNaN, +Inf (a = |x|)
  }
  float tail = 0.0f;
  const bool finite = F32AbsMaxImpl(x + i, n - i, &tail) && bad == 0;
  const float head = _mm512_reduce_max_ps(m);
  *max_abs = tail > head ? tail : head;
  return finite;
}

}  // namespace

constexpr KernelTable kAvx512Kernels = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  KernelTable t{};
  t.name = "avx512";
  t.quantize_sym = QuantizeAvx512<GridOp::kSym>;
  t.quantize_asym = QuantizeAvx512<GridOp::kAsym>;
  t.quantize_mid = QuantizeAvx512<GridOp::kMid>;
  t.stats = StatsAvx512;
  t.pack = PackImpl;
  t.f32_to_f64 = F32ToF64Impl;
  t.bf16_to_f64 = BF16ToF64Avx512;
  t.f16_to_f64 = F16ToF64Avx512;
  t.digits_mid = DigitsAvx512;
  t.f32_abs_max = F32AbsMaxAvx512;
  return t;
}();

}  // namespace fpxint::core::internal
