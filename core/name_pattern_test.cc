// The safe subset of name patterns (core/name_pattern.h): ordinary patterns pass, the shapes
// that make std::regex blow up or overflow are refused with the rule named.
#include "core/name_pattern.h"

#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(NamePattern, OrdinaryPatternsCompileAndMatch) {
  for (const char* p : {"conv.*weight", "^(encoder|decoder)\\.layers\\.[0-9]+\\.", "fc{1,2}",
                        "[{}()]", "a\\{999\\}", "x{64}", ""}) {
    auto re = CompileNamePattern(p, "include");
    ASSERT_TRUE(re.ok()) << p << ": " << re.status();
  }
  auto re = CompileNamePattern("^(encoder|decoder)\\.layers\\.[0-9]+\\.", "include");
  EXPECT_TRUE(std::regex_search("encoder.layers.12.fc", *re));
  EXPECT_FALSE(std::regex_search("head.fc", *re));
}

TEST(NamePattern, RefusesWhatStdRegexCannotTakeSafely) {
  struct Bad {
    std::string pattern;
    const char* rule;
  } bad[] = {
      {std::string(257, 'a'), "at most 256 characters"},
      {"(a)\\1", "back-references"},
      {"\\8888888888888888888888", "back-references"},
      {"a{65}", "at most 64"},
      {"a{1,99999999999999999999}", "at most 64"},
      {"a{2}b{2}c{2}", "at most 2 {m,n}"},
      {std::string(17, '(') + "a" + std::string(17, ')'), "nest at most 16"},
      {"(", "not a valid ECMAScript"},
  };
  for (const Bad& b : bad) {
    auto re = CompileNamePattern(b.pattern, "exclude");
    ASSERT_FALSE(re.ok()) << b.pattern;
    EXPECT_TRUE(absl::IsInvalidArgument(re.status()));
    EXPECT_NE(re.status().message().find(b.rule), std::string::npos) << re.status();
    EXPECT_EQ(re.status().message().rfind("exclude: ", 0), 0u) << re.status();
  }
}

}  // namespace
}  // namespace fpxint::core
