// AVX-512 (F, BW, VL, DQ) primitives of core/lowbit_linear.h (compiled with those ISAs; only
// called when the CPU has them).
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/runtime.h"
#include "core/internal/lowbit_linear_inl.h"
#include "core/lowbit_linear.h"
#include "core/packing.h"

namespace fpxint::core {
namespace {

// 16 codes of `bits` ∈ {1, 2, 4} bits from the low 2·bits bytes of `bytes`, code j in lane j's
// low bits (the bits above it still hold the following codes of the same byte).
inline __m512i SpreadCodes(__m128i bytes, int bits) {
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
  return _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(bytes, idx)), shifts);
}

// 16 codes starting at code index i (i % 16 == 0) as int32 lanes.
inline __m512i Load16(const uint8_t* packed, int64_t i, int bits, bool is_signed) {
  if (bits == 4 || bits == 2 || bits == 1) {
    const int per = 8 / bits;
    uint64_t word = 0;
    std::memcpy(&word, packed + i / per, static_cast<size_t>(2 * bits));  // 16 codes
    __m512i v = _mm512_and_si512(SpreadCodes(_mm_cvtsi64_si128(static_cast<long long>(word)), bits),
                                 _mm512_set1_epi32((1 << bits) - 1));
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
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                 _mm512_setzero_ps()};
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

// An R × 16·V register tile of outputs: per input i, V vectors of 16 activation rows (the last
// one masked to `last` lanes) and R broadcast weights, R·V fused multiply-adds.
// acc + broadcast(*w) · x with the broadcast folded into the multiply-add's memory operand
// ({1to16}): a load, not a shuffle, so the FMA pipes are not shared with broadcasts. GCC keeps
// _mm512_set1_ps(*w) as a separate vbroadcastss when the value is used more than once.
inline __m512 FmaBroadcast(const float* w, __m512 x, __m512 acc) {
  asm("vfmadd231ps %[w]%{1to16%}, %[x], %[acc]" : [acc] "+v"(acc) : [x] "v"(x), [w] "m"(*w));
  return acc;
}

template <int R, int V>
void GemmTile(const float* w, int64_t ldw, const float* xt, int64_t ldxt, int64_t n, __mmask16 last,
              float* out, int64_t rs, int64_t bs) {
  // Accumulators as separate values (GCC keeps an array of R·V vectors in memory and stores it
  // on every iteration).
  __m512 acc[R * V];
#pragma GCC unroll 16
  for (int j = 0; j < R * V; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = xt + i * ldxt;
    __m512 xv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      xv[v] = v == V - 1 ? _mm512_maskz_loadu_ps(last, xi + 16 * v) : _mm512_loadu_ps(xi + 16 * v);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v)
        acc[r * V + v] = FmaBroadcast(w + r * ldw + i, xv[v], acc[r * V + v]);
    }
  }
  if (bs == 1) {  // rows contiguous (the convolution layout): masked stores from registers
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        _mm512_mask_storeu_ps(out + r * rs + 16 * v, v == V - 1 ? last : __mmask16{0xFFFF},
                              acc[r * V + v]);
      }
    }
    return;
  }
  const int tail = __builtin_popcount(last);
  alignas(64) float t[R * V * 16];
#pragma GCC unroll 16
  for (int j = 0; j < R * V; ++j) _mm512_store_ps(t + 16 * j, acc[j]);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      const int lanes = v == V - 1 ? tail : 16;
      const float* src = t + 16 * (r * V + v);
      float* o = out + r * rs + 16 * v * bs;
      for (int j = 0; j < lanes; ++j) o[j * bs] = src[j];
    }
  }
}

