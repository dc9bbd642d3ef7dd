// Packed low-bit ops in real networks against LibTorch FP32 at the same thread count (issue
// "Real low-bit inference", docs/BENCHMARKS.md "Conv" and "Model").
//   Conv/<impl>/ocr_rec_480x480x1x1_6x80/batch:1   the OCR recognizer's largest convolution (by
//       MACs: 480->480 1x1 on [1, 480, 6, 80]); fp32_libtorch = at::conv2d; w4k1, w4k2 =
//       fpxint::conv2d on packed terms (default schedule: 480 output pixels are compute-bound,
//       so a transient fp32 copy goes to LibTorch); w4k2_packed_kernels = the packed kernels
//       forced (im2col + core::LowbitLinear).
//   Model/<impl>/ocr_rec/batch:<B>   the whole recognizer on the first B rendered evaluation
//       lines [B, 3, 48, 320] (ocr_eval.safetensors):
//       fp32_libtorch = the frozen FP model; w4k1, w4k2 = model::Model with packed weights (every
//       conv and matmul on fpxint ops, K' = K); w4a4k2 = W4×2 with 4-bit activations ×2 (all
//       pairs, integer ops where the layer takes them); w4a4k2_folded = the same with variant D
//       mid-grid weights and activations (one folded u8 × s8 product per 1x1 conv and matmul).
// Counters: weight_MB = resident weight bytes (packed: codes + scales + offsets).
// The models come from scripts/fetch_models.sh (FPXINT_MODELS_DIR or ~/.cache/fpxint/models);
// a missing model is reported as an error, not skipped silently.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <string>

#include "core/expansion.h"
#include "core/lowbit_linear.h"
#include "model/act_expand_op.h"
#include "model/lowbit_ops.h"
#include "bench/ocr_recognizer.h"
#include "model/model.h"

namespace {

constexpr int kThreads = 2;

using fpxint::bench::ModelsDir;

// ---- Conv ----

constexpr int64_t kC = 480, kH = 6, kW = 80;

const at::Tensor& ConvWeight() {
  static const at::Tensor w = [] {
    at::manual_seed(1);
    return at::randn({kC, kC, 1, 1}, at::kFloat) * 0.05;
  }();
  return w;
}

const c10::IValue& Packed(int terms) {
  static std::map<int, c10::IValue> cache;
  auto it = cache.find(terms);
  if (it != cache.end()) return it->second;
  fpxint::core::ExpansionSpec spec;
  spec.bits = 4;
  spec.terms = terms;
  const at::Tensor& w = ConvWeight();
  auto e = fpxint::core::ExpandTensor(
      fpxint::core::DType::kF32, w.sizes().vec(),
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(w.data_ptr<float>()), w.numel() * 4),
      spec);
  auto l = fpxint::core::LowbitLinear::FromExpansion(*e);
  return cache[terms] = fpxint::model::MakePackedWeight(*std::move(l), w.sizes().vec());
}

void BM_ConvFp32(benchmark::State& state) {
  at::set_num_threads(kThreads);
  const at::Tensor x = at::randn({1, kC, kH, kW});
  for (auto _ : state) benchmark::DoNotOptimize(at::conv2d(x, ConvWeight()));
  state.counters["weight_MB"] = static_cast<double>(ConvWeight().numel() * 4) / (1 << 20);
}

void BM_ConvPacked(benchmark::State& state, int terms, bool force_packed_kernels) {
  at::set_num_threads(kThreads);
  const c10::IValue& pw = Packed(terms);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::conv2d", "");
  const at::Tensor x = at::randn({1, kC, kH, kW});
  const int64_t saved = fpxint::model::PackedMaxRows();
  if (force_packed_kernels) fpxint::model::SetPackedMaxRows(int64_t{1} << 40);
  for (auto _ : state) {
    torch::jit::Stack stack{x, pw, c10::IValue(), std::vector<int64_t>{1, 1},
                            std::vector<int64_t>{0, 0}, std::vector<int64_t>{1, 1}, int64_t{1},
                            int64_t{0}};
    // The schema's defaults (a boxed call gets none): no activation expansion, no tail.
    for (int i = 0; i < 5; ++i) stack.emplace_back(int64_t{0});
    stack.emplace_back(std::vector<int64_t>{});
    stack.emplace_back(std::vector<double>{});
    op.callBoxed(&stack);
    benchmark::DoNotOptimize(stack);
  }
  fpxint::model::SetPackedMaxRows(saved);
  state.counters["weight_MB"] =
      static_cast<double>(fpxint::model::InspectPackedWeight(pw).bytes) / (1 << 20);
}

