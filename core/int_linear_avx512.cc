// AVX-512 VNNI primitives of core/int_linear.h (compiled with -mavx512vnni; only called when the
// CPU has it): vpdpbusd multiplies 64 u8 activation codes by 64 s8 weight codes and adds groups
// of four products into 16 int32 lanes, exactly.
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "core/int_linear.h"

namespace fpxint::core {

// The row unpacking is 256-bit work: the AVX2 variant's (int_linear_avx2.cc).
void UnpackIntRowAvx2(const uint8_t* packed, int64_t n, int bits, int8_t* out);

namespace {

// acc + the four-product sums of x·w, in place. GCC 12 keeps the intrinsic's accumulators of a
// panel product in registers only with the instruction's tied operand spelled out: through
// _mm512_dpbusd_epi32 it copies and spills them on every group (half the speed with a
// prefetch in the loop). Clang allocates either form well.
inline __m512i Dpbusd(__m512i acc, __m512i x, __m512i w) {
#if defined(__GNUC__) && !defined(__clang__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, x, w);
#endif
}

// Lane k of the result = the sum of the 16 lanes of a[k] (a transposing reduction: ~45
// instructions for 16 sums instead of 16 separate horizontal reductions).
inline __m512i Reduce16(const __m512i* a) {
  __m512i t[8];
  for (int k = 0; k < 8; ++k) {  // per 128-bit lane: [a2k(0+2), a2k+1(0+2), a2k(1+3), a2k+1(1+3)]
    t[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * k], a[2 * k + 1]),
                            _mm512_unpackhi_epi32(a[2 * k], a[2 * k + 1]));
  }
  __m512i u[4];
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane L: the lane-L sums of a4k .. a4k+3
    u[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * k], t[2 * k + 1]),
                            _mm512_unpackhi_epi64(t[2 * k], t[2 * k + 1]));
  }
  const __m512i w01 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88),
                                       _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
  const __m512i w23 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88),
                                       _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w01, w23, 0x88),
                          _mm512_shuffle_i32x4(w01, w23, 0xDD));
}

template <int R, int B>
void DotTileT(const int8_t* w, int64_t ldw, const uint8_t* x, int64_t ldx, int64_t n,
              int32_t* out) {
  __m512i acc[R][B];
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_si512();
  }
  for (int64_t c = 0; c < n; c += 64) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + r * ldw + c);
    for (int b = 0; b < B; ++b) {
      const __m512i xv = _mm512_loadu_si512(x + b * ldx + c);
      for (int r = 0; r < R; ++r) acc[r][b] = Dpbusd(acc[r][b], xv, wv[r]);
    }
  }
  if constexpr (R == 4 && B == 4) {
    _mm512_storeu_si512(out, Reduce16(&acc[0][0]));
  } else {
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < B; ++b) out[r * B + b] = _mm512_reduce_add_epi32(acc[r][b]);
    }
  }
}

using TileFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int64_t, int32_t*);
template <int R>
constexpr TileFn kRow[4] = {DotTileT<R, 1>, DotTileT<R, 2>, DotTileT<R, 3>, DotTileT<R, 4>};
constexpr const TileFn* kTiles[4] = {kRow<1>, kRow<2>, kRow<3>, kRow<4>};

void DotTile(const int8_t* w, int64_t ldw, int R, const uint8_t* x, int64_t ldx, int B, int64_t n,
             int32_t* out) {
  kTiles[R - 1][B - 1](w, ldw, x, ldx, n, out);
}

// Software prefetch kPrefetchBytes ahead of the panel stream. A panel product reads its panel
// once, front to back; at few activation rows the hardware prefetcher alone leaves the VNNI unit
// waiting on L3 and memory (measured: 0.57 products per cycle streaming, 0.94 with this, 0.97 with
// the panel in L1). Past the last group it touches the next panel, which the next task reads.
constexpr int64_t kPrefetchBytes = 4096;
inline void PrefetchPanel(const void* p, int64_t offset) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p) + offset + kPrefetchBytes;
  _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T0);
}

