#include "model/abelian.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace fpxint::model {
namespace {

absl::Status SameArchitecture(const ModelParams& a, const ModelParams& b) {
  if (a.layers.size() != b.layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat("models differ in architecture: ",
                                                   a.layers.size(), " vs ", b.layers.size(),
                                                   " layers"));
  }
  for (size_t i = 0; i < a.layers.size(); ++i) {
    const LayerParams& x = a.layers[i];
    const LayerParams& y = b.layers[i];
    if (x.name != y.name || x.shape != y.shape || x.bias.size() != y.bias.size()) {
      return absl::InvalidArgumentError(absl::StrCat("models differ in architecture at layer ", i,
                                                     ": '", x.name, "' vs '", y.name, "'"));
    }
  }
  return absl::OkStatus();
}

template <typename F>
ModelParams Map(const ModelParams& a, F f) {
  ModelParams out = a;
  for (LayerParams& l : out.layers) {
    for (double& v : l.weight) v = f(v);
    for (double& v : l.bias) v = f(v);
  }
  return out;
}

}  // namespace

absl::StatusOr<ModelParams> AbelianAdd(const ModelParams& a, const ModelParams& b) {
  if (absl::Status s = SameArchitecture(a, b); !s.ok()) return s;
  ModelParams out = a;
  for (size_t i = 0; i < out.layers.size(); ++i) {
    LayerParams& l = out.layers[i];
    for (size_t j = 0; j < l.weight.size(); ++j) l.weight[j] += b.layers[i].weight[j];
    for (size_t j = 0; j < l.bias.size(); ++j) l.bias[j] += b.layers[i].bias[j];
  }
  return out;
}

ModelParams AbelianScale(double s, const ModelParams& a) {
  return Map(a, [s](double v) { return s * v; });
}

absl::StatusOr<ModelParams> AbelianScaleChannels(const std::vector<std::vector<double>>& s,
                                                 const ModelParams& a) {
  if (s.size() != a.layers.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("channel scales for ", s.size(), " layers; the model has ", a.layers.size()));
  }
  ModelParams out = a;
  for (size_t i = 0; i < out.layers.size(); ++i) {
    LayerParams& l = out.layers[i];
    const int64_t rows = l.shape.empty() ? 0 : l.shape[0];
    if (static_cast<int64_t>(s[i].size()) != rows) {
      return absl::InvalidArgumentError(absl::StrCat("layer '", l.name, "' has ", rows,
                                                     " output channels; got ", s[i].size(),
                                                     " scales"));
    }
    const size_t row_len = rows ? l.weight.size() / rows : 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (size_t j = 0; j < row_len; ++j) l.weight[r * row_len + j] *= s[i][r];
      if (!l.bias.empty()) l.bias[r] *= s[i][r];
    }
  }
  return out;
}

ModelParams ZeroModel(const ModelParams& like) {
  return Map(like, [](double) { return 0.0; });
}

ModelParams Neg(const ModelParams& a) {
  return Map(a, [](double v) { return -v; });
}

absl::StatusOr<std::pair<double, double>> MaxAbsDiff(const ModelParams& a, const ModelParams& b) {
  if (absl::Status s = SameArchitecture(a, b); !s.ok()) return s;
  double diff = 0, mag = 0;
  for (size_t i = 0; i < a.layers.size(); ++i) {
    for (size_t j = 0; j < a.layers[i].weight.size(); ++j) {
      diff = std::max(diff, std::fabs(a.layers[i].weight[j] - b.layers[i].weight[j]));
      mag = std::max(mag, std::fabs(a.layers[i].weight[j]));
    }
    for (size_t j = 0; j < a.layers[i].bias.size(); ++j) {
      diff = std::max(diff, std::fabs(a.layers[i].bias[j] - b.layers[i].bias[j]));
      mag = std::max(mag, std::fabs(a.layers[i].bias[j]));
    }
  }
  return std::make_pair(diff, mag);
}

}  // namespace fpxint::model
