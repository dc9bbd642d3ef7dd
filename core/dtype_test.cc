#include "core/dtype.h"

#include <cmath>
#include <cstring>

#include "absl/base/casts.h"
#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(DType, NamesAndSizes) {
  for (absl::string_view n : {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                              "F64", "I64", "U64"}) {
    std::optional<DType> t = ParseDType(n);
    ASSERT_TRUE(t.has_value()) << n;
    EXPECT_EQ(DTypeName(*t), n);
  }
  EXPECT_FALSE(ParseDType("F8_E4M3").has_value());
  EXPECT_FALSE(ParseDType("f32").has_value());
  EXPECT_EQ(DTypeSize(DType::kBF16), 2);
  EXPECT_EQ(DTypeSize(DType::kF64), 8);
  EXPECT_TRUE(IsFloating(DType::kF16));
  EXPECT_FALSE(IsFloating(DType::kI8));
}

TEST(DType, HalfRoundTripsEveryValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_EQ(h & 0x7C00u, 0x7C00u);
      continue;
    }
    EXPECT_EQ(FloatToHalf(f), h) << std::hex << h;
  }
  EXPECT_EQ(HalfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7C00);  // rounds to inf
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3C00);  // tie to even
}

TEST(DType, BFloat16) {
  EXPECT_EQ(BFloat16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3F80);
  EXPECT_EQ(FloatToBFloat16(absl::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie to even
  EXPECT_EQ(FloatToBFloat16(absl::bit_cast<float>(0x3F818000u)), 0x3F82);
  for (uint32_t b = 0; b < 0x10000; b += 7) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(b));
    if (!std::isnan(f)) {
      EXPECT_EQ(FloatToBFloat16(f), b);
    }
  }
}

TEST(DType, ConvertToDoubleUnaligned) {
  const float vals[3] = {1.5f, -2.25f, 3e-8f};
  uint8_t buf[1 + sizeof(vals)];
  std::memcpy(buf + 1, vals, sizeof(vals));
  double out[3];
  ConvertToDouble(DType::kF32, buf + 1, 3, out);
  EXPECT_EQ(out[0], 1.5);
  EXPECT_EQ(out[1], -2.25);
  EXPECT_EQ(out[2], static_cast<double>(3e-8f));
}

}  // namespace
}  // namespace fpxint::core
