// File: model/budget.cc
#include "model/budget.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/expansion.h"
#include "core/name_pattern.h"
#include "core/status_macros.h"
#include "core/term_budget.h"

namespace fpxint::model {

HostTensor ProbeInput(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::mt19937 rng(20261123);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(std::max<int64_t>(0, n)));
  for (float& v : x) v = nd(rng);
  return HostTensor::Float(shape, x);
}

HostTensor TokenProbeInput(const std::vector<int64_t>& shape, int64_t vocabulary) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::mt19937 rng(20261123);
  std::uniform_int_distribution<int64_t> ids(0, std::max<int64_t>(1, vocabulary) - 1);
  std::vector<int64_t> x(static_cast<size_t>(std::max<int64_t>(0, n)));
  for (int64_t& v : x) v = ids(rng);
  return HostTensor::Int64(shape, x);
}

uint64_t PackedTermBytes(const std::vector<int64_t>& shape, const core::ExpansionSpec& spec) {
  absl::StatusOr<core::TensorLayout> l = core::TensorLayout::Make(shape, spec);
  if (!l.ok()) return 0;
  const uint64_t scales = static_cast<uint64_t>(l->num_scales(spec)) * 4;
  return static_cast<uint64_t>(l->rows * l->packed_row_bytes) +
         (spec.grid == core::Grid::kAsym ? 2 : 1) * scales;
}

absl::StatusOr<BudgetOutcome> AllocateModelTerms(Model* net, const HostTensor& probe,
                                                 const BudgetSpec& spec,
                                                 const std::atomic<bool>* cancel) {
  if (net->spec().truncate) {
    return absl::InvalidArgumentError(
        "an error budget takes weight-only or W×A expansions without order truncation");
  }
  const core::ExpansionSpec& ws = net->spec().weights;
  BudgetOutcome out;
  // The layers' sensitivity is the weights' alone (activations FP): one layer's weight error
  // moves the output smoothly, while with expanded activations a change anywhere moves codes on
  // rounding boundaries everywhere, which is noise at this scale.
  FPX_ASSIGN_OR_RETURN(std::unique_ptr<Model::Prober> weights, net->NewProber(probe));
  FPX_ASSIGN_OR_RETURN(out.sensitivity, weights->Sensitivity(spec.max_terms, cancel));
  // W×A: the whole model is measured as served, activations expanded. Its error with every
  // layer at max_terms is the floor the weights cannot go below (the activations' own error,
  // within the noise of codes moving on rounding boundaries); taken as independent of the
  // weights', the weights get what is left of the target, sqrt(target² − floor²).
  std::unique_ptr<Model::Prober> served;
  Model::Prober* prober = weights.get();
  if (!net->spec().weight_only()) {
    FPX_ASSIGN_OR_RETURN(served, net->NewProber(probe, net->spec().act_terms));
    prober = served.get();
    std::vector<int> all(net->layers().size(), 0);
    for (const Model::LayerSensitivity& s : out.sensitivity) all[s.layer] = spec.max_terms;
    FPX_ASSIGN_OR_RETURN(out.activation_floor, served->OutputError(all));
  }
  const double floor_sq = out.activation_floor * out.activation_floor;
  const auto weights_part = [&](double e) { return std::sqrt(std::max(0.0, e * e - floor_sq)); };
  std::vector<std::pair<core::NamePattern, int>> pins;
  for (const auto& [pattern, k] : spec.pins) {
    FPX_ASSIGN_OR_RETURN(core::NamePattern p, core::NamePattern::Compile(pattern, "pin"));
    pins.emplace_back(std::move(p), k);
  }
  std::vector<core::LayerBudget> layers;
  for (const Model::LayerSensitivity& s : out.sensitivity) {
    core::LayerBudget l;
    l.name = s.name;
    l.bytes_per_term = PackedTermBytes(net->layers()[s.layer].weight_shape, ws);
    l.error = s.rel_fro;
    for (const auto& [pattern, k] : pins) {
      if (pattern.Matches(s.name)) {
        l.pinned = k;
        break;
      }
    }
    out.bytes_per_term.push_back(l.bytes_per_term);
    layers.push_back(std::move(l));
  }
  const std::vector<Model::LayerSensitivity>& sens = out.sensitivity;
  auto by_layer = [&](const std::vector<int>& k) {
    std::vector<int> t(net->layers().size(), 0);
    for (size_t j = 0; j < sens.size(); ++j) t[sens[j].layer] = k[j];
    return t;
  };
  auto bytes_of = [&](const std::vector<int>& k) {
    uint64_t b = 0;
    for (size_t j = 0; j < layers.size(); ++j) {
      b += static_cast<uint64_t>(k[j]) * layers[j].bytes_per_term;
    }
    return b;
  };
  core::BudgetOptions o;
  // A target at or below the floor cannot be met: the weights then aim at a small fraction of it
  // (every layer ends at max_terms) and the outcome says not met, with the best error reached.
  o.target = spec.target > out.activation_floor ? weights_part(spec.target) : spec.target * 1e-3;
  o.min_terms = spec.min_terms;
  o.max_terms = spec.max_terms;
  FPX_ASSIGN_OR_RETURN(core::BudgetResult r, core::AllocateTerms(layers, o));
  FPX_ASSIGN_OR_RETURN(out.measured_error, prober->OutputError(by_layer(r.terms)));
  out.rounds = 1;
  constexpr int kMaxRounds = 8;
  while (out.measured_error > spec.target && out.rounds < kMaxRounds) {
    if (cancel != nullptr && cancel->load()) return absl::CancelledError("cancelled");
    const double weights_error = weights_part(out.measured_error);
    if (!(weights_error > 0)) break;  // all of it is the activations': no term helps
    FPX_ASSIGN_OR_RETURN(core::BudgetResult next, core::Tighten(layers, o, r, weights_error));
    if (next.terms == r.terms) break;  // nothing can grow
    r = std::move(next);
    FPX_ASSIGN_OR_RETURN(out.measured_error, prober->OutputError(by_layer(r.terms)));
    ++out.rounds;
  }
  out.terms = by_layer(r.terms);
  out.estimated_error = std::sqrt(r.estimated_error * r.estimated_error + floor_sq);
  out.weight_bytes = bytes_of(r.terms);
  out.met = out.measured_error <= spec.target;
  for (int k = 1; k <= o.max_terms; ++k) {
    const std::vector<int> uniform(layers.size(), k);
    FPX_ASSIGN_OR_RETURN(double e, prober->OutputError(by_layer(uniform)));
    out.uniform.push_back({k, bytes_of(uniform), e});
  }
  return out;
}

}  // namespace fpxint::model