// The transient fp32 copy alone (what the dense path adds to at::conv2d).
void BM_Dequantize(benchmark::State& state, int terms) {
  at::set_num_threads(kThreads);
  const c10::IValue& pw = Packed(terms);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::dequantize", "");
  for (auto _ : state) {
    torch::jit::Stack stack{pw, int64_t{0}};
    op.callBoxed(&stack);
    benchmark::DoNotOptimize(stack);
  }
}

// ---- Depthwise convolution and the elementwise ops after it ----
// The recognizer's 5x5 depthwise layer on [8, 240, 12, 80] as the folded network runs it:
// variant D W4×2 weights, its input expanded A4×2 (variant D, one scale per image and channel)
// inside the op, a bias, then the tail converted models write (scale and shift, hardswish,
// scale and shift). fp32_aten: at::conv2d and the aten ops; the others run fpxint::conv2d and
// then the aten ops (aten_tail), one fpxint::post_ pass (post_pass), or the tail in the op,
// per channel while its outputs are in cache (fused).
constexpr int64_t kDwC = 240, kDwH = 12, kDwW = 80, kDwK = 5, kDwBatch = 8;

const at::Tensor& DepthwiseWeight() {
  static const at::Tensor w = [] {
    at::manual_seed(2);
    return at::randn({kDwC, 1, kDwK, kDwK}, at::kFloat) * 0.2;
  }();
  return w;
}

const c10::IValue& DepthwisePacked() {
  static const c10::IValue pw = [] {
    fpxint::core::ExpansionSpec spec;
    spec.bits = 4;
    spec.terms = 2;
    spec.grid = fpxint::core::Grid::kMid;
    spec.variant = fpxint::core::Variant::kDigits;
    spec.scale = fpxint::core::ScaleGranularity::kChannel;
    const at::Tensor& w = DepthwiseWeight();
    auto e = fpxint::core::ExpandTensor(
        fpxint::core::DType::kF32, {kDwC, kDwK * kDwK},
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(w.data_ptr<float>()),
                            w.numel() * 4),
        spec);
    if (!e.ok()) std::abort();
    auto l = fpxint::core::LowbitLinear::FromExpansion(*e);
    if (!l.ok()) std::abort();
    return fpxint::model::MakePackedWeight(*std::move(l), w.sizes().vec());
  }();
  return pw;
}

enum class Tail { kFp32Aten, kAten, kPostPass, kFused };

void BM_DepthwiseTail(benchmark::State& state, Tail tail) {
  at::set_num_threads(kThreads);
  at::manual_seed(3);
  const at::Tensor x = at::randn({kDwBatch, kDwC, kDwH, kDwW});
  const at::Tensor bias = at::randn({kDwC}) * 0.1;
  const at::Tensor a0 = at::full({1}, 0.9f), b0 = at::full({1}, 0.1f);
  const at::Tensor a1 = at::full({1}, 1.1f), b1 = at::full({1}, -0.2f);
  const auto aten_tail = [&](const at::Tensor& y) {
    const at::Tensor h = at::add(at::mul(y, a0), b0);
    const at::Tensor g = at::div(at::mul(h, at::clamp(at::add(h, 3.0), 0.0, 6.0)), 6.0);
    return at::add(at::mul(g, a1), b1);
  };
  // mul a0, add b0, hardswish, mul a1, add b1 (core::PostOp).
  const std::vector<int64_t> ops = {3, 4, 2, 3, 4};
  const std::vector<double> values = {0.9f, 0.1f, 0, 1.1f, -0.2f};
  const auto conv = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::conv2d", "");
  const auto post = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::post_", "");
  const int64_t pad = kDwK / 2;
  for (auto _ : state) {
    if (tail == Tail::kFp32Aten) {
      benchmark::DoNotOptimize(aten_tail(
          at::conv2d(x, DepthwiseWeight(), bias, {1, 1}, {pad, pad}, {1, 1}, kDwC)));
      continue;
    }
    const bool fused = tail == Tail::kFused;
    torch::jit::Stack st{x, DepthwisePacked(), bias, std::vector<int64_t>{1, 1},
                         std::vector<int64_t>{pad, pad}, std::vector<int64_t>{1, 1}, kDwC,
                         int64_t{2}, int64_t{4}, int64_t{2},
                         static_cast<int64_t>(fpxint::core::Grid::kMid),
                         static_cast<int64_t>(fpxint::model::ActGranularity::kChannel),
                         static_cast<int64_t>(fpxint::core::Variant::kDigits),
                         fused ? ops : std::vector<int64_t>{},
                         fused ? values : std::vector<double>{}};
    conv.callBoxed(&st);
    if (tail == Tail::kAten) {
      benchmark::DoNotOptimize(aten_tail(st[0].toTensor()));
    } else if (tail == Tail::kPostPass) {
      torch::jit::Stack p{st[0].toTensor(), ops, values};
      post.callBoxed(&p);
      benchmark::DoNotOptimize(p);
    } else {
      benchmark::DoNotOptimize(st);
    }
  }
}

