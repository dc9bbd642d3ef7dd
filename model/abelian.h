// File: model/abelian.h
//
// AbelianAdd / AbelianMul between isomorphic models (docs/ALGORITHM.md §5). The carrier is the
// vector space of the linear parameters (weights and biases of the expanded layers) of one
// architecture; everything else (the graph, non-linear ops, normalisation statistics) is shared. A
// model of the group is ModelParams; Model::UseParams turns one back into a runnable TorchScript
// network.
//
//   abelian_add(a, b) = θa + θb      zero_model(a) = 0      neg(a) = −θa
//   abelian_scale(s, a) = s·θa (per output channel when s has one entry per channel)
//
// Addition is elementwise fp64; it is commutative bit for bit and associative up to rounding
// (exactly for the integer codes of the basis models, see core/expansion.h).
#ifndef FPXINT_MODEL_ABELIAN_H_
#define FPXINT_MODEL_ABELIAN_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fpxint::model {

struct LayerParams {
  std::string name;
  std::vector<int64_t> shape;  // expansion layout: [out, ...]
  std::vector<double> weight;
  std::vector<double> bias;    // empty when the layer has none
};

struct ModelParams {
  std::vector<LayerParams> layers;
};

// InvalidArgument when a and b are not of one architecture (layer names, shapes).
absl::StatusOr<ModelParams> AbelianAdd(const ModelParams& a, const ModelParams& b);
ModelParams AbelianScale(double s, const ModelParams& a);
// Per-output-channel scale: one factor per row of every layer, in layer order. InvalidArgument
// when the count does not match.
absl::StatusOr<ModelParams> AbelianScaleChannels(const std::vector<std::vector<double>>& s,
                                                 const ModelParams& a);
ModelParams ZeroModel(const ModelParams& like);
ModelParams Neg(const ModelParams& a);
// max |a − b| over all parameters and max |a|: for tolerance checks. InvalidArgument on mismatch.
absl::StatusOr<std::pair<double, double>> MaxAbsDiff(const ModelParams& a, const ModelParams& b);

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_ABELIAN_H_
