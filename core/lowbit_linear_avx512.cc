// AVX-512 (F, BW, VL, DQ) primitives of core/lowbit_linear.h (compiled with those ISAs; only
// called when the CPU has them).
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

#include "core/internal/lowbit_linear_inl.h"
#include "core/lowbit_linear.h"
#include "core/packing.h"

namespace fpxint::core {
namespace {

// 16 codes starting at code index i (i % 16 == 0) as int32 lanes.
inline __m512i Load16(const uint8_t* packed, int64_t i, int bits, bool is_signed) {
  if (bits == 4 || bits == 2 || bits == 1) {
    const int per = 8 / bits;
    uint64_t word = 0;
    std::memcpy(&word, packed + i / per, static_cast<size_t>(2 * bits));  // 16 codes
    const __m128i bytes = _mm_cvtsi64_si128(static_cast<long long>(word));
    __m128i idx;
    __m512i shifts;
    if (bits == 4) {
      idx = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
      shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    } else if (bits == 2) {
      idx = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
      shifts = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
    } else {
      idx = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      shifts = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
    }
    __m512i v = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(bytes, idx));
    v = _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32((1 << bits) - 1));
    if (is_signed) {
      const __m512i sign = _mm512_set1_epi32(1 << (bits - 1));
      v = _mm512_sub_epi32(_mm512_xor_si512(v, sign), sign);
    }
    return v;
  }
  const __m128i b16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i));
  return is_signed ? _mm512_cvtepi8_epi32(b16) : _mm512_cvtepu8_epi32(b16);
}

void Decode(const uint8_t* packed, int64_t n, int bits, bool is_signed, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_cvtepi32_ps(Load16(packed, i, bits, is_signed)));
  }
  if (i < n) {
    int32_t q[16];
    const int per = CodesPerByte(bits);
    UnpackCodes(packed + i / per, n - i, bits, is_signed, q);
    for (int64_t j = i; j < n; ++j) out[j] = static_cast<float>(q[j - i]);
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), acc3);
  }
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}

void DotCodes(const uint8_t* packed, int bits, bool is_signed, const float* x, int64_t ldx, int B,
              int64_t n, float* acc) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 c = _mm512_cvtepi32_ps(Load16(packed, i, bits, is_signed));
    for (int b = 0; b < B; ++b) a[b] = _mm512_fmadd_ps(c, _mm512_loadu_ps(x + b * ldx + i), a[b]);
  }
  for (int b = 0; b < B; ++b) acc[b] += _mm512_reduce_add_ps(a[b]);
  if (i < n) {
    int32_t q[16];
    UnpackCodes(packed + (CodesPerByte(bits) > 1 ? i * bits / 8 : i), n - i, bits, is_signed, q);
    for (int b = 0; b < B; ++b) {
      for (int64_t j = i; j < n; ++j) acc[b] += static_cast<float>(q[j - i]) * x[b * ldx + j];
    }
  }
}

template <int R, int B>
void Tile(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t n, float* out) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 xv[B];
    for (int b = 0; b < B; ++b) xv[b] = _mm512_loadu_ps(x + b * ldx + i);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * ldw + i);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) {
      float s = _mm512_reduce_add_ps(acc[r][b]);
      for (int64_t j = i; j < n; ++j) s += w[r * ldw + j] * x[b * ldx + j];
      out[r * B + b] = s;
    }
  }
}

void TileDots(const float* w, int64_t ldw, int R, const float* x, int64_t ldx, int B, int64_t n,
              float* out) {
  if (R == 4 && B == 4) return Tile<4, 4>(w, ldw, x, ldx, n, out);
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) Tile<1, 1>(w + r * ldw, ldw, x + b * ldx, ldx, n, out + r * B + b);
  }
}

// The batch-1 kernels stream the packed codes from memory once, a row (a few KiB) at a time.
// The hardware prefetcher restarts at every 4 KiB page and every row task; a software prefetch
// this many bytes ahead keeps more reads in flight (an interleaved two-thread A/B of this loop
// over 8 MiB of 4-bit codes: 1.2-1.3x at 1024 bytes, less at 128-512). FPXINT_PREFETCH_BYTES
// overrides it (0 turns it off).
const int64_t kPrefetchBytes = [] {
  const char* e = std::getenv("FPXINT_PREFETCH_BYTES");
  return e != nullptr && *e != '\0' ? std::strtoll(e, nullptr, 10) : int64_t{1024};
}();
inline void Prefetch(const uint8_t* p) {
  if (kPrefetchBytes > 0) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
}

