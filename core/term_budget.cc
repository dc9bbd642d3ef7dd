// File: core/term_budget.cc
#include "core/term_budget.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace fpxint::core {
namespace {

absl::Status Validate(const std::vector<LayerBudget>& layers, const BudgetOptions& o) {
  if (!(o.target > 0) || !std::isfinite(o.target)) {
    return absl::InvalidArgumentError(
        absl::StrCat("target_rel_error: ", o.target, "; accepted a finite value > 0"));
  }
  if (o.min_terms < 1 || o.max_terms < o.min_terms) {
    return absl::InvalidArgumentError(absl::StrCat("min_terms ", o.min_terms, ", max_terms ",
                                                   o.max_terms,
                                                   "; accepted 1 <= min_terms <= max_terms"));
  }
  for (const LayerBudget& l : layers) {
    if (l.bytes_per_term == 0) {
      return absl::InvalidArgumentError(absl::StrCat("layer '", l.name, "': no bytes per term"));
    }
    if (l.error.size() < static_cast<size_t>(o.max_terms)) {
      return absl::InvalidArgumentError(absl::StrCat("layer '", l.name, "': errors for ",
                                                     l.error.size(), " term counts, not ",
                                                     o.max_terms, " (max_terms)"));
    }
    for (double e : l.error) {
      if (!(e >= 0) || !std::isfinite(e)) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer '", l.name, "': error ", e, "; accepted finite values >= 0"));
      }
    }
    if (l.pinned < 0 || l.pinned > static_cast<int>(l.error.size())) {
      return absl::InvalidArgumentError(absl::StrCat("layer '", l.name, "': pinned to ", l.pinned,
                                                     " terms; accepted 1 .. ", l.error.size()));
    }
  }
  return absl::OkStatus();
}

double Sq(double x) { return x * x; }

// Greedy from `terms` until the estimate is at most `target` or nothing can grow.
BudgetResult Grow(const std::vector<LayerBudget>& layers, const BudgetOptions& o,
                  std::vector<int> terms, double target) {
  double sum = 0;
  for (size_t i = 0; i < layers.size(); ++i) sum += Sq(layers[i].error[terms[i] - 1]);
  const double goal = Sq(target);
  while (sum > goal) {
    size_t best = layers.size();
    double best_gain = -1;
    for (size_t i = 0; i < layers.size(); ++i) {
      if (layers[i].pinned > 0 || terms[i] >= o.max_terms) continue;
      const double gain = (Sq(layers[i].error[terms[i] - 1]) - Sq(layers[i].error[terms[i]])) /
                          static_cast<double>(layers[i].bytes_per_term);
      if (gain > best_gain) {  // strict: ties keep the lower index
        best_gain = gain;
        best = i;
      }
    }
    if (best == layers.size()) break;
    sum += Sq(layers[best].error[terms[best]]) - Sq(layers[best].error[terms[best] - 1]);
    ++terms[best];
  }
  BudgetResult r;
  r.terms = std::move(terms);
  sum = 0;  // summed afresh: no drift from the increments
  for (size_t i = 0; i < layers.size(); ++i) {
    sum += Sq(layers[i].error[r.terms[i] - 1]);
    r.bytes += static_cast<uint64_t>(r.terms[i]) * layers[i].bytes_per_term;
  }
  r.estimated_error = std::sqrt(sum);
  r.met = r.estimated_error <= target;
  return r;
}

}  // namespace

absl::StatusOr<BudgetResult> AllocateTerms(const std::vector<LayerBudget>& layers,
                                           const BudgetOptions& options) {
  FPX_RETURN_IF_ERROR(Validate(layers, options));
  std::vector<int> start;
  start.reserve(layers.size());
  for (const LayerBudget& l : layers) start.push_back(l.pinned > 0 ? l.pinned : options.min_terms);
  return Grow(layers, options, std::move(start), options.target);
}

absl::StatusOr<BudgetResult> Tighten(const std::vector<LayerBudget>& layers,
                                     const BudgetOptions& options, const BudgetResult& from,
                                     double measured) {
  FPX_RETURN_IF_ERROR(Validate(layers, options));
  if (from.terms.size() != layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat("an allocation of ", from.terms.size(),
                                                   " layers for ", layers.size()));
  }
  if (!(measured > 0) || !std::isfinite(measured)) {
    return absl::InvalidArgumentError(absl::StrCat("measured error ", measured));
  }
  const double scale = from.estimated_error > 0 ? from.estimated_error / measured : 0.5;
  return Grow(layers, options, from.terms, options.target * std::min(scale, 1.0));
}

}  // namespace fpxint::core
