// File: core/term_budget.h
//
// Error-budgeted term counts (docs/ALGORITHM.md "Error budget"): how many terms K_i each layer
// gets so that the model's output error meets a target at the fewest weight bytes.
//
// Per layer i the allocator is given the bytes one more term costs (b bits per weight plus its
// scales) and the layer's sensitivity: the model's relative output error e_i(K) on the data-free
// probe input when only layer i is expanded with K terms and every other layer is FP. Layers'
// errors are taken as independent, so the model's error is estimated as sqrt(Σ_i e_i(K_i)²).
// Every layer starts at min_terms (or its pinned K), and terms are added one at a time where
// they remove the most estimated squared error per byte, until the estimate meets the target or
// no layer can take another term. The caller then measures the whole model at that allocation;
// when the measurement is above the target (the layers' errors are not quite independent),
// Tighten goes on from there against a target scaled by how far the estimate was off.
//
// Deterministic: the same input gives the same allocation; ties go to the lower layer index.
#ifndef FPXINT_CORE_TERM_BUDGET_H_
#define FPXINT_CORE_TERM_BUDGET_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fpxint::core {

struct LayerBudget {
  std::string name;
  uint64_t bytes_per_term = 0;  // > 0
  // error[K - 1] = e_i(K) for K = 1 .. max_terms (relative output error, >= 0).
  std::vector<double> error;
  int pinned = 0;  // > 0: the layer keeps exactly this K (a user's --weight-terms-for)
};

struct BudgetOptions {
  double target = 0;  // the relative output error to meet, > 0
  int min_terms = 1;
  int max_terms = 4;
};

struct BudgetResult {
  std::vector<int> terms;        // K_i, per layer in the input's order
  double estimated_error = 0;    // sqrt(Σ e_i(K_i)²)
  uint64_t bytes = 0;            // Σ K_i · bytes_per_term_i
  bool met = false;              // estimated_error <= the target it was allocated against
};

// InvalidArgument, naming the field or the layer, for a target <= 0, min_terms < 1,
// max_terms < min_terms, a layer with no bytes, an error table shorter than max_terms (or with
// a negative or non-finite entry), or a pinned K outside 1..its table.
absl::StatusOr<BudgetResult> AllocateTerms(const std::vector<LayerBudget>& layers,
                                           const BudgetOptions& options);

// After the whole model, measured at `from.terms`, had the relative error `measured` (above the
// target): allocates further from `from` (no layer loses a term) against the target scaled by
// from.estimated_error / measured. `met` then compares the estimate with that scaled target.
absl::StatusOr<BudgetResult> Tighten(const std::vector<LayerBudget>& layers,
                                     const BudgetOptions& options, const BudgetResult& from,
                                     double measured);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_TERM_BUDGET_H_
