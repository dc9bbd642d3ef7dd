// Tensor expansion throughput (issue "Foundation", docs/BENCHMARKS.md):
//   Expand/fpxint/<kernel>/threads:<n>   fpxint_core, 4096x4096 fp32, b=4, K=4, sym, per channel
//   Expand/fpxint/avx512_tensor_scale     the same with one scale per tensor
//   Expand/aten_fp32/threads:<n>         the same expansion written with ATen tensor ops
//                                        (amax, div, round, clamp, sub, nibble packing), OpenBLAS
// bytes_per_second counts the fp32 input. Compare ratios within one run, never absolute numbers
// across machines. peak_extra_MB: peak resident memory during one expansion beyond the input and
// the output it returns (VmHWM after resetting it through /proc/self/clear_refs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <malloc.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>

#include "core/expansion.h"
#include "core/kernels.h"
#include "core/thread_pool.h"

namespace {

constexpr int64_t kN = 4096;
constexpr int kBits = 4;
constexpr int kTerms = 4;

const std::vector<float>& Input() {
  static const std::vector<float> w = [] {
    std::vector<float> v(kN * kN);
    std::mt19937_64 rng(0);
    std::normal_distribution<float> d(0, 0.02f);
    for (float& x : v) x = d(rng);
    return v;
  }();
  return w;
}

int64_t StatusKb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(std::strlen(key)));
  }
  return -1;
}

// While measuring, large blocks come from mmap and go back to the kernel when freed (a fixed,
// low threshold), so resident memory follows what is really live. Only while measuring: a
// process-wide 128 KiB threshold makes every large tensor allocation an mmap + page faults, which
// slowed the LibTorch baselines of the other benchmarks in this binary by 3-4x. Afterwards the
// threshold goes to glibc's dynamic maximum (32 MiB on 64-bit).
class LowMmapThreshold {
 public:
  LowMmapThreshold() : ok_(mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1) {}
  ~LowMmapThreshold() { mallopt(M_MMAP_THRESHOLD, 32 << 20); }
  bool ok() const { return ok_; }

 private:
  bool ok_;
};

// Peak RSS growth (bytes) while `fn` runs, minus `keep` bytes that fn's result legitimately holds.
double PeakExtraBytes(const std::function<size_t()>& fn) {
  LowMmapThreshold low_threshold;
  malloc_trim(0);
  { std::ofstream("/proc/self/clear_refs") << "5"; }  // reset VmHWM to the current RSS
  const int64_t before = StatusKb("VmRSS:");
  const size_t keep = fn();
  const int64_t peak = StatusKb("VmHWM:");
  if (before < 0 || peak < 0 || !low_threshold.ok()) return -1;
  return static_cast<double>(peak - before) * 1024.0 - static_cast<double>(keep);
}

fpxint::core::ExpansionSpec Spec(fpxint::core::ScaleGranularity scale) {
  fpxint::core::ExpansionSpec s;
  s.bits = kBits;
  s.terms = kTerms;
  s.grid = fpxint::core::Grid::kSym;
  s.scale = scale;
  return s;
}

size_t OutputBytes(const fpxint::core::TensorExpansion& e) {
  size_t n = 0;
  for (const auto& t : e.terms) n += t.codes.size() + 4 * t.scale.size() + 4 * t.zero.size();
  return n;
}

void BM_ExpandFpxint(benchmark::State& state, const char* kernel,
                     fpxint::core::ScaleGranularity scale) {
  const fpxint::core::KernelTable* kt = fpxint::core::KernelsByName(kernel);
  if (kt == nullptr) {
    state.SkipWithError("kernel not supported on this CPU");
    return;
  }
  const int threads = static_cast<int>(state.range(0));
  fpxint::core::ThreadPool pool(threads);
  fpxint::core::ExpandOptions o;
  o.kernels = kt;
  o.pool = threads > 1 ? &pool : nullptr;
  const std::vector<float>& w = Input();
  const std::vector<int64_t> shape = {kN, kN};
  const auto bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(w.data()), w.size() * 4);
  const auto spec = Spec(scale);
  for (auto _ : state) {
    auto e = fpxint::core::ExpandTensor(fpxint::core::DType::kF32, shape, bytes, spec, o);
    if (!e.ok()) state.SkipWithError(std::string(e.status().message()).c_str());
    benchmark::DoNotOptimize(e);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(w.size()) * 4);
  state.counters["peak_extra_MB"] = PeakExtraBytes([&] {
    auto e = fpxint::core::ExpandTensor(fpxint::core::DType::kF32, shape, bytes, spec, o);
    return OutputBytes(*e);
  }) / 1e6;
}

// The same expansion with ATen ops: per-channel sym, 4 terms, codes packed two per byte.
std::vector<at::Tensor> AtenExpand(const at::Tensor& w) {
  const double qmax = (1 << (kBits - 1)) - 1;
  at::Tensor r = w.clone();
  std::vector<at::Tensor> out;
  for (int k = 0; k < kTerms; ++k) {
    at::Tensor m = at::amax(at::abs(r), {1}, /*keepdim=*/true);
    at::Tensor s = at::where(m > 0, m / qmax, at::ones_like(m));
    at::Tensor c = at::clamp(at::round(r / s), -qmax, qmax);
    r = r - c * s;
    at::Tensor ci = c.to(at::kChar);
    at::Tensor lo = at::bitwise_and(ci.slice(1, 0, kN, 2), 0xF);
    at::Tensor hi = at::bitwise_left_shift(ci.slice(1, 1, kN, 2), 4);
    out.push_back(at::bitwise_or(lo, hi).to(at::kByte));
    out.push_back(s.to(at::kFloat));
  }
  return out;
}

void BM_ExpandAten(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  at::set_num_threads(threads);
  const std::vector<float>& v = Input();
  at::Tensor w = at::from_blob(const_cast<float*>(v.data()), {kN, kN}, at::kFloat);
  for (auto _ : state) {
    auto out = AtenExpand(w);
    benchmark::DoNotOptimize(out);
  }
  state.SetBytesProcessed(state.iterations() * kN * kN * 4);
  state.counters["peak_extra_MB"] = PeakExtraBytes([&] {
    auto out = AtenExpand(w);
    size_t n = 0;
    for (const at::Tensor& t : out) n += t.nbytes();
    return n;
  }) / 1e6;
  state.SetLabel("threads=" + std::to_string(at::get_num_threads()));
}

}  // namespace

constexpr auto kChannel = fpxint::core::ScaleGranularity::kChannel;
BENCHMARK_CAPTURE(BM_ExpandFpxint, avx512, "avx512", kChannel)
    ->Name("Expand/fpxint/avx512")->ArgName("threads")->Arg(1)->Arg(2)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_ExpandFpxint, avx2, "avx2", kChannel)
    ->Name("Expand/fpxint/avx2")->ArgName("threads")->Arg(1)->Arg(2)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_ExpandFpxint, ref, "ref", kChannel)
    ->Name("Expand/fpxint/ref")->ArgName("threads")->Arg(1)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
// Per-tensor scales need the whole fp64 residual between terms: its memory shows here.
BENCHMARK_CAPTURE(BM_ExpandFpxint, tensor_scale, "avx512", fpxint::core::ScaleGranularity::kTensor)
    ->Name("Expand/fpxint/avx512_tensor_scale")->ArgName("threads")->Arg(2)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ExpandAten)
    ->Name("Expand/aten_fp32")->ArgName("threads")->Arg(1)->Arg(2)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
