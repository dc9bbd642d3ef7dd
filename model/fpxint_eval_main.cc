// fpxint-eval: accuracy of FP, plain round-to-nearest and FP=xINT series expansions on the real
// models and data of scripts/fetch_models.sh. See `fpxint-eval --help` and model/eval.h.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/runtime.h"
#include "core/thread_pool.h"
#include "model/eval.h"
#include "model/lowbit_ops.h"

namespace fpxint::model {
namespace {

constexpr int kExitUsage = 2;
constexpr int kExitBadInput = 3;
constexpr int kExitError = 4;

int ExitFor(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kNotFound: return kExitBadInput;
    default: return kExitError;
  }
}

std::string Row(const EvalResult& r, double fp_metric) {
  const EvalConfig& c = r.config;
  const bool ppl = r.metric_name == "perplexity";
  const std::string delta = c.kind == EvalConfig::Kind::kFp ? ""
                            : ppl ? absl::StrFormat("%+.2f%%", 100.0 * (r.metric / fp_metric - 1))
                                  : absl::StrFormat("%+.2f", r.metric - fp_metric);
  return absl::StrFormat("%-16s %5s %5s %9.3f %9s %10.3e %10.3e %7.2f %7.1f",
                         c.label,
                         absl::StrFormat("%.3g", c.target > 0 ? r.budget_weight_bits
                                                              : c.weight_bits()),
                         absl::StrFormat("%g", c.act_bits()), r.metric, delta, r.output_rel_err,
                         r.weight_rel_fro, r.expand_seconds, r.eval_seconds);
}

int Main(int argc, char** argv) {
  CLI::App app{
      "fpxint-eval: accuracy of FP=xINT series expansions on real models (no calibration data).\n\n"
      "For each TASK it loads the model and evaluation set made by scripts/fetch_models.sh, runs\n"
      "the FP model, then every --config, and prints one row per config: effective weight and\n"
      "activation bits (K*b; 32 = FP), the task's metric and its difference to FP, the relative\n"
      "error of the network's outputs against FP, the relative Frobenius error of all expanded\n"
      "weights, and the seconds spent expanding and evaluating. Configs that differ only in K\n"
      "share one expansion (any-precision: the first K terms of a larger expansion).\n\n"
      "Tasks: ocr_rec (PaddleOCR recognizer, character accuracy %), ocr_cls (orientation\n"
      "classifier, accuracy %), fmnist (Fashion-MNIST CNN, accuracy %), charlm (character LM,\n"
      "perplexity), or all.\n\n"
      "Config grammar: fp | rtn<B> | w<B>x<K>[-opts] | w<B>a<A>x<K>[,<Ka>][-opts], opts: sym|mid|asym,\n"
      "digits (variant D weights), adigits (variant D activations; with digits and mid: folded\n"
      "products), trunc, atensor (per-tensor activation scales), tensor|channel|g<G>, t<X> (an error\n"
      "budget: each layer's K in 1..K chosen on the data-free probe so that the output error is at\n"
      "most X; the W bit column is then the bits per weight it averages). Examples: rtn4 (plain\n"
      "per-channel round-to-nearest), w4x2 (2 weight terms of 4 bits), w2x4-mid, w4a4x2 (weights\n"
      "and activations, 2 terms each), w4a4x3-trunc (order-truncated products), w4x4-t0.01,\n"
      "w4a4x2-mid-digits-adigits (folded W4A4x2).\n\n"
      "Exit codes: 0 ok, 2 usage, 3 bad input or missing models, 4 other errors.",
      "fpxint-eval"};
  std::vector<std::string> tasks;
  std::string configs_text = "fp,rtn4,w4x1,w4x2,w4x3,w4a4x2";
  bool sweep = false;
  std::string models_dir;
  int limit = 0;
  int threads = 2;
  bool json = false;
  bool packed = false;
  int64_t packed_max_rows = -1;
  std::string out_path;
  std::string include, exclude;
  app.add_option("tasks", tasks, "ocr_rec | ocr_cls | fmnist | charlm | all")->required();
  app.add_option("-c,--config", configs_text, "comma-separated configs (see the grammar above)")
      ->capture_default_str();
  app.add_flag("--sweep", sweep,
               "the full sweep: fp, rtn 8/4/3/2, b in {2,3,4} x grids sym/mid x K=1..4, weight-only "
               "and W+A, plus W4A4 order-truncated (what docs/RESULTS.md reports)");
  app.add_option("--models-dir", models_dir,
                 "models directory of scripts/fetch_models.sh (default: its --print-dir)");
  app.add_option("--limit", limit, "evaluate only the first N samples (0 = all)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", threads, "threads for LibTorch and the expansion")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--include", include,
                 "expand only the layers whose name matches this regex (RE2 syntax, searched)");
  app.add_option("--exclude", exclude, "do not expand the layers whose name matches this regex");
  app.add_flag("--packed", packed,
               "run weight-only configs on the packed low-bit ops (fpxint::linear/conv2d on "
               "packed terms) instead of dequantized fp32 weights");
  app.add_option("--packed-max-rows", packed_max_rows,
                 "with --packed: activation rows up to which the packed kernels run; above, a "
                 "transient fp32 copy goes to LibTorch (default 16; 0 = always dense)");
  app.add_flag("--json", json, "print one JSON document (all tasks) on stdout instead of tables");
  app.add_option("-o,--out", out_path, "also write the JSON document to this file");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }

  if (tasks.size() == 1 && tasks[0] == "all") tasks = {"ocr_rec", "ocr_cls", "fmnist", "charlm"};
  std::vector<EvalTask> task_ids;
  for (const std::string& t : tasks) {
    absl::StatusOr<EvalTask> id = ParseEvalTask(t);
    if (!id.ok()) {
      std::fprintf(stderr, "fpxint-eval: %s\n", std::string(id.status().message()).c_str());
      return kExitUsage;
    }
    task_ids.push_back(*id);
  }
  std::vector<EvalConfig> configs;
  if (sweep) {
    configs = FullSweep();
  } else {
    // Configs start with a letter; a piece that starts with a digit is the K_a of the config
    // before it (w4a4x4,2-t0.1), not a config of its own.
    std::vector<std::string> texts;
    for (absl::string_view c : absl::StrSplit(configs_text, ',', absl::SkipWhitespace())) {
      if (!texts.empty() && absl::ascii_isdigit(static_cast<unsigned char>(c.front()))) {
        absl::StrAppend(&texts.back(), ",", c);
      } else {
        texts.emplace_back(c);
      }
    }
    for (const std::string& c : texts) {
      absl::StatusOr<EvalConfig> parsed = ParseEvalConfig(c);
      if (!parsed.ok()) {
        std::fprintf(stderr, "fpxint-eval: --config: %s\n",
                     std::string(parsed.status().message()).c_str());
        return kExitUsage;
      }
      configs.push_back(*parsed);
    }
  }
  for (EvalConfig& c : configs) {
    c.spec.include = include;
    c.spec.exclude = exclude;
  }
  if (models_dir.empty()) {
    const char* env = std::getenv("FPXINT_MODELS_DIR");
    if (env != nullptr && *env != '\0') {
      models_dir = env;
    } else {
      const char* cache = std::getenv("FPXINT_CACHE");
      const char* xdg = std::getenv("XDG_CACHE_HOME");
      const char* home = std::getenv("HOME");
      models_dir = cache && *cache ? std::string(cache) + "/models"
                   : xdg && *xdg   ? std::string(xdg) + "/fpxint/models"
                                   : std::string(home ? home : ".") + "/.cache/fpxint/models";
    }
  }

  if (packed_max_rows >= 0) fpxint::model::SetPackedMaxRows(packed_max_rows);
  core::ThreadPool pool(threads);
  std::vector<std::string> docs;
  for (EvalTask task : task_ids) {
    Evaluator::Options o;
    o.limit = limit;
    o.threads = threads;
    o.packed = packed;
    absl::StatusOr<std::unique_ptr<Evaluator>> ev = Evaluator::Load(task, models_dir, o);
    if (!ev.ok()) {
      std::fprintf(stderr, "fpxint-eval: %s: %s\n", EvalTaskName(task),
                   std::string(ev.status().message()).c_str());
      return ExitFor(ev.status());
    }
    double fp_metric = 0;
    bool header = false;
    auto print = [&](const EvalResult& r) {
      if (r.config.kind == EvalConfig::Kind::kFp) fp_metric = r.metric;
      FILE* out = json ? stderr : stdout;
      if (!header) {
        std::fprintf(out, "\n%s: %d samples, %zu layers, no calibration data\n",
                     EvalTaskName(task), r.samples, (*ev)->layers().size());
        std::fprintf(out, "%-16s %5s %5s %9s %9s %10s %10s %7s %7s\n", "config", "W bit", "A bit",
                     r.metric_name.c_str(), "vs FP", "out err", "W err", "exp s", "eval s");
        header = true;
      }
      std::fprintf(out, "%s\n", Row(r, fp_metric).c_str());
      std::fflush(out);
    };
    absl::StatusOr<std::vector<EvalResult>> results = (*ev)->Run(configs, &pool, print);
    if (!results.ok()) {
      std::fprintf(stderr, "fpxint-eval: %s: %s\n", EvalTaskName(task),
                   std::string(results.status().message()).c_str());
      return ExitFor(results.status());
    }
    docs.push_back(EvalResultsJson(task, *results));
  }
  const std::string doc = "{\"tasks\": [" + absl::StrJoin(docs, ", ") + "]}\n";
  if (json) std::fputs(doc.c_str(), stdout);
  if (!out_path.empty()) {
    std::ofstream f(out_path, std::ios::binary | std::ios::trunc);
    f << doc;
    if (!f.good()) {
      std::fprintf(stderr, "fpxint-eval: cannot write '%s'\n", out_path.c_str());
      return kExitError;
    }
  }
  return 0;
}

}  // namespace
}  // namespace fpxint::model

int main(int argc, char** argv) {
  fpxint::core::RetainTensorMemory();  // the allocator the server runs with
  return fpxint::model::Main(argc, argv);
}
