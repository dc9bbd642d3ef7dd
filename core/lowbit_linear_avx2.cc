// AVX2 + FMA primitives of core/lowbit_linear.h (this file is compiled with -mavx2 -mfma and
// only called when the CPU has both).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "core/internal/lowbit_linear_inl.h"
#include "core/lowbit_linear.h"
#include "core/packing.h"

namespace fpxint::core {
namespace {

// 8 codes starting at code index i (i % 8 == 0) as int32 lanes.
inline __m256i Load8(const uint8_t* packed, int64_t i, int bits, bool is_signed) {
  if (bits == 4 || bits == 2 || bits == 1) {
    const int per = 8 / bits;
    const uint8_t* p = packed + i / per;
    uint32_t word = 0;
    std::memcpy(&word, p, static_cast<size_t>(bits));  // 8 codes = `bits` bytes
    __m128i bytes = _mm_cvtsi32_si128(static_cast<int>(word));
    __m128i idx, shifts_lo;
    __m256i shifts;
    if (bits == 4) {
      idx = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0);
      shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    } else if (bits == 2) {
      idx = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
      shifts = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    } else {
      idx = _mm_setzero_si128();
      shifts = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    }
    (void)shifts_lo;
    __m256i v = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(bytes, idx));
    v = _mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi32((1 << bits) - 1));
    if (is_signed) {
      const __m256i sign = _mm256_set1_epi32(1 << (bits - 1));
      v = _mm256_sub_epi32(_mm256_xor_si256(v, sign), sign);
    }
    return v;
  }
  __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i));
  return is_signed ? _mm256_cvtepi8_epi32(b8) : _mm256_cvtepu8_epi32(b8);
}

void Decode(const uint8_t* packed, int64_t n, int bits, bool is_signed, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(Load8(packed, i, bits, is_signed)));
  }
  if (i < n) {  // the tail through the scalar reader (the row may end mid-byte)
    int32_t q[8];
    const int per = CodesPerByte(bits);
    UnpackCodes(packed + i / per, n - i, bits, is_signed, q);
    for (int64_t j = i; j < n; ++j) out[j] = static_cast<float>(q[j - i]);
  }
}

inline float Hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  float s = Hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void DotCodes(const uint8_t* packed, int bits, bool is_signed, const float* x, int64_t ldx, int B,
              int64_t n, float* acc) {
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                 _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 c = _mm256_cvtepi32_ps(Load8(packed, i, bits, is_signed));
    for (int b = 0; b < B; ++b) a[b] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x + b * ldx + i), a[b]);
  }
  for (int b = 0; b < B; ++b) acc[b] += Hsum(a[b]);
  if (i < n) {
    int32_t q[8];
    UnpackCodes(packed + (CodesPerByte(bits) > 1 ? i * bits / 8 : i), n - i, bits, is_signed, q);
    for (int b = 0; b < B; ++b) {
      for (int64_t j = i; j < n; ++j) acc[b] += static_cast<float>(q[j - i]) * x[b * ldx + j];
    }
  }
}

// An R × 16 register tile of outputs (two vectors of 8 activation rows, `lanes` of them valid):
// per input i, two activation loads and R broadcast weights, 2·R fused multiply-adds.
template <int R>
void GemmTile(const float* w, int64_t ldw, const float* xt, int64_t ldxt, int64_t n, int lanes,
              float* out, int64_t rs, int64_t bs) {
  alignas(32) static const int32_t kMask[24] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0,
                                                0,  0,  0,  0,  0,  0,  0,  0,  0, 0, 0, 0};
  const __m256i m0 =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - std::min(lanes, 8)));
  const __m256i m1 = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(kMask + 8 - std::max(0, std::min(lanes - 8, 8))));
  __m256 acc[2 * R];  // unrolled into registers (see the AVX-512 GemmTile)