template <int R>
void GemmRowsXt(const float* w, int64_t ldw, const float* xt, int64_t ldxt, int64_t B, int64_t n,
                float* out, int64_t rs, int64_t bs) {
  int64_t b = 0;
  for (; B - b >= 32; b += 32)
    GemmTile<R, 2>(w, ldw, xt + b, ldxt, n, 0xFFFF, out + b * bs, rs, bs);
  const int64_t left = B - b;
  if (left > 16) {
    GemmTile<R, 2>(w, ldw, xt + b, ldxt, n, static_cast<__mmask16>((1u << (left - 16)) - 1),
                   out + b * bs, rs, bs);
  } else if (left > 0) {
    GemmTile<R, 1>(w, ldw, xt + b, ldxt, n,
                   static_cast<__mmask16>(left == 16 ? 0xFFFFu : (1u << left) - 1), out + b * bs,
                   rs, bs);
  }
}

void GemmXt(const float* w, int64_t ldw, int R, const float* xt, int64_t ldxt, int64_t B, int64_t n,
            float* out, int64_t rs, int64_t bs) {
  switch (R) {
    case 8:
      return GemmRowsXt<8>(w, ldw, xt, ldxt, B, n, out, rs, bs);
    case 7:
      return GemmRowsXt<7>(w, ldw, xt, ldxt, B, n, out, rs, bs);
    case 6:
      return GemmRowsXt<6>(w, ldw, xt, ldxt, B, n, out, rs, bs);
    case 5:
      return GemmRowsXt<5>(w, ldw, xt, ldxt, B, n, out, rs, bs);
    case 4:
      return GemmRowsXt<4>(w, ldw, xt, ldxt, B, n, out, rs, bs);
    case 3:
      return GemmRowsXt<3>(w, ldw, xt, ldxt, B, n, out, rs, bs);
    case 2:
      return GemmRowsXt<2>(w, ldw, xt, ldxt, B, n, out, rs, bs);
    default:
      return GemmRowsXt<1>(w, ldw, xt, ldxt, B, n, out, rs, bs);
  }
}

// ---- gemm_wr: weight rows in the lanes, activations row-major ----

// r[c] = column c of the 16×16 block whose row q was r[q].
inline void Transpose16(__m512* r) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int q = 0; q < 16; q += 2) {  // per 128-bit lane j: rows q, q+1 interleaved
    t[q] = _mm512_unpacklo_ps(r[q], r[q + 1]);      // q[4j], q+1[4j], q[4j+1], q+1[4j+1]
    t[q + 1] = _mm512_unpackhi_ps(r[q], r[q + 1]);  // ... [4j+2], [4j+3]
  }
  __m512 u[16];  // u[4g + e], lane j: column 4j + e of rows 4g..4g+3
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {  // the 4×4 transpose of 128-bit lanes across the row groups
    const __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + e] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + e] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// Inputs per transposed chunk: a 32 KiB panel, in L1 while every activation row passes over it.
constexpr int64_t kPanelChunk = 256;

// Inputs [i0, i0 + len) of R ≤ kPanelRows weight rows, transposed: wt[j·kPanelRows + r] (rows
// R..31 of the 16-row halves in use are zero).
void TransposePanel(const float* w, int64_t ldw, int R, int64_t i0, int64_t len, float* wt) {
  for (int h = 0; h * 16 < R; ++h) {
    for (int64_t j0 = 0; j0 < len; j0 += 16) {
      const int64_t cols = std::min<int64_t>(16, len - j0);
      const __mmask16 m = static_cast<__mmask16>(cols == 16 ? 0xFFFFu : (1u << cols) - 1);
      __m512 r[16];
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) {
        const int row = 16 * h + q;
        r[q] = row < R ? _mm512_maskz_loadu_ps(m, w + row * ldw + i0 + j0) : _mm512_setzero_ps();
      }
      Transpose16(r);
      for (int64_t c = 0; c < cols; ++c) _mm512_store_ps(wt + (j0 + c) * kPanelRows + 16 * h, r[c]);
    }
  }
}

