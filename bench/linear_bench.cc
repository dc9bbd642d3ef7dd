// Low-bit linear layers against LibTorch at the same thread count (issue "Real low-bit
// inference", docs/BENCHMARKS.md "Linear"). Names: Linear/<impl>/<N>x<N>/batch:<B>.
//   fp32_libtorch          at::linear, OpenBLAS, at::set_num_threads(2)
//   int8_dynamic_libtorch  quantized::linear_dynamic (onednn, else qnnpack), 2 threads
//   w4k1, w4k2, w2k4mid    core::LowbitLinear (packed codes, fp32 activations), ThreadPool(2)
// Counters: weight_MB = resident weight bytes of the implementation (MiB).
//   w4a4k2, w4a4k2_trunc   core::IntLinear: W4×2 sym weights, activations expanded per row
//                          into 2 4-bit terms (unsigned first term for x >= 0), all 4 products
//                          or the 3 order-truncated ones, int32 accumulation (VNNI where present)
//   w4a4k2_fold            core::FoldedIntLinear: W4×2 and A4×2 both variant D (grid mid), the
//                          two digits of each side folded into one 8-bit code: all 4 term
//                          products in ONE u8 × s8 GEMM
// Dequantize/<impl>/4096x4096: Σ_k Ŵ_k into a reused fp32 buffer (the dense path's transient).
// Ratios are fairest with --benchmark_enable_random_interleaving=true on a shared host.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/quantized/PackedParams.h>
#include <benchmark/benchmark.h>

#include <map>
#include <vector>
#include <memory>
#include <string>

#include "core/expansion.h"
#include "core/int_linear.h"
#include "core/lowbit_linear.h"
#include "core/thread_pool.h"

