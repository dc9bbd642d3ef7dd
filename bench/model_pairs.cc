// fpxint-model-pairs: the OCR recognizer, FP32 against W4×1, W4×2, W4A4×2 and folded W4A4×2
// (variant D, mid grid) on packed weights,
// timed in alternating rounds in one process (docs/BENCHMARKS.md "Model").
//
// On a shared host whose speed drifts by 2-3× within a minute, back-to-back repetitions (even
// interleaved ones) compare one side in a quiet minute with the other in a busy one. Here every
// round runs each model once in rotating order, so each round's ratios compare the models under
// the same conditions; the report gives per model the minimum (the cost on a quiet machine), the
// quartile and the median, and the median of the per-round ratios to FP32.
//   --batch N  the first N evaluation lines as one batch (default 1)
//   --per-op   also the per-op minimum over rounds, FP32 next to W4×2 (or W4A4×2 with --wa),
//              or folded W4A4×2 with --folded), aligned by position (the networks run the same
//              op sequence with conv/linear swapped for fpxint ops).
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/ocr_recognizer.h"
#include "core/runtime.h"
#include "model/model.h"

namespace {

using Clock = std::chrono::steady_clock;
double Ms(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

struct OpTime {
  std::string name;
  double ms;
};
std::vector<OpTime>* g_ops = nullptr;  // set while a profiled forward runs
thread_local int g_depth = 0;
thread_local std::vector<Clock::time_point> g_starts;

void InstallOpTimer() {
  at::addGlobalCallback(
      at::RecordFunctionCallback(
          [](const at::RecordFunction&) -> std::unique_ptr<at::ObserverContext> {
            ++g_depth;
            g_starts.push_back(Clock::now());
            return nullptr;
          },
          [](const at::RecordFunction& fn, at::ObserverContext*) {
            const Clock::time_point t0 = g_starts.back();
            g_starts.pop_back();
            if (--g_depth != 0 || g_ops == nullptr) return;  // top-level ops only
            std::ostringstream key;
            key << fn.name();
            for (const c10::IValue& v : fn.inputs()) {
              if (v.isTensor()) key << " " << v.toTensor().sizes();
            }
            g_ops->push_back({key.str(), Ms(t0)});
          })
          .needsInputs(true)
          .scopes({at::RecordScope::FUNCTION}));
}

}  // namespace

int main(int argc, char** argv) {
  fpxint::core::RetainTensorMemory();  // the allocator the server runs with
  CLI::App app{"The OCR recognizer: FP32 vs W4x1, W4x2 and W4A4x2 packed, alternating rounds."};
  int rounds = 40;
  int64_t batch = 1;
  bool per_op = false, wa = false, folded = false;
  std::string dir = fpxint::bench::ModelsDir();
  app.add_option("--rounds", rounds, "rounds (each runs every model once)")->check(CLI::Range(3, 100000));
  app.add_option("--batch", batch, "lines per forward (the first N evaluation lines)")
      ->check(CLI::Range(1, 64));
  app.add_flag("--per-op", per_op, "per-op minimum times, FP32 next to W4x2");
  app.add_flag("--wa", wa, "per-op against W4A4x2 instead of W4x2");
  app.add_flag("--folded", folded, "per-op against folded W4A4x2 (variant D, mid grid)");
  app.add_option("--models-dir", dir, "scripts/fetch_models.sh's directory");
  CLI11_PARSE(app, argc, argv);

  const char* names[] = {"fp32_libtorch", "w4k1", "w4k2", "w4a4k2", "w4a4k2_folded"};
  std::vector<std::unique_ptr<fpxint::model::Model>> models;
  for (int terms : {0, 1, 2, 3, 4}) {
    auto m = fpxint::bench::LoadRecognizer(dir, std::min(terms, 2), terms >= 3 ? 2 : 0, terms == 4);
    if (!m.ok()) {
      std::fprintf(stderr, "%s\n", std::string(m.status().message()).c_str());
      return 3;
    }
    models.push_back(*std::move(m));
  }
  auto line = fpxint::bench::FirstRecognizerLine(dir, batch);
  if (!line.ok()) {
    std::fprintf(stderr, "%s\n", std::string(line.status().message()).c_str());
    return 3;
  }
  const fpxint::model::HostTensor& x = *line;
  for (auto& m : models) {
    for (int i = 0; i < 5; ++i) m->Forward(x).IgnoreError();  // the profiling executor's warm-up
  }

  std::vector<std::vector<double>> ms(models.size());
  for (int r = 0; r < rounds; ++r) {
    for (size_t j = 0; j < models.size(); ++j) {
      const size_t k = (static_cast<size_t>(r) + j) % models.size();
      const Clock::time_point t0 = Clock::now();
      if (!models[k]->Forward(x).ok()) return 4;
      ms[k].push_back(Ms(t0));
    }
  }
  std::printf("%-14s %9s %9s %9s %22s\n", "model", "min ms", "p25 ms", "median ms",
              "median ratio to FP32");
  for (size_t k = 0; k < models.size(); ++k) {
    std::vector<double> s = ms[k], ratio;
    for (int r = 0; r < rounds; ++r) ratio.push_back(ms[k][r] / ms[0][r]);
    std::sort(s.begin(), s.end());
    std::sort(ratio.begin(), ratio.end());
    std::printf("%-14s %9.2f %9.2f %9.2f %22.3f\n", names[k], s[0], s[s.size() / 4],
                s[s.size() / 2], ratio[ratio.size() / 2]);
  }
  if (!per_op) return 0;

  InstallOpTimer();
  const size_t other = folded ? 4 : wa ? 3 : 2;
  std::vector<std::vector<OpTime>> best(2);  // fp32, then w4k2, w4a4k2 or w4a4k2_folded
  for (int r = 0; r < rounds; ++r) {
    for (int j = 0; j < 2; ++j) {
      std::vector<OpTime> ops;
      g_ops = &ops;
      models[j == 0 ? 0 : other]->Forward(x).IgnoreError();
      g_ops = nullptr;
      if (best[j].empty()) {
        best[j] = ops;
      } else {
        for (size_t i = 0; i < ops.size() && i < best[j].size(); ++i) {
          best[j][i].ms = std::min(best[j][i].ms, ops[i].ms);
        }
      }
    }
  }
  double sum[2] = {0, 0};
  std::printf("\nper-op minimum over %d rounds (ops over 0.08 ms on either side)\n", rounds);
  for (size_t i = 0; i < std::max(best[0].size(), best[1].size()); ++i) {
    const double a = i < best[0].size() ? best[0][i].ms : 0, b = i < best[1].size() ? best[1][i].ms : 0;
    sum[0] += a;
    sum[1] += b;
    if (a > 0.08 || b > 0.08) {
      std::printf("%4zu %8.3f %8.3f  %s\n", i, a, b, i < best[0].size() ? best[0][i].name.c_str() : "");
    }
  }
  std::printf("sum of per-op minima: fp32 %.2f ms, %s %.2f ms\n", sum[0], names[other], sum[1]);
  // The same minima summed per op name (the sequences differ where an op is fused or split).
  std::map<std::string, std::pair<double, double>> by_name;
  for (int j = 0; j < 2; ++j) {
    for (const OpTime& op : best[j]) {
      const std::string name = op.name.substr(0, op.name.find(' '));
      (j == 0 ? by_name[name].first : by_name[name].second) += op.ms;
    }
  }
  std::vector<OpTime> top = best[1];
  std::sort(top.begin(), top.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  std::printf("\n%s's slowest ops\n", names[other]);
  for (size_t i = 0; i < top.size() && i < 25; ++i) std::printf("%8.3f  %s\n", top[i].ms, top[i].name.c_str());
  std::printf("\nper op name (sum of minima, ms)\n%-28s %9s %9s\n", "op", "fp32", names[other]);
  for (const auto& [name, t] : by_name) {
    if (t.first > 0.05 || t.second > 0.05) {
      std::printf("%-28s %9.2f %9.2f\n", name.c_str(), t.first, t.second);
    }
  }
  return 0;
}
