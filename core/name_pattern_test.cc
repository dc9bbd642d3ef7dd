// Name patterns (core/name_pattern.h): ordinary patterns compile and match as a search; what
// would make a backtracking engine blow up either compiles to a linear-time matcher or is refused
// with the field and the reason.
#include "core/name_pattern.h"

#include <string>

#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(NamePattern, OrdinaryPatternsCompileAndMatch) {
  for (const char* p : {"conv.*weight", "^(encoder|decoder)\\.layers\\.[0-9]+\\.", "fc{1,2}",
                        "[{}()]", "a\\{999\\}", "x{64}", ""}) {
    auto re = NamePattern::Compile(p, "include");
    ASSERT_TRUE(re.ok()) << p << ": " << re.status();
  }
  auto re = NamePattern::Compile("^(encoder|decoder)\\.layers\\.[0-9]+\\.", "include");
  ASSERT_TRUE(re.ok());
  EXPECT_TRUE(re->Matches("encoder.layers.12.fc"));
  EXPECT_FALSE(re->Matches("head.fc"));
  auto any = NamePattern::Compile("fc", "include");
  ASSERT_TRUE(any.ok());
  EXPECT_TRUE(any->Matches("encoder.fc.weight"));  // a search, not a full match
  EXPECT_TRUE(NamePattern::Compile("", "include")->Matches("anything"));
}

// (a|a)*b and (a*)*b take exponential time in a backtracking engine on "aaaa…c"; RE2 answers
// at once. The test would not finish with std::regex at this length.
TEST(NamePattern, MatchingIsLinear) {
  const std::string name(100000, 'a');
  for (const char* p : {"(a|a)*b", "(a*)*b", "(a+)+b"}) {
    auto re = NamePattern::Compile(p, "include");
    ASSERT_TRUE(re.ok()) << p;
    EXPECT_FALSE(re->Matches(name)) << p;
  }
}

TEST(NamePattern, RefusesWithTheFieldAndTheReason) {
  struct Bad {
    std::string pattern;
    const char* reason;
  } bad[] = {
      {std::string(257, 'a'), "at most 256 characters"},
      {"(a)\\1", "not a valid RE2"},  // back-references do not exist in RE2
      {"a{1001}", "not a valid RE2"},  // RE2 caps repetition counts at 1000
      {"((((a{10}){10}){10}){10}){10}", "not a valid RE2"},  // repetitions nest to at most 1000
      {"\\pL{1000}", "more than the 1 MiB"},  // a Unicode class 1000 times
      {"(", "not a valid RE2"},
  };
  for (const Bad& b : bad) {
    auto re = NamePattern::Compile(b.pattern, "exclude");
    ASSERT_FALSE(re.ok()) << b.pattern;
    EXPECT_TRUE(absl::IsInvalidArgument(re.status()));
    EXPECT_NE(re.status().message().find(b.reason), std::string::npos) << re.status();
    EXPECT_EQ(re.status().message().rfind("exclude: ", 0), 0u) << re.status();
  }
}

}  // namespace
}  // namespace fpxint::core
