// The model layer's plain data (HostTensor, ModelExpansionSpec): no LibTorch, so that the server's
// input validation and the fuzzers can use them without loading LibTorch.
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "model/model.h"

namespace fpxint::model {

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t HostTensorRef::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

HostTensorRef HostTensorRef::Of(const HostTensor& t) {
  HostTensorRef r;
  r.type = t.type;
  r.shape = t.shape;
  r.data = t.type == HostTensor::Type::kFloat32 ? static_cast<const void*>(t.f32.data())
                                                : static_cast<const void*>(t.i64.data());
  return r;
}

HostTensor HostTensor::Float(std::vector<int64_t> shape, std::vector<float> data) {
  HostTensor t;
  t.type = Type::kFloat32;
  t.shape = std::move(shape);
  t.f32 = std::move(data);
  return t;
}

HostTensor HostTensor::Int64(std::vector<int64_t> shape, std::vector<int64_t> data) {
  HostTensor t;
  t.type = Type::kInt64;
  t.shape = std::move(shape);
  t.i64 = std::move(data);
  return t;
}

bool ModelExpansionSpec::Folds(std::string* how) const {
  const auto fail = [&](absl::string_view why) {
    if (how != nullptr) {
      *how = absl::StrCat("separate term products (not folded: ", why, ")");
    }
    return false;
  };
  if (act_terms == 0) return fail("weight-only");
  if (truncate) return fail("order truncation drops some products");
  if (weights.variant != core::Variant::kDigits || act_variant != core::Variant::kDigits ||
      act_grid != core::Grid::kMid) {
    return fail("folding needs variant digits with grid mid for weights and activations");
  }
  if (weights.scale == core::ScaleGranularity::kGroup) return fail("group weight scales");
  if (weights.bits * weights.terms > 8 || act_bits * act_terms > 8) {
    return fail(absl::StrCat("K·b is ", weights.bits * weights.terms, " bits for weights and ",
                             act_bits * act_terms, " for activations; at most 8 each"));
  }
  if (how != nullptr) {
    *how = absl::StrCat("folded: each linear layer and 1x1 convolution runs its ",
                        weights.terms * act_terms, " term products as one u8 x s8 product (",
                        weights.bits * weights.terms, "-bit weight codes x ",
                        act_bits * act_terms, "-bit activation codes)");
  }
  return true;
}

absl::Status ModelExpansionSpec::Validate() const {
  FPX_RETURN_IF_ERROR(weights.Validate());
  if (weights.unsigned_first) {
    return absl::InvalidArgumentError("weights: unsigned_first applies to activations only");
  }
  if (act_terms < 0 || act_terms > core::kMaxTerms) {
    return absl::InvalidArgumentError(
        absl::StrCat("act_terms: ", act_terms, "; accepted 0 (weight-only) .. ", core::kMaxTerms));
  }
  if (truncate && act_terms == 0) {
    return absl::InvalidArgumentError(
        "truncate: order truncation needs expanded activations (act_terms >= 1)");
  }
  if (act_terms > 0) {
    core::ExpansionSpec a;
    a.bits = act_bits;
    a.terms = act_terms;
    a.grid = act_grid;
    a.variant = act_variant;
    if (absl::Status s = a.Validate(); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("activations: ", s.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace fpxint::model