// MR activation rows × 16·V weight rows over one transposed chunk, continuing the chains in
// `out` when `accumulate`; the last vector's lanes masked by `last`.
template <int MR, int V>
void PanelTile(const float* wt, const float* x, int64_t ldx, int64_t len, bool accumulate,
               __mmask16 last, float* out, int64_t ldo) {
  __m512 acc[MR * V];
#pragma GCC unroll 24
  for (int j = 0; j < MR * V; ++j) {
    const int r = j / V, v = j % V;
    const __mmask16 m = v == V - 1 ? last : __mmask16{0xFFFF};
    acc[j] = accumulate ? _mm512_maskz_loadu_ps(m, out + r * ldo + 16 * v) : _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < len; ++i) {
    const __m512 w0 = _mm512_load_ps(wt + i * kPanelRows);
    const __m512 w1 = V == 2 ? _mm512_load_ps(wt + i * kPanelRows + 16) : w0;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + i]);  // one broadcast for both vectors
      acc[r * V] = _mm512_fmadd_ps(xb, w0, acc[r * V]);
      if (V == 2) acc[r * V + 1] = _mm512_fmadd_ps(xb, w1, acc[r * V + 1]);
    }
  }
#pragma GCC unroll 24
  for (int j = 0; j < MR * V; ++j) {
    const int r = j / V, v = j % V;
    _mm512_mask_storeu_ps(out + r * ldo + 16 * v, v == V - 1 ? last : __mmask16{0xFFFF}, acc[j]);
  }
}

constexpr int kPanelTileRows = 12;  // 24 accumulators and 2 weight vectors of the 32 registers

template <int V, int MR = kPanelTileRows>
void PanelTail(int64_t rows, const float* wt, const float* x, int64_t ldx, int64_t len,
               bool accumulate, __mmask16 last, float* out, int64_t ldo) {
  if constexpr (MR > 0) {
    if (rows == MR) return PanelTile<MR, V>(wt, x, ldx, len, accumulate, last, out, ldo);
    return PanelTail<V, MR - 1>(rows, wt, x, ldx, len, accumulate, last, out, ldo);
  }
}

template <int V>
void PanelRows(const float* wt, const float* x, int64_t ldx, int64_t B, int64_t len,
               bool accumulate, __mmask16 last, float* out, int64_t ldo) {
  int64_t b = 0;
  for (; b + kPanelTileRows <= B; b += kPanelTileRows) {
    PanelTile<kPanelTileRows, V>(wt, x + b * ldx, ldx, len, accumulate, last, out + b * ldo, ldo);
  }
  if (b < B) PanelTail<V>(B - b, wt, x + b * ldx, ldx, len, accumulate, last, out + b * ldo, ldo);
}

void GemmWr(const float* w, int64_t ldw, int R, const float* x, int64_t ldx, int64_t B, int64_t n,
            float* out, int64_t ldo) {
  if (n <= 0) {
    for (int64_t b = 0; b < B; ++b) std::memset(out + b * ldo, 0, sizeof(float) * R);
    return;
  }
  alignas(64) float wt[kPanelChunk * kPanelRows];
  const int lanes = R > 16 ? R - 16 : R;
  const __mmask16 last = static_cast<__mmask16>(lanes == 16 ? 0xFFFFu : (1u << lanes) - 1);
  for (int64_t i0 = 0; i0 < n; i0 += kPanelChunk) {
    const int64_t len = std::min(kPanelChunk, n - i0);
    TransposePanel(w, ldw, R, i0, len, wt);
    if (R > 16) {
      PanelRows<2>(wt, x + i0, ldx, B, len, i0 > 0, last, out, ldo);
    } else {
      PanelRows<1>(wt, x + i0, ldx, B, len, i0 > 0, last, out, ldo);
    }
  }
}

// ---- depthwise_row ----

