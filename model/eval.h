// File: model/eval.h
//
// Accuracy of expanded models on the real evaluation sets of scripts/fetch_models.sh
// (docs/ARCHITECTURE.md "Real models and data"): the PaddleOCR recognizer (character accuracy on
// rendered Brown-corpus lines) and orientation classifier, a Fashion-MNIST CNN, and a
// character-level language model (perplexity). No calibration data is used anywhere: expansions
// are built from the weights alone, activation scales come from each input at run time.
//
// A configuration is written as text (the `fpxint-eval --config` grammar):
//   fp                        the FP32 model
//   rtn<B>                    plain round-to-nearest, sym per output channel, B bits (its own
//                             implementation, not the expansion; K=1 must equal it)
//   w<B>x<K>[-opts]           series expansion of the weights, K terms of B bits
//   w<B>a<A>x<K>[,<Ka>][-opts]  weights and activations expanded (K_w = K, K_a = Ka or K)
//   opts: sym | mid | asym (grid; default sym), digits (variant D), trunc (order truncation),
//         t<X> (an error budget, weight-only: each layer's K in 1..K chosen on the data-free
//         probe so that the output error is at most X),
//         atensor (activation scales per tensor instead of the finest factorable grouping),
//         tensor | channel | g<G> (weight scale granularity; default channel)
// e.g. "w4x2", "w2x4-mid", "w4a4x2", "w4a4x3-trunc", "w4x2-g128".
//
// Example:
//   FPX_ASSIGN_OR_RETURN(auto ev, Evaluator::Load(EvalTask::kOcrRec, models_dir, {}));
//   FPX_ASSIGN_OR_RETURN(auto results, ev->Run({*ParseEvalConfig("fp"), ...}, &pool, nullptr));
#ifndef FPXINT_MODEL_EVAL_H_
#define FPXINT_MODEL_EVAL_H_

#include <functional>
#include <memory>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/thread_pool.h"
#include "model/model.h"

namespace fpxint::model {

enum class EvalTask { kOcrRec, kOcrCls, kFmnist, kCharLm };

// "ocr_rec", "ocr_cls", "fmnist", "charlm".
absl::StatusOr<EvalTask> ParseEvalTask(absl::string_view name);
const char* EvalTaskName(EvalTask task);

struct EvalConfig {
  enum class Kind { kFp, kRtn, kSeries };
  Kind kind = Kind::kFp;
  ModelExpansionSpec spec;  // kSeries: the expansion (terms = kw, act_terms = ka); kRtn: bits
  int kw = 0;
  int ka = 0;
  // "-t<X>": an error budget (docs/ALGORITHM.md §6a): each layer gets its own K in 1..kw,
  // chosen on the data-free probe so that its output error is at most X. Weight-only.
  double target = 0;
  std::string label;  // canonical text form (ParseEvalConfig(label) gives this config back)

  // Bits per weight (K_w·b) and per activation (K_a·b_a; 32 when FP).
  double weight_bits() const;
  double act_bits() const;
};

// InvalidArgument naming the part that is wrong and the accepted grammar.
absl::StatusOr<EvalConfig> ParseEvalConfig(absl::string_view text);
// The full sweep of `make eval`: fp; rtn b; and for b ∈ {2,3,4}, grids sym and mid,
// K ∈ {1..4}: weight-only and W+A (K_w = K_a = K); W+A order-truncated for b=4 sym.
std::vector<EvalConfig> FullSweep();

struct EvalResult {
  EvalConfig config;
  std::string metric_name;        // "char_acc" | "accuracy" (percent) | "perplexity"
  double metric = 0;
  double line_acc = -1;           // ocr_rec: percent of lines decoded exactly; else -1
  double output_rel_err = 0;      // ‖y − y_FP‖_F / ‖y_FP‖_F over every output of the set
  double weight_rel_fro = 0;      // ‖W − Ŵ‖_F / ‖W‖_F over all expanded weights together
  std::string weights_sha256;     // of the effective fp32 weights of the expanded layers
  int layers = 0;                 // expanded layers
  int samples = 0;
  double expand_seconds = 0;      // building the expansion (at the largest K of its group)
  double eval_seconds = 0;
  // An error budget's row: the bits per weight its terms average (K_i·b weighted by the layers'
  // sizes), the probe error it measured, and how many layers got each K.
  double budget_weight_bits = 0;
  double budget_probe_error = 0;
  std::map<int, int> budget_layers_per_k;
};

class Evaluator {
 public:
  struct Options {
    int limit = 0;    // evaluate only the first `limit` samples (0: all)
    int threads = 2;  // LibTorch intra-op threads
    bool packed = false;  // weight-only configs run on the packed low-bit ops (Model::Options)
  };
  // Loads the task's model and data from models_dir (scripts/fetch_models.sh). NotFound with the
  // command to run when a file is missing.
  static absl::StatusOr<std::unique_ptr<Evaluator>> Load(EvalTask task,
                                                         const std::string& models_dir,
                                                         const Options& options);
  ~Evaluator();

  EvalTask task() const;
  const std::vector<LayerInfo>& layers() const;

  // Evaluates every config (FP first, as the reference of output_rel_err, whether asked or
  // not). Configs that differ only in K share one expansion. `on_result` (may be null) is called
  // after each config, in order.
  absl::StatusOr<std::vector<EvalResult>> Run(
      const std::vector<EvalConfig>& configs, core::ThreadPool* pool,
      const std::function<void(const EvalResult&)>& on_result);

 private:
  struct Impl;
  explicit Evaluator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// {"task", "model", "samples", "calibration_data": "none", "results": [{"config", "kind", "bits",
// "weight_terms", "act_bits", "act_terms", "grid", "scale", "truncate", "weight_bits",
// "act_bits_effective", metric_name, "line_acc", "output_rel_err", "weight_rel_fro",
// "weights_sha256", "expand_seconds", "eval_seconds"}]}
std::string EvalResultsJson(EvalTask task, const std::vector<EvalResult>& results);

// Levenshtein distance between two sequences of code points.
int EditDistance(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b);

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_EVAL_H_
