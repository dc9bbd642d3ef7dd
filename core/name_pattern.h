// File: core/name_pattern.h
//
// The include/exclude patterns that select tensors and layers by name (ECMAScript regular
// expressions) come from users and, through the service, from the network. std::regex compiles
// patterns into an automaton whose size is the product of the repetition counts, recurses on
// nesting, and overflows on long back-reference numbers, so only a safe subset is accepted:
// at most 256 characters, no back-references, brace repetition counts of at most 64 and at most
// two brace repetitions, parentheses nested at most 16 deep. That is plenty for names like
// "conv.*weight" or "^(encoder|decoder)\.layers\.[0-9]+\.".
#ifndef FPXINT_CORE_NAME_PATTERN_H_
#define FPXINT_CORE_NAME_PATTERN_H_

#include <regex>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fpxint::core {

// InvalidArgument "<field>: ..." saying which rule the pattern breaks.
absl::Status CheckNamePattern(const std::string& pattern, absl::string_view field);

// CheckNamePattern, then compiles (ECMAScript); syntax errors are InvalidArgument too.
absl::StatusOr<std::regex> CompileNamePattern(const std::string& pattern, absl::string_view field);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_NAME_PATTERN_H_