// Up to V·16 outputs from o: the kh·kw taps, each broadcast against V unaligned input vectors,
// one FMA chain per output in (i, j) order; the last vector masked by `last`.
template <int V>
inline void DepthwiseBlock(const float* const* rows, const float* w, int kh, int kw, int64_t o,
                           __mmask16 last, float* out) {
  __m512 acc[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
  for (int i = 0; i < kh; ++i) {
    const float* r = rows[i] + o;
    for (int j = 0; j < kw; ++j) {
      const __m512 wv = _mm512_set1_ps(w[i * kw + j]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const __m512 xv = v == V - 1 ? _mm512_maskz_loadu_ps(last, r + j + 16 * v)
                                     : _mm512_loadu_ps(r + j + 16 * v);
        acc[v] = _mm512_fmadd_ps(wv, xv, acc[v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    _mm512_mask_storeu_ps(out + o + 16 * v, v == V - 1 ? last : __mmask16{0xFFFF}, acc[v]);
  }
}

void DepthwiseRow(const float* const* rows, const float* w, int kh, int kw, int64_t n, float* out) {
  int64_t o = 0;
  for (; o + 64 <= n; o += 64) DepthwiseBlock<4>(rows, w, kh, kw, o, 0xFFFF, out);
  const int64_t left = n - o;
  if (left == 0) return;
  const int vectors = static_cast<int>((left + 15) / 16);
  const int tail = static_cast<int>(left - 16 * (vectors - 1));
  const __mmask16 last = static_cast<__mmask16>(tail == 16 ? 0xFFFFu : (1u << tail) - 1);
  switch (vectors) {
    case 1:
      return DepthwiseBlock<1>(rows, w, kh, kw, o, last, out);
    case 2:
      return DepthwiseBlock<2>(rows, w, kh, kw, o, last, out);
    case 3:
      return DepthwiseBlock<3>(rows, w, kh, kw, o, last, out);
    default:
      return DepthwiseBlock<4>(rows, w, kh, kw, o, last, out);
  }
}

// The batch-1 kernels stream the packed codes from memory once, a row (a few KiB) at a time.
// The hardware prefetcher restarts at every 4 KiB page and every row task; a software prefetch
// this many bytes ahead keeps more reads in flight (an interleaved two-thread A/B of this loop
// over 8 MiB of 4-bit codes: 1.2-1.3x at 1024 bytes, less at 128-512). FPXINT_PREFETCH_BYTES
// overrides it (0 turns it off; core/runtime.h).
const int64_t kPrefetchBytes = Runtime().prefetch_bytes;
inline void Prefetch(const uint8_t* p) {
  if (kPrefetchBytes > 0)
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
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
float DotPackedOne(const uint8_t* packed, const __m512 lut, const float* xp, int64_t n,
                   int64_t* done) {
  constexpr int kPer = 8 / BITS, kBlk = 16 * kPer;
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                 _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 2 * kBlk <= n; i += 2 * kBlk) {
    Prefetch(packed + i / kPer);
    const __m512i v0 =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / kPer)));
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
void DotPacked(const uint8_t* packed, bool is_signed, const float* xp, int64_t ldx, int B,
               int64_t n, float* acc) {
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
    const __m512i v =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / kPer)));
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

// 16 codes of BITS ∈ {1, 2, 4} bits from the low 2·BITS bytes of `bytes`, plus the offset, as
// floats through the 16-entry table (entry c = the value of code c plus off: the same single
// rounding as cvt(c) + off). vpermps reads the low 4 bits of each lane, the code and the bits
// above it, which the table ignores (entry c holds the value of c mod 2^BITS).
template <int BITS>
inline __m512 PackedPlusOff(__m128i bytes, __m512 lut) {
  return _mm512_permutexvar_ps(SpreadCodes(bytes, BITS), lut);
}

// One row of decode_terms when every term has BITS ∈ {1, 2, 4} bits, given each term's table
// (code value plus offset) and scale: 2·BITS bytes per 16 codes, the tail masked (only its own
// bytes are read).
template <int BITS>
inline void DecodeRowPacked(const uint8_t* const* packed, const __m512* lut, const __m512* sv,
                            int K, int64_t n, bool accumulate, float* y) {
  constexpr int kBytes = 2 * BITS;  // per 16 codes
  int64_t i = 0, byte = 0;
  for (; i + 16 <= n; i += 16, byte += kBytes) {
    __m512 acc = accumulate ? _mm512_loadu_ps(y + i) : _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
      uint64_t word = 0;
      std::memcpy(&word, packed[k] + byte, kBytes);
      acc = _mm512_fmadd_ps(
          sv[k], PackedPlusOff<BITS>(_mm_cvtsi64_si128(static_cast<long long>(word)), lut[k]), acc);
    }
    _mm512_storeu_ps(y + i, acc);
  }
  if (i < n) {
    const int64_t len = n - i;
    const __mmask16 m = static_cast<__mmask16>((1u << len) - 1);
    // Only the tail's own bytes, by a masked load (no variable-length memcpy call per row).
    const __mmask16 mb = static_cast<__mmask16>((1u << ((len * BITS + 7) / 8)) - 1);
    __m512 acc = accumulate ? _mm512_maskz_loadu_ps(m, y + i) : _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
      acc = _mm512_fmadd_ps(
          sv[k], PackedPlusOff<BITS>(_mm_maskz_loadu_epi8(mb, packed[k] + byte), lut[k]), acc);
    }
    _mm512_mask_storeu_ps(y + i, m, acc);
  }
}