// The panel product: per group of 8 input codes, the two 64-byte halves of the panel (16 rows ×
// 4 packed bytes each) become four s8 vectors in registers (low nibbles: the even codes, high:
// the odd ones, sign-extended through a 16-entry table); each activation row broadcasts its 4
// even and 4 odd codes against them. B rows × 32 outputs stay in 2·B accumulators.
template <int B>
void GemmPanelT(const uint8_t* panel, int64_t groups, const uint8_t* x, int64_t ldx,
                int32_t* out) {
  const __m512i lut = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1));
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512i acc[B][2];
  for (int b = 0; b < B; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    PrefetchPanel(panel, g * 128);
    PrefetchPanel(panel, g * 128 + 64);
    const __m512i w0 = _mm512_loadu_si512(panel + g * 128);
    const __m512i w1 = _mm512_loadu_si512(panel + g * 128 + 64);
    const __m512i l0 = _mm512_shuffle_epi8(lut, _mm512_and_si512(w0, mask));
    const __m512i h0 = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(w0, 4), mask));
    const __m512i l1 = _mm512_shuffle_epi8(lut, _mm512_and_si512(w1, mask));
    const __m512i h1 = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(w1, 4), mask));
    for (int b = 0; b < B; ++b) {
      int32_t e, o;
      std::memcpy(&e, x + b * ldx + 8 * g, 4);
      std::memcpy(&o, x + b * ldx + 8 * g + 4, 4);
      const __m512i xe = _mm512_set1_epi32(e), xo = _mm512_set1_epi32(o);
      acc[b][0] = Dpbusd(Dpbusd(acc[b][0], xe, l0), xo, h0);
      acc[b][1] = Dpbusd(Dpbusd(acc[b][1], xe, l1), xo, h1);
    }
  }
  for (int b = 0; b < B; ++b) {
    _mm512_storeu_si512(out + b * kIntPanelRows, acc[b][0]);
    _mm512_storeu_si512(out + b * kIntPanelRows + 16, acc[b][1]);
  }
}

using PanelFn = void (*)(const uint8_t*, int64_t, const uint8_t*, int64_t, int32_t*);
template <size_t... I>
constexpr std::array<PanelFn, sizeof...(I)> PanelTable(std::index_sequence<I...>) {
  return {GemmPanelT<static_cast<int>(I) + 1>...};
}
constexpr auto kPanels = PanelTable(std::make_index_sequence<kIntGemmRows>());

void GemmPanel(const uint8_t* panel, int64_t groups, const uint8_t* x, int64_t ldx, int B,
               int32_t* out) {
  kPanels[B - 1](panel, groups, x, ldx, out);
}

// The s8 panel product (FoldedIntLinear): per group of 4 inputs, two 64-byte loads hold 32 rows
// × 4 codes; each activation row broadcasts its 4 codes against them.
template <int B>
void GemmPanelS8T(const int8_t* panel, int64_t groups, const uint8_t* x, int64_t ldx,
                  int32_t* out) {
  __m512i acc[B][2];
  for (int b = 0; b < B; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    PrefetchPanel(panel, g * 128);
    PrefetchPanel(panel, g * 128 + 64);
    const __m512i w0 = _mm512_loadu_si512(panel + g * 128);
    const __m512i w1 = _mm512_loadu_si512(panel + g * 128 + 64);
    for (int b = 0; b < B; ++b) {
      int32_t v;
      std::memcpy(&v, x + b * ldx + 4 * g, 4);
      const __m512i xv = _mm512_set1_epi32(v);
      acc[b][0] = Dpbusd(acc[b][0], xv, w0);
      acc[b][1] = Dpbusd(acc[b][1], xv, w1);
    }
  }
  for (int b = 0; b < B; ++b) {
    _mm512_storeu_si512(out + b * kIntPanelRows, acc[b][0]);
    _mm512_storeu_si512(out + b * kIntPanelRows + 16, acc[b][1]);
  }
}

using PanelS8Fn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int32_t*);
template <size_t... I>
constexpr std::array<PanelS8Fn, sizeof...(I)> PanelS8Table(std::index_sequence<I...>) {
  return {GemmPanelS8T<static_cast<int>(I) + 1>...};
}
constexpr auto kPanelsS8 = PanelS8Table(std::make_index_sequence<kIntGemmRows>());

void GemmPanelS8(const int8_t* panel, int64_t groups, const uint8_t* x, int64_t ldx, int B,
                 int32_t* out) {
  kPanelsS8[B - 1](panel, groups, x, ldx, out);
}