// ---- Model ----

void BM_Model(benchmark::State& state, int terms, int act_terms, bool folded, int64_t batch) {
  auto m = fpxint::bench::LoadRecognizer(ModelsDir(), terms, act_terms, folded);
  auto x = m.ok() ? fpxint::bench::FirstRecognizerLine(ModelsDir(), batch) : m.status();
  if (!x.ok()) {
    state.SkipWithError(std::string(x.status().message()).c_str());
    return;
  }
  // TorchScript's profiling executor specialises the graph over the first runs: warm it up.
  for (int i = 0; i < 3; ++i) (*m)->Forward(*x).IgnoreError();
  for (auto _ : state) {
    auto y = (*m)->Forward(*x);
    if (!y.ok()) {
      state.SkipWithError(std::string(y.status().message()).c_str());
      return;
    }
    benchmark::DoNotOptimize(y->f32.data());
  }
  const auto mem = (*m)->weight_memory();
  state.counters["weight_MB"] = static_cast<double>(mem.resident_bytes) / (1 << 20);
  state.counters["packed_layers"] = mem.packed_layers;
  state.counters["folded_layers"] = mem.folded_layers;
}

int Register() {
  const std::string conv = "/ocr_rec_480x480x1x1_6x80/batch:1";
  benchmark::RegisterBenchmark(("Conv/fp32_libtorch" + conv).c_str(), BM_ConvFp32)
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark(("Conv/w4k1" + conv).c_str(), BM_ConvPacked, 1, false)
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark(("Conv/w4k2" + conv).c_str(), BM_ConvPacked, 2, false)
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark(("Conv/w4k2_packed_kernels" + conv).c_str(), BM_ConvPacked, 2, true)
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark(("Conv/w4k2_dequantize_only" + conv).c_str(), BM_Dequantize, 2)
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  const std::string dw = "/ocr_rec_240x5x5_12x80/batch:8";
  for (const auto& [name, tail] :
       {std::pair{"fp32_aten", Tail::kFp32Aten}, std::pair{"aten_tail", Tail::kAten},
        std::pair{"post_pass", Tail::kPostPass}, std::pair{"fused", Tail::kFused}}) {
    benchmark::RegisterBenchmark(("DepthwiseTail/" + std::string(name) + dw).c_str(),
                                 BM_DepthwiseTail, tail)
        ->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  struct Impl {
    const char* name;
    int terms, act_terms;
    bool folded;
  };
  for (int64_t batch : {1, 8}) {
    for (const Impl& i : {Impl{"fp32_libtorch", 0, 0, false}, Impl{"w4k1", 1, 0, false},
                          Impl{"w4k2", 2, 0, false}, Impl{"w4a4k2", 2, 2, false},
                          Impl{"w4a4k2_folded", 2, 2, true}}) {
      benchmark::RegisterBenchmark(
          ("Model/" + std::string(i.name) + "/ocr_rec/batch:" + std::to_string(batch)).c_str(),
          BM_Model, i.terms, i.act_terms, i.folded, batch)
          ->Unit(benchmark::kMillisecond)->UseRealTime();
    }
  }
  return 0;
}

const int kRegistered = Register();

}  // namespace