template <int BITS>
void DecodeTermsPacked(const uint8_t* const* packed, const bool* is_signed, const float* s,
                       const float* off, int K, int64_t n, bool accumulate, float* y) {
  __m512 lut[kMaxDecodeTerms], sv[kMaxDecodeTerms];
  for (int k = 0; k < K; ++k) {
    lut[k] = _mm512_add_ps(_mm512_load_ps(kLuts.v[is_signed[k]][BITS]), _mm512_set1_ps(off[k]));
    sv[k] = _mm512_set1_ps(s[k]);
  }
  DecodeRowPacked<BITS>(packed, lut, sv, K, n, accumulate, y);
}

// decode_rows: the code tables loaded once, each row's table (plus its offset) and scale set
// up inline.
template <int BITS>
void DecodeRowsPacked(const uint8_t* const* codes, const float* const* scale,
                      const float* const* off, const bool* is_signed, int K, int64_t rows,
                      int64_t row_bytes, int64_t n, float* out, int64_t ldo) {
  __m512 base[kMaxDecodeTerms], lut[kMaxDecodeTerms], sv[kMaxDecodeTerms];
  const uint8_t* packed[kMaxDecodeTerms];
  for (int k = 0; k < K; ++k) base[k] = _mm512_load_ps(kLuts.v[is_signed[k]][BITS]);
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < K; ++k) {
      lut[k] = _mm512_add_ps(base[k], _mm512_set1_ps(off[k][r]));
      sv[k] = _mm512_set1_ps(scale[k][r]);
      packed[k] = codes[k] + r * row_bytes;
    }
    DecodeRowPacked<BITS>(packed, lut, sv, K, n, /*accumulate=*/false, out + r * ldo);
  }
}