// ---- table-lookup decoding of packed codes ---------------------------------------------------
// 16 bytes of packed b-bit codes are widened to 16 dword lanes; shifting by s·b and using the low
// 4 bits as an index into a 16-float table (entry i = the value of code i mod 2^b) decodes the
// 16 codes at positions j·(8/b) + s of the block. The activations are reordered the same way.

int PermBlock(int bits) { return bits == 1 || bits == 2 || bits == 4 ? 16 * (8 / bits) : 0; }

void PermuteX(const float* x, int64_t n, int bits, float* out) {
  const int per = 8 / bits, blk = 16 * per;
  int64_t i = 0;
  for (; i + blk <= n; i += blk) {
    for (int s = 0; s < per; ++s) {
      for (int j = 0; j < 16; ++j) out[i + s * 16 + j] = x[i + j * per + s];
    }
  }
  for (; i < n; ++i) out[i] = x[i];
}

struct Luts {
  alignas(64) float v[2][9][16];  // [signed][bits][index]
  Luts() {
    for (int sg = 0; sg < 2; ++sg) {
      for (int b : {1, 2, 4}) {
        for (int i = 0; i < 16; ++i) {
          const int c = i & ((1 << b) - 1);
          v[sg][b][i] = static_cast<float>(sg && (c >> (b - 1)) ? c - (1 << b) : c);
        }
      }
    }
  }
};
const Luts kLuts;

// One activation row: four independent accumulators over two blocks at a time, so that the FMA
// latency (not its throughput) does not set the pace.
template <int BITS>
float DotPackedOne(const uint8_t* packed, const __m512 lut, const float* xp, int64_t n, int64_t* done) {
  constexpr int kPer = 8 / BITS, kBlk = 16 * kPer;
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 2 * kBlk <= n; i += 2 * kBlk) {
    Prefetch(packed + i / kPer);
    const __m512i v0 = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / kPer)));
    const __m512i v1 = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (i + kBlk) / kPer)));
#pragma GCC unroll 8
    for (int s = 0; s < kPer; ++s) {
      const __m512 c0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, s * BITS), lut);
      const __m512 c1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, s * BITS), lut);
      a[(2 * s) & 3] = _mm512_fmadd_ps(c0, _mm512_loadu_ps(xp + i + s * 16), a[(2 * s) & 3]);
      a[(2 * s + 1) & 3] =
          _mm512_fmadd_ps(c1, _mm512_loadu_ps(xp + i + kBlk + s * 16), a[(2 * s + 1) & 3]);
    }
  }
  *done = i;
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
}

template <int BITS>
void DotPacked(const uint8_t* packed, bool is_signed, const float* xp, int64_t ldx, int B, int64_t n,
               float* acc) {
  constexpr int kPer = 8 / BITS, kBlk = 16 * kPer;
  const __m512 lut = _mm512_load_ps(kLuts.v[is_signed][BITS]);
  if (B == 1) {  // the latency-bound case: split it
    int64_t done = 0;
    acc[0] += DotPackedOne<BITS>(packed, lut, xp, n, &done);
    packed += done / kPer;
    xp += done;
    n -= done;
  }
  __m512 a[8];
  for (__m512& v : a) v = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kBlk <= n; i += kBlk) {
    const __m512i v = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / kPer)));
#pragma GCC unroll 8
    for (int s = 0; s < kPer; ++s) {
      const __m512 c = _mm512_permutexvar_ps(_mm512_srli_epi32(v, s * BITS), lut);
      for (int b = 0; b < B; ++b) {
        a[b] = _mm512_fmadd_ps(c, _mm512_loadu_ps(xp + b * ldx + i + s * 16), a[b]);
      }
    }
  }
  for (int b = 0; b < B; ++b) acc[b] += _mm512_reduce_add_ps(a[b]);
  if (i < n) {  // the tail is in natural order
    int32_t q[kBlk];
    UnpackCodes(packed + i / kPer, n - i, BITS, is_signed, q);
    for (int b = 0; b < B; ++b) {
      for (int64_t j = i; j < n; ++j) acc[b] += static_cast<float>(q[j - i]) * xp[b * ldx + j];
    }
  }
}

