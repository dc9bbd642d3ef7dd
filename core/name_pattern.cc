#include "core/name_pattern.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace fpxint::core {
namespace {

constexpr size_t kMaxLength = 256;
constexpr int kMaxDepth = 16;
constexpr int kMaxCount = 64;
constexpr int kMaxBraces = 2;

absl::Status Bad(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

}  // namespace

absl::Status CheckNamePattern(const std::string& p, absl::string_view field) {
  if (p.size() > kMaxLength) {
    return Bad(field, absl::StrCat("patterns are at most ", kMaxLength, " characters"));
  }
  int depth = 0, braces = 0;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\') {
      if (i + 1 < p.size() && p[i + 1] >= '1' && p[i + 1] <= '9' && !in_class) {
        return Bad(field, "back-references (\\1 ... \\9) are not accepted");
      }
      ++i;  // the escaped character is literal
      continue;
    }
    if (in_class) {
      if (c == ']') in_class = false;
      continue;
    }
    if (c == '[') {
      in_class = true;
    } else if (c == '(') {
      if (++depth > kMaxDepth) {
        return Bad(field, absl::StrCat("parentheses nest at most ", kMaxDepth, " deep"));
      }
    } else if (c == ')') {
      depth = depth > 0 ? depth - 1 : 0;
    } else if (c == '{') {
      // {m}, {m,} or {m,n}: every count at most kMaxCount.
      size_t j = i + 1;
      bool quantifier = false;
      int64_t count = 0;
      for (; j < p.size() && p[j] != '}'; ++j) {
        if (absl::ascii_isdigit(static_cast<unsigned char>(p[j]))) {
          count = count * 10 + (p[j] - '0');
          quantifier = true;
          if (count > kMaxCount) {
            return Bad(field, absl::StrCat("repetition counts {m,n} are at most ", kMaxCount));
          }
        } else if (p[j] == ',') {
          count = 0;
        } else {
          quantifier = false;
          break;
        }
      }
      if (quantifier && ++braces > kMaxBraces) {
        return Bad(field, absl::StrCat("at most ", kMaxBraces, " {m,n} repetitions"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::regex> CompileNamePattern(const std::string& pattern, absl::string_view field) {
  if (absl::Status s = CheckNamePattern(pattern, field); !s.ok()) return s;
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    return Bad(field, absl::StrCat("'", pattern, "' is not a valid ECMAScript regular expression (",
                                   e.what(), ")"));
  }
}

}  // namespace fpxint::core
