// File: core/name_pattern.cc
#include "core/name_pattern.h"

#include <re2/re2.h>

#include "absl/strings/str_cat.h"

namespace fpxint::core {

absl::StatusOr<NamePattern> NamePattern::Compile(const std::string& pattern,
                                                 absl::string_view field) {
  if (pattern.size() > kMaxNamePatternLength) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": patterns are at most ", kMaxNamePatternLength, " characters"));
  }
  RE2::Options o;
  o.set_log_errors(false);
  o.set_max_mem(1 << 20);  // bounds the compiled program (and so a{1000}{1000}-style blow-ups)
  auto re = std::make_shared<const RE2>(pattern, o);
  if (!re->ok()) {
    const bool too_big = re->error_code() == RE2::ErrorPatternTooLarge;
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": '", pattern, "' ",
        too_big ? "compiles to more than the 1 MiB a name pattern may take"
                : absl::StrCat("is not a valid RE2 regular expression (", re->error(), ")")));
  }
  return NamePattern(std::move(re));
}

bool NamePattern::Matches(absl::string_view name) const {
  return RE2::PartialMatch(re2::StringPiece(name.data(), name.size()), *re_);
}

}  // namespace fpxint::core