namespace {

constexpr int kThreads = 2;
constexpr int64_t kN = 4096;

const at::Tensor& Weight() {
  static const at::Tensor w = [] {
    at::manual_seed(0);
    return at::randn({kN, kN}, at::kFloat) * 0.02;
  }();
  return w;
}

at::Tensor Input(int64_t batch) {
  at::manual_seed(static_cast<uint64_t>(batch));
  return at::randn({batch, kN}, at::kFloat);
}

fpxint::core::ThreadPool& Pool() {
  static fpxint::core::ThreadPool pool(kThreads);
  return pool;
}

// The benchmark weight expanded with `spec` on the 2-thread pool.
fpxint::core::TensorExpansion ExpandWeight(const fpxint::core::ExpansionSpec& spec) {
  const at::Tensor& w = Weight();
  fpxint::core::ExpandOptions o;
  o.pool = &Pool();
  auto e = fpxint::core::ExpandTensor(
      fpxint::core::DType::kF32, {kN, kN},
      absl::MakeConstSpan(static_cast<const uint8_t*>(w.data_ptr()), w.nbytes()), spec, o);
  if (!e.ok()) std::abort();
  return *std::move(e);
}

const fpxint::core::LowbitLinear& Lowbit(const std::string& impl) {
  static std::map<std::string, std::unique_ptr<fpxint::core::LowbitLinear>> cache;
  auto it = cache.find(impl);
  if (it != cache.end()) return *it->second;
  fpxint::core::ExpansionSpec spec;
  spec.scale = fpxint::core::ScaleGranularity::kChannel;
  if (impl == "w4k1") {
    spec.bits = 4, spec.terms = 1;
  } else if (impl == "w4k2") {
    spec.bits = 4, spec.terms = 2;
  } else {  // w2k4mid
    spec.bits = 2, spec.terms = 4, spec.grid = fpxint::core::Grid::kMid;
  }
  auto l = fpxint::core::LowbitLinear::FromExpansion(ExpandWeight(spec));
  if (!l.ok()) std::abort();
  return *(cache[impl] = std::make_unique<fpxint::core::LowbitLinear>(*std::move(l)));
}

void BM_Fp32(benchmark::State& state, int64_t batch) {
  at::set_num_threads(kThreads);
  const at::Tensor x = Input(batch);
  const at::Tensor& w = Weight();
  for (auto _ : state) benchmark::DoNotOptimize(at::linear(x, w));
  state.counters["weight_MB"] = static_cast<double>(w.nbytes()) / (1 << 20);
}

void BM_Int8Dynamic(benchmark::State& state, int64_t batch) {
  at::set_num_threads(kThreads);
  const auto engines = at::globalContext().supportedQEngines();
  at::QEngine engine = engines.empty() ? at::QEngine::NoQEngine : engines.front();
  for (at::QEngine e : engines) {
    if (e == at::QEngine::ONEDNN) engine = e;
  }
  at::globalContext().setQEngine(engine);
  const at::Tensor& w = Weight();
  const double scale = w.abs().max().item<double>() / 127.0;
  const at::Tensor qw = at::quantize_per_tensor(w, scale, 0, at::kQInt8);
  static const auto prepack =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("quantized::linear_prepack", "")
          .typed<c10::intrusive_ptr<LinearPackedParamsBase>(at::Tensor, c10::optional<at::Tensor>)>();
  const auto packed = prepack.call(qw, c10::nullopt);
  const at::Tensor x = Input(batch);
  for (auto _ : state) benchmark::DoNotOptimize(packed->apply_dynamic(x, /*reduce_range=*/false));
  state.counters["weight_MB"] = static_cast<double>(kN * kN) / (1 << 20);
  state.SetLabel(engine == at::QEngine::ONEDNN ? "onednn" : "qnnpack");
}

// The integer kernels on the w4k2 expansion's own codes (a view, as the serving ops use them).
const fpxint::core::IntLinear& IntW4K2() {
  static const fpxint::core::IntLinear lin = [] {
    auto l = fpxint::core::IntLinear::ViewOf(Lowbit("w4k2"));
    if (!l.ok()) std::abort();
    return *std::move(l);
  }();
  return lin;
}

void BM_IntW4A4(benchmark::State& state, bool truncate, int64_t batch) {
  const fpxint::core::IntLinear& l = IntW4K2();
  // Post-ReLU-like activations (>= 0): the first activation term is unsigned.
  const at::Tensor x = at::relu(Input(batch));
  at::Tensor y = at::empty({batch, kN}, at::kFloat);
  const fpxint::core::IntLinear::ActSpec act{4, 2, true, truncate};
  for (auto _ : state) {
    if (!l.Forward(x.data_ptr<float>(), batch, y.data_ptr<float>(), act, 0, &Pool()).ok()) {
      state.SkipWithError("IntLinear::Forward failed");
      return;
    }
    benchmark::ClobberMemory();
  }
  // The shared packed codes, scales and offsets, plus the view's per-row scales and sums.
  state.counters["weight_MB"] =
      static_cast<double>(Lowbit("w4k2").resident_bytes() + l.resident_bytes()) / (1 << 20);
  state.SetLabel(fpxint::core::ActiveIntKernels().name);
}

const fpxint::core::FoldedIntLinear& FoldedW4K2() {
  static const fpxint::core::FoldedIntLinear lin = [] {
    fpxint::core::ExpansionSpec spec;
    spec.bits = 4;
    spec.terms = 2;
    spec.grid = fpxint::core::Grid::kMid;
    spec.variant = fpxint::core::Variant::kDigits;
    spec.scale = fpxint::core::ScaleGranularity::kChannel;
    auto l = fpxint::core::FoldedIntLinear::FromExpansion(ExpandWeight(spec));
    if (!l.ok()) std::abort();
    return *std::move(l);
  }();
  return lin;
}

void BM_FoldedW4A4(benchmark::State& state, int64_t batch) {
  const fpxint::core::FoldedIntLinear& l = FoldedW4K2();
  const at::Tensor x = at::relu(Input(batch));
  at::Tensor y = at::empty({batch, kN}, at::kFloat);
  for (auto _ : state) {
    if (!l.Forward(x.data_ptr<float>(), batch, y.data_ptr<float>(), {4, 2}, &Pool()).ok()) {
      state.SkipWithError("FoldedIntLinear::Forward failed");
      return;
    }
    benchmark::ClobberMemory();
  }
  state.counters["weight_MB"] = static_cast<double>(l.resident_bytes()) / (1 << 20);
  state.SetLabel(fpxint::core::ActiveIntKernels().name);
}

void BM_Lowbit(benchmark::State& state, std::string impl, int64_t batch) {
  const fpxint::core::LowbitLinear& l = Lowbit(impl);
  const at::Tensor x = Input(batch);
  at::Tensor y = at::empty({batch, kN}, at::kFloat);
  for (auto _ : state) {
    l.Forward(x.data_ptr<float>(), batch, y.data_ptr<float>(), 0, &Pool());
    benchmark::ClobberMemory();
  }
  state.counters["weight_MB"] = static_cast<double>(l.resident_bytes()) / (1 << 20);
  state.SetLabel(fpxint::core::ActiveLinearKernels().name);
}

// Σ_k Ŵ_k decoded into a reused fp32 buffer (the dense path's transient weight for calls with
// many activation rows): output bytes per second.
void BM_Dequantize(benchmark::State& state, std::string impl) {
  const fpxint::core::LowbitLinear& l = Lowbit(impl);
  std::vector<float> out(static_cast<size_t>(kN * kN));
  for (auto _ : state) {
    l.Dequantize(out.data(), 0, &Pool());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kN * kN * 4);
  state.SetLabel(fpxint::core::ActiveLinearKernels().name);
}

// The machine's streaming read bandwidth with the same 2 threads: the ceiling for batch-1
// inference, which reads every weight byte once (issue goal: >= 60 % of it).
void BM_StreamRead(benchmark::State& state) {
  constexpr size_t kBytes = size_t{256} << 20;
  static std::vector<uint64_t> buf(kBytes / 8, 1);
  std::vector<uint64_t> sums(kThreads);
  for (auto _ : state) {
    Pool().ParallelFor(kThreads, [&](int64_t t) {
      const size_t n = buf.size() / kThreads, b = static_cast<size_t>(t) * n;
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (size_t i = b; i < b + n; i += 4) {
        s0 += buf[i], s1 += buf[i + 1], s2 += buf[i + 2], s3 += buf[i + 3];
      }
      sums[static_cast<size_t>(t)] = s0 + s1 + s2 + s3;
    });
    benchmark::DoNotOptimize(sums.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(kBytes));
}

int Register() {
  for (const char* impl : {"w4k1", "w4k2", "w2k4mid"}) {
    benchmark::RegisterBenchmark(("Dequantize/" + std::string(impl) + "/4096x4096").c_str(),
                                 BM_Dequantize, impl)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::RegisterBenchmark("Memory/stream_read/256MB", BM_StreamRead)
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  for (int64_t b : {1, 8, 64}) {
    const std::string shape = std::to_string(kN) + "x" + std::to_string(kN) + "/batch:" + std::to_string(b);
    benchmark::RegisterBenchmark(("Linear/fp32_libtorch/" + shape).c_str(), BM_Fp32, b)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("Linear/int8_dynamic_libtorch/" + shape).c_str(), BM_Int8Dynamic, b)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
    for (const char* impl : {"w4k1", "w4k2", "w2k4mid"}) {
      benchmark::RegisterBenchmark(("Linear/" + std::string(impl) + "/" + shape).c_str(), BM_Lowbit,
                                   std::string(impl), b)
          ->Unit(benchmark::kMillisecond)->UseRealTime();
    }
    benchmark::RegisterBenchmark(("Linear/w4a4k2/" + shape).c_str(), BM_IntW4A4, false, b)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("Linear/w4a4k2_trunc/" + shape).c_str(), BM_IntW4A4, true, b)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("Linear/w4a4k2_fold/" + shape).c_str(), BM_FoldedW4A4, b)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  return 0;
}

const int kRegistered = Register();

}  // namespace