// K ≤ 4 terms over one activation row in one pass: each block of activations is loaded once
// and used by every term; two accumulators per term keep the FMA chains independent.
template <int BITS>
void DotPackedTerms(const uint8_t* const* packed, const bool* is_signed, int K, const float* xp,
                    int64_t n, float* acc) {
  constexpr int kPer = 8 / BITS, kBlk = 16 * kPer;
  __m512 lut[4];
  __m512 a[4][2];
  for (int k = 0; k < K; ++k) {
    lut[k] = _mm512_load_ps(kLuts.v[is_signed[k]][BITS]);
    a[k][0] = a[k][1] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + kBlk <= n; i += kBlk) {
    __m512 xv[kPer];
    for (int s = 0; s < kPer; ++s) xv[s] = _mm512_loadu_ps(xp + i + s * 16);
    for (int k = 0; k < K; ++k) {
      Prefetch(packed[k] + i / kPer);
      const __m512i v = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed[k] + i / kPer)));
#pragma GCC unroll 8
      for (int s = 0; s < kPer; ++s) {
        const __m512 c = _mm512_permutexvar_ps(_mm512_srli_epi32(v, s * BITS), lut[k]);
        a[k][s & 1] = _mm512_fmadd_ps(c, xv[s], a[k][s & 1]);
      }
    }
  }
  for (int k = 0; k < K; ++k) {
    acc[k] += _mm512_reduce_add_ps(_mm512_add_ps(a[k][0], a[k][1]));
    if (i < n) {  // the tail is in natural order
      int32_t q[kBlk];
      UnpackCodes(packed[k] + i / kPer, n - i, BITS, is_signed[k], q);
      for (int64_t j = i; j < n; ++j) acc[k] += static_cast<float>(q[j - i]) * xp[j];
    }
  }
}

void DecodeTerms(const uint8_t* const* packed, const int* bits, const bool* is_signed,
                 const float* s, const float* off, int K, int64_t n, bool accumulate, float* y) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 acc = accumulate ? _mm512_loadu_ps(y + i) : _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
      const __m512 c = _mm512_add_ps(
          _mm512_cvtepi32_ps(Load16(packed[k], i, bits[k], is_signed[k])), _mm512_set1_ps(off[k]));
      acc = _mm512_fmadd_ps(_mm512_set1_ps(s[k]), c, acc);
    }
    _mm512_storeu_ps(y + i, acc);
  }
  // The tail (the segment may end mid-byte) through the scalar reader, same operations.
  internal::DecodeTermsScalar(packed, bits, is_signed, s, off, K, i, n, accumulate, y);
}

void DotCodesPermTerms(const uint8_t* const* packed, const bool* is_signed, int K, int bits,
                       const float* xp, int64_t n, float* acc) {
  switch (bits) {
    case 4: return DotPackedTerms<4>(packed, is_signed, K, xp, n, acc);
    case 2: return DotPackedTerms<2>(packed, is_signed, K, xp, n, acc);
    default: return DotPackedTerms<1>(packed, is_signed, K, xp, n, acc);
  }
}

void DotCodesPerm(const uint8_t* packed, int bits, bool is_signed, const float* xp, int64_t ldx,
                  int B, int64_t n, float* acc) {
  switch (bits) {
    case 4: return DotPacked<4>(packed, is_signed, xp, ldx, B, n, acc);
    case 2: return DotPacked<2>(packed, is_signed, xp, ldx, B, n, acc);
    default: return DotPacked<1>(packed, is_signed, xp, ldx, B, n, acc);
  }
}

const LinearKernelTable kAvx512 = {"avx512",          Decode,     Dot,      DotCodes,
                                   TileDots,          PermBlock,  PermuteX, DotCodesPerm,
                                   DotCodesPermTerms, DecodeTerms};

}  // namespace

const LinearKernelTable& LinearKernelsAvx512() { return kAvx512; }

}  // namespace fpxint::core
