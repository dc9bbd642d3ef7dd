#include "core/quant_spec.h"

#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(QuantSpec, CodeRangesAndContraction) {
  ExpansionSpec s;
  s.bits = 4;
  s.grid = Grid::kSym;
  EXPECT_EQ(s.code_min(), -7);
  EXPECT_EQ(s.code_max(), 7);
  EXPECT_DOUBLE_EQ(s.contraction(), 1.0 / 14);
  s.grid = Grid::kAsym;
  EXPECT_EQ(s.code_min(), 0);
  EXPECT_EQ(s.code_max(), 15);
  EXPECT_DOUBLE_EQ(s.contraction(), 1.0 / 15);
  s.grid = Grid::kMid;
  EXPECT_EQ(s.code_min(), -8);
  EXPECT_EQ(s.code_max(), 7);
  EXPECT_DOUBLE_EQ(s.contraction(), 1.0 / 16);
  EXPECT_TRUE(s.is_packed());
  s.bits = 3;
  EXPECT_FALSE(s.is_packed());
  EXPECT_EQ(s.packing_name(), "byte");
}

TEST(QuantSpec, ValidationNamesTheField) {
  auto error_of = [](ExpansionSpec s) { return std::string(s.Validate().message()); };
  ExpansionSpec ok;
  EXPECT_TRUE(ok.Validate().ok());
  ExpansionSpec s = ok;
  s.bits = 1;  // sym needs 2
  EXPECT_NE(error_of(s).find("bits: 1"), std::string::npos);
  s.grid = Grid::kMid;
  EXPECT_TRUE(s.Validate().ok());
  s = ok;
  s.bits = 9;
  EXPECT_NE(error_of(s).find("accepted 2..8"), std::string::npos);
  s = ok;
  s.terms = 0;
  EXPECT_NE(error_of(s).find("terms"), std::string::npos);
  s = ok;
  s.variant = Variant::kDigits;
  EXPECT_NE(error_of(s).find("needs grid mid"), std::string::npos);
  s = ok;
  s.scale = ScaleGranularity::kGroup;
  EXPECT_NE(error_of(s).find("group_size"), std::string::npos);
  s.group_size = 64;
  EXPECT_TRUE(s.Validate().ok());
  s.scale = ScaleGranularity::kChannel;
  EXPECT_NE(error_of(s).find("only accepted with scale group"), std::string::npos);
  s = ok;
  s.eps = 1.5;
  EXPECT_NE(error_of(s).find("eps"), std::string::npos);
}

TEST(QuantSpec, NamesRoundTrip) {
  for (Grid g : {Grid::kSym, Grid::kAsym, Grid::kMid}) EXPECT_EQ(ParseGrid(GridName(g)), g);
  for (Variant v : {Variant::kRescaled, Variant::kDigits}) EXPECT_EQ(ParseVariant(VariantName(v)), v);
  for (ScaleGranularity s : {ScaleGranularity::kTensor, ScaleGranularity::kChannel,
                             ScaleGranularity::kGroup}) {
    EXPECT_EQ(ParseScale(ScaleName(s)), s);
  }
  EXPECT_FALSE(ParseGrid("symmetric").has_value());
}

}  // namespace
}  // namespace fpxint::core