void DecodeTerms(const uint8_t* const* packed, const int* bits, const bool* is_signed,
                 const float* s, const float* off, int K, int64_t n, bool accumulate, float* y) {
  bool same = true;
  for (int k = 1; k < K; ++k) same = same && bits[k] == bits[0];
  if (same && bits[0] == 4)
    return DecodeTermsPacked<4>(packed, is_signed, s, off, K, n, accumulate, y);
  if (same && bits[0] == 2)
    return DecodeTermsPacked<2>(packed, is_signed, s, off, K, n, accumulate, y);
  if (same && bits[0] == 1)
    return DecodeTermsPacked<1>(packed, is_signed, s, off, K, n, accumulate, y);
  for (int k = 0; k < K; ++k) {
    if (bits[k] == 4 || bits[k] == 2 || bits[k] == 1) {
      // Packed codes of mixed widths (no expansion makes them: every term has the same b): the
      // scalar form, which is the definition.
      return internal::DecodeTermsScalar(packed, bits, is_signed, s, off, K, 0, n, accumulate, y);
    }
  }
  // Byte codes: one code per byte for b ∉ {1, 2, 4}, the tail masked.
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t len = std::min<int64_t>(16, n - i);
    const __mmask16 m = static_cast<__mmask16>(len == 16 ? 0xFFFFu : (1u << len) - 1);
    __m512 acc = accumulate ? _mm512_maskz_loadu_ps(m, y + i) : _mm512_setzero_ps();
    for (int k = 0; k < K; ++k) {
      const __m128i b16 = _mm_maskz_loadu_epi8(m, packed[k] + i);
      const __m512i q = is_signed[k] ? _mm512_cvtepi8_epi32(b16) : _mm512_cvtepu8_epi32(b16);
      const __m512 c = _mm512_add_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(off[k]));
      acc = _mm512_fmadd_ps(_mm512_set1_ps(s[k]), c, acc);
    }
    _mm512_mask_storeu_ps(y + i, m, acc);
  }
}

void DotCodesPermTerms(const uint8_t* const* packed, const bool* is_signed, int K, int bits,
                       const float* xp, int64_t n, float* acc) {
  switch (bits) {
    case 4:
      return DotPackedTerms<4>(packed, is_signed, K, xp, n, acc);
    case 2:
      return DotPackedTerms<2>(packed, is_signed, K, xp, n, acc);
    default:
      return DotPackedTerms<1>(packed, is_signed, K, xp, n, acc);
  }
}

void DotCodesPerm(const uint8_t* packed, int bits, bool is_signed, const float* xp, int64_t ldx,
                  int B, int64_t n, float* acc) {
  switch (bits) {
    case 4:
      return DotPacked<4>(packed, is_signed, xp, ldx, B, n, acc);
    case 2:
      return DotPacked<2>(packed, is_signed, xp, ldx, B, n, acc);
    default:
      return DotPacked<1>(packed, is_signed, xp, ldx, B, n, acc);
  }
}

void DecodeRows(const uint8_t* const* codes, const float* const* scale, const float* const* off,
                const bool* is_signed, int K, int bits, int64_t rows, int64_t row_bytes, int64_t n,
                float* out, int64_t ldo) {
  switch (bits) {
    case 4:
      return DecodeRowsPacked<4>(codes, scale, off, is_signed, K, rows, row_bytes, n, out, ldo);
    case 2:
      return DecodeRowsPacked<2>(codes, scale, off, is_signed, K, rows, row_bytes, n, out, ldo);
    case 1:
      return DecodeRowsPacked<1>(codes, scale, off, is_signed, K, rows, row_bytes, n, out, ldo);
    default:  // byte codes
      return internal::DecodeRowsByRow(DecodeTerms, codes, scale, off, is_signed, K, bits, rows,
                                       row_bytes, n, out, ldo);
  }
}

constexpr LinearKernelTable kAvx512 = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  LinearKernelTable t{};
  t.name = "avx512";
  t.decode = Decode;
  t.dot = Dot;
  t.dot_codes = DotCodes;
  t.gemm_xt = GemmXt;
  t.perm_block = PermBlock;
  t.permute_x = PermuteX;
  t.dot_codes_perm = DotCodesPerm;
  t.dot_codes_perm_terms = DotCodesPermTerms;
  t.decode_terms = DecodeTerms;
  t.decode_rows = DecodeRows;
  t.gemm_wr = GemmWr;
  t.depthwise_row = DepthwiseRow;
  return t;
}();

}  // namespace

const LinearKernelTable& LinearKernelsAvx512() { return kAvx512; }

}  // namespace fpxint::core
