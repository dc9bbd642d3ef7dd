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
