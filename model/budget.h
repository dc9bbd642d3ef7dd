// File: model/budget.h
//
// Error-budgeted term counts on a model (docs/ALGORITHM.md §6a), shared by the job executor and
// fpxint-eval: the data-free probe input, and the allocation of each layer's K from the layers'
// sensitivity, checked on the whole model.
#ifndef FPXINT_MODEL_BUDGET_H_
#define FPXINT_MODEL_BUDGET_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model.h"

namespace fpxint::model {

// The data-free probe input: fixed-seed N(0,1) float32 values of `shape` (deterministic: the
// same shape gives the same values).
HostTensor ProbeInput(const std::vector<int64_t>& shape);
// The data-free probe of a token model: fixed-seed token ids uniform in [0, vocabulary) of
// `shape`, int64 (Model::token_vocabulary gives the vocabulary).
HostTensor TokenProbeInput(const std::vector<int64_t>& shape, int64_t vocabulary);

struct BudgetSpec {
  double target = 0;  // the probe output's relative error to meet, > 0
  int min_terms = 1;
  int max_terms = 4;
  // (RE2 pattern searched in the layer name, K): the first matching entry pins a layer's K.
  std::vector<std::pair<std::string, int>> pins;
};

struct BudgetOutcome {
  std::vector<Model::LayerSensitivity> sensitivity;  // every expanded layer, K = 1..max_terms
  std::vector<uint64_t> bytes_per_term;              // per entry of `sensitivity`
  std::vector<int> terms;          // per layer, indexed as Model::layers() (0: not expanded)
  double estimated_error = 0;      // from the sensitivity (layers independent)
  double activation_floor = 0;     // W×A: the error with every layer at max_terms (0 weight-only)
  double measured_error = 0;       // the whole model on the probe at `terms`
  int rounds = 0;                  // whole-model measurements taken
  uint64_t weight_bytes = 0;       // packed bytes of the expanded layers' terms at `terms`
  struct Uniform {
    int terms = 0;
    uint64_t weight_bytes = 0;
    double rel_error = 0;
  };
  std::vector<Uniform> uniform;    // one K for every layer, K = 1..max_terms
  bool met = false;                // measured_error <= target
};

// The packed bytes one term of a weight of this shape costs: codes and scales (and zero points
// on the asym grid).
uint64_t PackedTermBytes(const std::vector<int64_t>& shape, const core::ExpansionSpec& spec);

// `net` must hold an expansion with max_terms terms in every expanded layer, weight-only or W×A
// without order truncation. Measures the layers' (weight-only) sensitivity, allocates
// (core::AllocateTerms), measures the whole model and grows the allocation while it is above the
// target (core::Tighten, a few rounds at most). W×A: the whole model is measured as served, with
// expanded activations, and the weights are allocated against sqrt(target² − floor²), the floor
// being that network's error with every layer at max_terms. Does not change the expansion: when `met`,
// the caller keeps the terms (Model::KeepTerms(outcome.terms)).
absl::StatusOr<BudgetOutcome> AllocateModelTerms(Model* net, const HostTensor& probe,
                                                 const BudgetSpec& spec,
                                                 const std::atomic<bool>* cancel = nullptr);

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_BUDGET_H_
