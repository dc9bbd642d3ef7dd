// Throughput of the multiply instructions the integer kernels could use, on one core: what
// bounds a W×A term product (docs/BENCHMARKS.md "Linear layers").
//   Isa/<instruction>   12 independent chains of that instruction in a loop (enough to hide its
//       latency), counter instr = instructions retired per second; divided by the core's clock,
//       instructions per cycle.
//   Isa/<a>+<b>         6 chains of each, interleaved: `pairs` per second near the slower one's
//       rate means the two run on separate units; near half of it, that they share one.
// Each chain feeds its result back as an operand and starts from its own value, and an empty asm
// statement makes the weight operand opaque on every iteration, so that the compiler neither
// hoists nor merges the work. Skipped (an error row) on a CPU without AVX-512 VNNI and BF16.
#include <immintrin.h>

#include <benchmark/benchmark.h>

#include <cstdint>

namespace {

constexpr int64_t kSteps = 1 << 16;  // loop iterations per benchmark iteration
constexpr int kChains = 12;

#define FPX_ISA_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

bool HasIsa() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

enum class Op { kDpbusdZmm, kMaddubswZmm, kMaddwdZmm, kFmaddZmm, kDpbf16Zmm };

// One instruction of kind kOp: the chain's value acc as an operand, x and w the others.
template <Op kOp>
FPX_ISA_TARGET __attribute__((always_inline)) inline __m512i Step(__m512i acc, __m512i x,
                                                                  __m512i w) {
  if constexpr (kOp == Op::kDpbusdZmm) {
    return _mm512_dpbusd_epi32(acc, x, w);
  } else if constexpr (kOp == Op::kMaddubswZmm) {
    return _mm512_maddubs_epi16(acc, w);
  } else if constexpr (kOp == Op::kMaddwdZmm) {
    return _mm512_madd_epi16(acc, w);
  } else if constexpr (kOp == Op::kFmaddZmm) {
    return _mm512_castps_si512(_mm512_fmadd_ps(_mm512_castsi512_ps(acc), _mm512_castsi512_ps(w),
                                               _mm512_castsi512_ps(x)));
  } else {
    return _mm512_castps_si512(
        _mm512_dpbf16_ps(_mm512_castsi512_ps(acc), (__m512bh)x, (__m512bh)w));
  }
}

// 12 chains over `steps` iterations: chains 0-5 of kFirst, 6-11 of kSecond, interleaved, each
// from its own start (identical chains would be merged into one). The chains' values are
// combined into the result so that none is dead.
template <Op kFirst, Op kSecond>
FPX_ISA_TARGET __m512i Chains(int64_t steps, __m512i x) {
#define FPX_START(k) _mm512_add_epi32(x, _mm512_set1_epi32(k))
  __m512i a0 = FPX_START(0), a1 = FPX_START(1), a2 = FPX_START(2), a3 = FPX_START(3),
          a4 = FPX_START(4), a5 = FPX_START(5), b0 = FPX_START(6), b1 = FPX_START(7),
          b2 = FPX_START(8), b3 = FPX_START(9), b4 = FPX_START(10), b5 = FPX_START(11);
#undef FPX_START
  __m512i w = _mm512_set1_epi8(3);
  for (int64_t s = 0; s < steps; ++s) {
    __asm__ volatile("" : "+v"(w));
#define FPX_PAIR(a, b) \
  a = Step<kFirst>(a, x, w); \
  b = Step<kSecond>(b, x, w)
    FPX_PAIR(a0, b0); FPX_PAIR(a1, b1); FPX_PAIR(a2, b2);
    FPX_PAIR(a3, b3); FPX_PAIR(a4, b4); FPX_PAIR(a5, b5);
#undef FPX_PAIR
  }
  return _mm512_xor_si512(
      _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)),
      _mm512_xor_si512(
          _mm512_xor_si512(_mm512_xor_si512(a4, a5), _mm512_xor_si512(b0, b1)),
          _mm512_xor_si512(_mm512_xor_si512(b2, b3), _mm512_xor_si512(b4, b5))));
}

// The chains of `kOp` (or the pairs with it) over kSteps, reduced to a scalar (no vector crosses
// a function without the target attribute).
template <Op kOp, bool kPair>
FPX_ISA_TARGET int Work() {
  const __m512i x = _mm512_set1_epi32(0x01020304);
  const __m512i r = kPair ? Chains<Op::kDpbusdZmm, kOp>(kSteps, x) : Chains<kOp, kOp>(kSteps, x);
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, r);
  return lanes[0];
}

template <Op kOp, bool kPair>
void BM_Isa(benchmark::State& state) {
  if (!HasIsa()) {
    state.SkipWithError("this CPU lacks AVX-512 VNNI or BF16");
    return;
  }
  int64_t n = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(Work<kOp, kPair>());
    n += kSteps;
  }
  // Instructions (or pairs of them) retired per second.
  const double count = static_cast<double>(n) * (kPair ? kChains / 2 : kChains);
  state.counters[kPair ? "pairs" : "instr"] =
      benchmark::Counter(count, benchmark::Counter::kIsRate);
}

BENCHMARK(BM_Isa<Op::kDpbusdZmm, false>)->Name("Isa/vpdpbusd_zmm");
BENCHMARK(BM_Isa<Op::kMaddubswZmm, false>)->Name("Isa/vpmaddubsw_zmm");
BENCHMARK(BM_Isa<Op::kMaddwdZmm, false>)->Name("Isa/vpmaddwd_zmm");
BENCHMARK(BM_Isa<Op::kFmaddZmm, false>)->Name("Isa/vfmadd231ps_zmm");
BENCHMARK(BM_Isa<Op::kDpbf16Zmm, false>)->Name("Isa/vdpbf16ps_zmm");
BENCHMARK(BM_Isa<Op::kMaddubswZmm, true>)->Name("Isa/vpdpbusd_zmm+vpmaddubsw_zmm");
BENCHMARK(BM_Isa<Op::kMaddwdZmm, true>)->Name("Isa/vpdpbusd_zmm+vpmaddwd_zmm");
BENCHMARK(BM_Isa<Op::kFmaddZmm, true>)->Name("Isa/vpdpbusd_zmm+vfmadd231ps_zmm");
BENCHMARK(BM_Isa<Op::kDpbf16Zmm, true>)->Name("Isa/vpdpbusd_zmm+vdpbf16ps_zmm");

}  // namespace