#pragma GCC unroll 8
  for (int j = 0; j < 2 * R; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = xt + i * ldxt;
    const __m256 x0 = lanes >= 8 ? _mm256_loadu_ps(xi) : _mm256_maskload_ps(xi, m0);
    const __m256 x1 = lanes >= 16 ? _mm256_loadu_ps(xi + 8) : _mm256_maskload_ps(xi + 8, m1);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_set1_ps(w[r * ldw + i]);
      acc[2 * r] = _mm256_fmadd_ps(wv, x0, acc[2 * r]);
      acc[2 * r + 1] = _mm256_fmadd_ps(wv, x1, acc[2 * r + 1]);
    }
  }
  alignas(32) float t[16 * R];
#pragma GCC unroll 8
  for (int j = 0; j < 2 * R; ++j) _mm256_store_ps(t + 8 * j, acc[j]);
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < lanes; ++j) out[r * rs + j * bs] = t[16 * r + j];
  }
}

template <int R>
void GemmRowsXt(const float* w, int64_t ldw, const float* xt, int64_t ldxt, int64_t B, int64_t n,
                float* out, int64_t rs, int64_t bs) {
  for (int64_t b = 0; b < B; b += 16) {
    GemmTile<R>(w, ldw, xt + b, ldxt, n, static_cast<int>(std::min<int64_t>(16, B - b)),
                out + b * bs, rs, bs);
  }
}

void GemmXt(const float* w, int64_t ldw, int R, const float* xt, int64_t ldxt, int64_t B, int64_t n,
            float* out, int64_t rs, int64_t bs) {
  for (int r = 0; r < R; r += 4) {  // tiles of at most 4 rows: 8 accumulators of 16
    const float* wr = w + r * ldw;
    float* o = out + r * rs;
    switch (std::min(4, R - r)) {
      case 4:
        GemmRowsXt<4>(wr, ldw, xt, ldxt, B, n, o, rs, bs);
        break;
      case 3:
        GemmRowsXt<3>(wr, ldw, xt, ldxt, B, n, o, rs, bs);
        break;
      case 2:
        GemmRowsXt<2>(wr, ldw, xt, ldxt, B, n, o, rs, bs);
        break;
      default:
        GemmRowsXt<1>(wr, ldw, xt, ldxt, B, n, o, rs, bs);
        break;
    }
  }
}

void DecodeTerms(const uint8_t* const* packed, const int* bits, const bool* is_signed,
                 const float* s, const float* off, int K, int64_t n, bool accumulate, float* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 acc = accumulate ? _mm256_loadu_ps(y + i) : _mm256_setzero_ps();
    for (int k = 0; k < K; ++k) {
      const __m256 c = _mm256_add_ps(_mm256_cvtepi32_ps(Load8(packed[k], i, bits[k], is_signed[k])),
                                     _mm256_set1_ps(off[k]));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(s[k]), c, acc);
    }
    _mm256_storeu_ps(y + i, acc);
  }
  // The tail (the segment may end mid-byte) through the scalar reader, same operations.
  internal::DecodeTermsScalar(packed, bits, is_signed, s, off, K, i, n, accumulate, y);
}

void DecodeRows(const uint8_t* const* codes, const float* const* scale, const float* const* off,
                const bool* is_signed, int K, int bits, int64_t rows, int64_t row_bytes, int64_t n,
                float* out, int64_t ldo) {
  internal::DecodeRowsByRow(DecodeTerms, codes, scale, off, is_signed, K, bits, rows, row_bytes, n,
                            out, ldo);
}

constexpr LinearKernelTable kAvx2 = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  LinearKernelTable t{};
  t.name = "avx2";
  t.decode = Decode;
  t.dot = Dot;
  t.dot_codes = DotCodes;
  t.gemm_xt = GemmXt;
  t.decode_terms = DecodeTerms;
  t.decode_rows = DecodeRows;
  return t;
}();

}  // namespace

const LinearKernelTable& LinearKernelsAvx2() { return kAvx2; }

}  // namespace fpxint::core
