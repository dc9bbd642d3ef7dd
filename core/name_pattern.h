// File: core/name_pattern.h
//
// The include/exclude patterns that select tensors and layers by name come from users and,
// through the service, from the network. They are RE2 regular expressions (the syntax of
// https://github.com/google/re2/wiki/Syntax: ECMAScript's for everything a name pattern needs,
// without back-references or look-around), which match in time linear in the name and compile
// within a fixed memory budget, so no pattern can stall or exhaust the server. Patterns are at
// most 256 characters. Matching is a search: "fc" selects "encoder.fc.weight"; anchor with ^ $.
//
// Example: "^(encoder|decoder)\.layers\.[0-9]+\."
#ifndef FPXINT_CORE_NAME_PATTERN_H_
#define FPXINT_CORE_NAME_PATTERN_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace re2 {
class RE2;
}

namespace fpxint::core {

class NamePattern {
 public:
  // InvalidArgument "<field>: ..." for a pattern that is too long, does not parse (RE2's reason),
  // or is too large to compile within the budget.
  static absl::StatusOr<NamePattern> Compile(const std::string& pattern, absl::string_view field);

  // True when the pattern occurs somewhere in `name`.
  bool Matches(absl::string_view name) const;

 private:
  explicit NamePattern(std::shared_ptr<const re2::RE2> re) : re_(std::move(re)) {}
  std::shared_ptr<const re2::RE2> re_;  // immutable and thread-safe: copies share it
};

inline constexpr size_t kMaxNamePatternLength = 256;

}  // namespace fpxint::core

#endif  // FPXINT_CORE_NAME_PATTERN_H_
