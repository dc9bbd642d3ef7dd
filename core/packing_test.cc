#include "core/packing.h"

#include <random>

#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(Packing, RowBytes) {
  EXPECT_EQ(PackedRowBytes(7, 4), 4);
  EXPECT_EQ(PackedRowBytes(8, 4), 4);
  EXPECT_EQ(PackedRowBytes(9, 2), 3);
  EXPECT_EQ(PackedRowBytes(9, 1), 2);
  EXPECT_EQ(PackedRowBytes(9, 3), 9);
  EXPECT_EQ(PackedRowBytes(9, 8), 9);
}

TEST(Packing, LowestBitsFirstTwosComplement) {
  const uint8_t codes[] = {static_cast<uint8_t>(-3), 5, static_cast<uint8_t>(-8)};
  uint8_t out[2];
  PackCodes(codes, 3, 4, out);
  EXPECT_EQ(out[0], 0x5D);  // low nibble -3 = 0xD, high nibble 5
  EXPECT_EQ(out[1], 0x08);  // -8 = 0x8, unused high nibble zero
  const uint8_t two[] = {1, static_cast<uint8_t>(-2), static_cast<uint8_t>(-1), 0, 1};
  PackCodes(two, 5, 2, out);
  EXPECT_EQ(out[0], 0b00111001);  // 01, 10, 11, 00 from the lowest bits up
  EXPECT_EQ(out[1], 0b00000001);
  const uint8_t one[] = {1, 0, 1, 1, 0, 0, 0, 1, 1};
  PackCodes(one, 9, 1, out);
  EXPECT_EQ(out[0], 0b10001101);
  EXPECT_EQ(out[1], 0b00000001);
}

TEST(Packing, RoundTripEveryWidthAndSignedness) {
  std::mt19937 rng(1);
  for (int bits = 1; bits <= 8; ++bits) {
    for (bool is_signed : {true, false}) {
      const int lo = is_signed ? -(1 << (bits - 1)) : 0;
      const int hi = is_signed ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
      std::uniform_int_distribution<int> dist(lo, hi);
      for (int64_t n : {1, 2, 3, 5, 8, 17, 1000}) {
        std::vector<int32_t> want(n);
        std::vector<uint8_t> codes(n);
        for (int64_t i = 0; i < n; ++i) {
          want[i] = dist(rng);
          codes[i] = static_cast<uint8_t>(want[i]);
        }
        std::vector<uint8_t> packed(PackedRowBytes(n, bits));
        PackCodes(codes.data(), n, bits, packed.data());
        std::vector<int32_t> got(n);
        UnpackCodes(packed.data(), n, bits, is_signed, got.data());
        ASSERT_EQ(got, want) << "bits=" << bits << " signed=" << is_signed << " n=" << n;
      }
    }
  }
}

}  // namespace
}  // namespace fpxint::core
