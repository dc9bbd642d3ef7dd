// File: core/quant_spec.h
//
// The options of one FP=xINT tensor expansion (docs/ALGORITHM.md §1–§2) and their validation.
//
//   grid   codes                          scale s                    value      r (k ≥ 2)
//   sym    [-(2^(b-1)-1), 2^(b-1)-1]      m / (2^(b-1)-1)            s·C        1/(2^b-2)
//   asym   [0, 2^b-1]                     (max-min)/(2^b-1)          s·(C-z)    1/(2^b-1)
//   mid    [-2^(b-1), 2^(b-1)-1]          m / 2^(b-1)                s·(C+½)    2^-b
#ifndef FPXINT_CORE_QUANT_SPEC_H_
#define FPXINT_CORE_QUANT_SPEC_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace fpxint::core {

enum class Grid : uint8_t { kSym, kAsym, kMid };
enum class Variant : uint8_t {
  kRescaled,  // R: every term takes its scale from its own residual (default)
  kDigits,    // D: grid mid, s_{k+1} = s_k / 2^b; the K codes are base-2^b digits
};
enum class ScaleGranularity : uint8_t {
  kTensor,   // one scale for the whole tensor, stored as [1,1]
  kChannel,  // one per output channel (dim 0), stored as [dim0,1]
  kGroup,    // one per g consecutive elements of a row, stored as [dim0, ceil(row/g)]
};

inline constexpr int kMaxBits = 8;
inline constexpr int kMaxTerms = 64;

struct ExpansionSpec {
  int bits = 4;
  int terms = 2;  // K, or the cap on K when eps > 0
  Grid grid = Grid::kSym;
  Variant variant = Variant::kRescaled;
  ScaleGranularity scale = ScaleGranularity::kChannel;
  int64_t group_size = 0;  // g, only for kGroup
  double eps = 0;          // > 0: stop once max|R_k| <= eps * m in every group (or R_k == 0)
  // Term 1 on the unsigned grid [0, 2^b-1] with s = m/(2^b-1) (docs/ALGORITHM.md §3: the first
  // term of a non-negative activation, e.g. after ReLU); later terms are signed residuals. Grid
  // sym only; the tensor must have no negative value. Not stored in artifacts (weights are signed).
  bool unsigned_first = false;

  // InvalidArgument naming the field and the accepted values.
  absl::Status Validate() const;

  bool is_signed() const { return grid != Grid::kAsym; }
  // Codes are packed 8/b per byte for b in {1,2,4}; otherwise one code per byte.
  bool is_packed() const { return bits == 1 || bits == 2 || bits == 4; }
  int code_min() const;
  int code_max() const;
  // True when term k (1-based) has unsigned codes.
  bool term_is_unsigned(int k) const { return grid == Grid::kAsym || (unsigned_first && k == 1); }
  // The contraction r of the residual per term (docs/ALGORITHM.md §1 table).
  double contraction() const;
  // "lsb_first" (packed) or "byte".
  absl::string_view packing_name() const { return is_packed() ? "lsb_first" : "byte"; }
  // One-line summary such as "b=4 K=2 sym rescaled channel".
  std::string ToString() const;
};

absl::string_view GridName(Grid g);
absl::string_view VariantName(Variant v);
absl::string_view ScaleName(ScaleGranularity s);
std::optional<Grid> ParseGrid(absl::string_view s);
std::optional<Variant> ParseVariant(absl::string_view s);
std::optional<ScaleGranularity> ParseScale(absl::string_view s);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_QUANT_SPEC_H_
