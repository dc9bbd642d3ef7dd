#include "core/quant_spec.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace fpxint::core {

absl::Status ExpansionSpec::Validate() const {
  const int min_bits = grid == Grid::kSym ? 2 : 1;
  if (bits < min_bits || bits > kMaxBits) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bits: ", bits, " is out of range; accepted ", min_bits, "..", kMaxBits, " for grid ",
        GridName(grid), grid == Grid::kSym ? " (a 1-bit symmetric grid has only the level 0)" : ""));
  }
  if (terms < 1 || terms > kMaxTerms) {
    return absl::InvalidArgumentError(
        absl::StrCat("terms: ", terms, " is out of range; accepted 1..", kMaxTerms));
  }
  if (variant == Variant::kDigits && grid != Grid::kMid) {
    return absl::InvalidArgumentError(
        absl::StrCat("variant digits needs grid mid (its codes are base-2^b digits); got grid ",
                     GridName(grid)));
  }
  if (scale == ScaleGranularity::kGroup) {
    if (group_size < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group_size: ", group_size, "; scale group needs a group size >= 1 (e.g. 64 or 128)"));
    }
  } else if (group_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("group_size: ", group_size,
                                                   " is only accepted with scale group, not ",
                                                   ScaleName(scale)));
  }
  if (unsigned_first && grid != Grid::kSym) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsigned_first needs grid sym (its later terms are signed residuals); got grid ",
        GridName(grid)));
  }
  if (!std::isfinite(eps) || eps < 0 || eps >= 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("eps: ", eps, " is out of range; accepted 0 (off) or 0 < eps < 1"));
  }
  return absl::OkStatus();
}

int ExpansionSpec::code_min() const {
  switch (grid) {
    case Grid::kSym: return -((1 << (bits - 1)) - 1);
    case Grid::kAsym: return 0;
    case Grid::kMid: return -(1 << (bits - 1));
  }
  return 0;
}

int ExpansionSpec::code_max() const {
  switch (grid) {
    case Grid::kSym: return (1 << (bits - 1)) - 1;
    case Grid::kAsym: return (1 << bits) - 1;
    case Grid::kMid: return (1 << (bits - 1)) - 1;
  }
  return 0;
}

double ExpansionSpec::contraction() const {
  switch (grid) {
    case Grid::kSym: return 1.0 / ((1 << bits) - 2);
    case Grid::kAsym: return 1.0 / ((1 << bits) - 1);
    case Grid::kMid: return std::ldexp(1.0, -bits);
  }
  return 1;
}

std::string ExpansionSpec::ToString() const {
  std::string s = absl::StrCat("b=", bits, " K=", terms, " ", GridName(grid), " ",
                               VariantName(variant), " ", ScaleName(scale));
  if (scale == ScaleGranularity::kGroup) absl::StrAppend(&s, " g=", group_size);
  if (eps > 0) absl::StrAppend(&s, " eps=", eps);
  if (unsigned_first) absl::StrAppend(&s, " unsigned-first");
  return s;
}

absl::string_view GridName(Grid g) {
  switch (g) {
    case Grid::kSym: return "sym";
    case Grid::kAsym: return "asym";
    case Grid::kMid: return "mid";
  }
  return "?";
}
absl::string_view VariantName(Variant v) {
  return v == Variant::kRescaled ? "rescaled" : "digits";
}
absl::string_view ScaleName(ScaleGranularity s) {
  switch (s) {
    case ScaleGranularity::kTensor: return "tensor";
    case ScaleGranularity::kChannel: return "channel";
    case ScaleGranularity::kGroup: return "group";
  }
  return "?";
}
std::optional<Grid> ParseGrid(absl::string_view s) {
  if (s == "sym") return Grid::kSym;
  if (s == "asym") return Grid::kAsym;
  if (s == "mid") return Grid::kMid;
  return std::nullopt;
}
std::optional<Variant> ParseVariant(absl::string_view s) {
  if (s == "rescaled" || s == "R") return Variant::kRescaled;
  if (s == "digits" || s == "D") return Variant::kDigits;
  return std::nullopt;
}
std::optional<ScaleGranularity> ParseScale(absl::string_view s) {
  if (s == "tensor") return ScaleGranularity::kTensor;
  if (s == "channel") return ScaleGranularity::kChannel;
  if (s == "group") return ScaleGranularity::kGroup;
  return std::nullopt;
}

}  // namespace fpxint::core