// 8 outputs per step; the tail under a mask. The same double operations as the reference, in
// the same order (no FMA: cvtepi32_pd, the two sums and the products are separate instructions).
void FoldedOutputs(const int32_t* acc, int R, const double* wpart, const double* ws, double xpart,
                   double sx, float* out) {
  const __m512d four = _mm512_set1_pd(4.0), vx = _mm512_set1_pd(xpart),
                vs = _mm512_set1_pd(sx), quarter = _mm512_set1_pd(0.25);
  for (int r = 0; r < R; r += 8) {
    const __mmask8 m = R - r >= 8 ? __mmask8{0xFF} : static_cast<__mmask8>((1u << (R - r)) - 1);
    const __m512d a = _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(m, acc + r));
    const __m512d num =
        _mm512_add_pd(_mm512_sub_pd(_mm512_mul_pd(four, a), _mm512_maskz_loadu_pd(m, wpart + r)),
                      vx);
    const __m512d y = _mm512_mul_pd(
        _mm512_mul_pd(_mm512_mul_pd(_mm512_maskz_loadu_pd(m, ws + r), vs), num), quarter);
    _mm256_mask_storeu_ps(out + r, m, _mm512_cvtpd_ps(y));
  }
}

// Post steps on V vectors of 16 values (the last under mask `m`), every step on the registers:
// the same operations as the baseline loops of int_linear.cc. max(y, 0) is (0 > y) ? 0 : y,
// which is vmaxps with 0 first; min(c, 6) is (6 < c) ? 6 : c, vminps with 6 first. V vectors
// are V independent dependency chains through the steps (a step's latency, up to a division's,
// would otherwise bound the loop).
template <int V>
inline void PostStepsBlock(const PostStep* steps, int n, float* out, __mmask16 m) {
  const __m512 zero = _mm512_setzero_ps(), three = _mm512_set1_ps(3.0f),
               six = _mm512_set1_ps(6.0f);
  __m512 y[V];
  for (int v = 0; v < V; ++v) {
    y[v] = v == V - 1 ? _mm512_maskz_loadu_ps(m, out + 16 * v) : _mm512_loadu_ps(out + 16 * v);
  }
  for (int k = 0; k < n; ++k) {
    const __m512 c = _mm512_set1_ps(steps[k].value);
    switch (steps[k].op) {
      case PostOp::kNone: break;
      case PostOp::kRelu:
        for (int v = 0; v < V; ++v) y[v] = _mm512_max_ps(zero, y[v]);
        break;
      case PostOp::kHardswish:
        for (int v = 0; v < V; ++v) {
          const __m512 g = _mm512_min_ps(six, _mm512_max_ps(zero, _mm512_add_ps(y[v], three)));
          y[v] = _mm512_div_ps(_mm512_mul_ps(y[v], g), six);
        }
        break;
      case PostOp::kMul:
        for (int v = 0; v < V; ++v) y[v] = _mm512_mul_ps(y[v], c);
        break;
      case PostOp::kAdd:
        for (int v = 0; v < V; ++v) y[v] = _mm512_add_ps(y[v], c);
        break;
      case PostOp::kDiv:
        for (int v = 0; v < V; ++v) y[v] = _mm512_div_ps(y[v], c);
        break;
    }
  }
  for (int v = 0; v < V; ++v) {
    _mm512_mask_storeu_ps(out + 16 * v, v == V - 1 ? m : __mmask16{0xFFFF}, y[v]);
  }
}

void PostStepsAvx512(const PostStep* steps, int n, float* out, int64_t count) {
  int64_t i = 0;
  for (; i + 64 <= count; i += 64) PostStepsBlock<4>(steps, n, out + i, 0xFFFF);
  for (; i < count; i += 16) {
    const __mmask16 m =
        count - i >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (count - i)) - 1);
    PostStepsBlock<1>(steps, n, out + i, m);
  }
}

constexpr IntKernelTable kTable = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  IntKernelTable t{};
  t.name = "avx512vnni";
  t.unpack_row = UnpackIntRowAvx2;
  t.dot_tile = DotTile;
  t.gemm_panel = GemmPanel;
  t.gemm_panel_s8 = GemmPanelS8;
  t.folded_outputs = FoldedOutputs;
  t.post_steps = PostStepsAvx512;
  return t;
}();

}  // namespace

const IntKernelTable& IntKernelsAvx512Vnni() { return kTable; }

}  // namespace fpxint::core
