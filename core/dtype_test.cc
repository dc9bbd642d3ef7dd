#include "core/dtype.h"

#include <cmath>
#include <cstring>

#include "absl/base/casts.h"
#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(DType, NamesAndSizes) {
  for (absl::string_view n : {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                              "F64", "I64", "U64", "F8_E4M3", "F8_E5M2"}) {
    std::optional<DType> t = ParseDType(n);
    ASSERT_TRUE(t.has_value()) << n;
    EXPECT_EQ(DTypeName(*t), n);
  }
  EXPECT_FALSE(ParseDType("F8_E4M3FNUZ").has_value());
  EXPECT_FALSE(ParseDType("f32").has_value());
  EXPECT_EQ(DTypeSize(DType::kF8E4M3), 1);
  EXPECT_TRUE(IsFloating(DType::kF8E5M2));
  EXPECT_EQ(DTypeSize(DType::kBF16), 2);
  EXPECT_EQ(DTypeSize(DType::kF64), 8);
  EXPECT_TRUE(IsFloating(DType::kF16));
  EXPECT_FALSE(IsFloating(DType::kI8));
}

// Every one of the 256 codes of each FP8 format against the format's definition, evaluated
// independently in double: (-1)^s * 2^(e - bias) * (1 + m / 2^M) for normals, 2^(1 - bias) *
// m / 2^M for subnormals; E4M3 has NaN at S.1111.111 and no infinity, E5M2 has IEEE inf/NaN.
double Fp8Reference(uint8_t c, int exp_bits, int man_bits, bool ieee_specials) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int e = (c >> man_bits) & ((1 << exp_bits) - 1);
  const int m = c & ((1 << man_bits) - 1);
  const double sign = (c & 0x80) ? -1.0 : 1.0;
  const int e_max = (1 << exp_bits) - 1;
  if (ieee_specials && e == e_max) return m == 0 ? sign * INFINITY : NAN;
  if (!ieee_specials && e == e_max && m == (1 << man_bits) - 1) return NAN;
  if (e == 0) return sign * std::ldexp(static_cast<double>(m), 1 - bias - man_bits);
  return sign * std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -man_bits), e - bias);
}

TEST(DType, Fp8CodesConvertExactly) {
  int nan_e4m3 = 0, nan_e5m2 = 0, inf_e5m2 = 0;
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    const double want4 = Fp8Reference(code, 4, 3, /*ieee_specials=*/false);
    const float got4 = Fp8E4M3ToFloat(code);
    if (std::isnan(want4)) {
      EXPECT_TRUE(std::isnan(got4)) << std::hex << c;
      ++nan_e4m3;
    } else {
      EXPECT_EQ(static_cast<double>(got4), want4) << std::hex << c;
      EXPECT_EQ(std::signbit(got4), (c & 0x80) != 0) << std::hex << c;  // -0 stays -0
    }
    const double want5 = Fp8Reference(code, 5, 2, /*ieee_specials=*/true);
    const float got5 = Fp8E5M2ToFloat(code);
    if (std::isnan(want5)) {
      EXPECT_TRUE(std::isnan(got5)) << std::hex << c;
      ++nan_e5m2;
    } else {
      EXPECT_EQ(static_cast<double>(got5), want5) << std::hex << c;
      inf_e5m2 += std::isinf(got5);
    }
  }
  EXPECT_EQ(nan_e4m3, 2);
  EXPECT_EQ(nan_e5m2, 6);
  EXPECT_EQ(inf_e5m2, 2);
  // The formats' landmarks.
  EXPECT_EQ(Fp8E4M3ToFloat(0x7E), 448.0f);                   // E4M3 max
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));     // smallest subnormal
  EXPECT_EQ(Fp8E4M3ToFloat(0x08), std::ldexp(1.0f, -6));     // smallest normal
  EXPECT_EQ(Fp8E4M3ToFloat(0x38), 1.0f);
  EXPECT_EQ(Fp8E5M2ToFloat(0x7B), 57344.0f);                 // E5M2 max
  EXPECT_EQ(Fp8E5M2ToFloat(0x01), std::ldexp(1.0f, -16));
  EXPECT_EQ(Fp8E5M2ToFloat(0x3C), 1.0f);
  // ConvertToDouble reads them as an expansion input.
  const uint8_t src[3] = {0x38, 0xC0, 0x7E};
  double out[3];
  ConvertToDouble(DType::kF8E4M3, src, 3, out);
  EXPECT_EQ(out[0], 1.0);
  EXPECT_EQ(out[1], -2.0);
  EXPECT_EQ(out[2], 448.0);
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
