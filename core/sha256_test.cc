#include "core/sha256.h"

#include <string>

#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::core {
namespace {

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(Sha256Hex({}), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  Sha256 abc;
  abc.Update("abc");
  EXPECT_EQ(abc.HexDigest(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 two;
  two.Update("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq");
  EXPECT_EQ(two.HexDigest(), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // One million 'a', fed in uneven pieces.
  Sha256 million;
  const std::string chunk(999, 'a');
  size_t fed = 0;
  while (fed + chunk.size() <= 1000000) {
    million.Update(chunk);
    fed += chunk.size();
  }
  million.Update(std::string(1000000 - fed, 'a'));
  EXPECT_EQ(million.HexDigest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// Lengths around the block and padding boundaries, hashed in one piece and in uneven pieces,
// must agree with Python's hashlib (the expected values were computed with it).
TEST(Sha256, BoundaryLengthsMatchHashlib) {
  std::string data(200003, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>((i * 131 + 7) % 251);
  const std::pair<size_t, const char*> want[] = {
      {0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {1, "ca358758f6d27e6cf45272937977a748fd88391db679ceda7dc7bf1f005ee879"},
      {55, "4cfcc2771bfe1d9569dff80565efddb245e4f480503e29f39cabd2a803df639a"},
      {56, "8c6fabc04644a28838809bbf23aac665f574f8e350c3fc620aecd58193fc6fe9"},
      {63, "f9740f526ff5b76381fbd8f27333de45ff77bc1e6cd2d696357f837f2c6fb3bd"},
      {64, "0277d2ee9ab7ac130da65c6f8b6612449f1f95adc68597a55393ebfde47d72cb"},
      {65, "b04cf89fc1dd2c3998754469afe354193d0351a8869a4c01c78e5f3fd9c288c5"},
      {127, "992a17878e3683d5c81a18b53db21dc913e01024a42d175ac1dba027a20101a3"},
      {128, "d7e35d44a21df6aedb1dde3425d95884df446995820ccec65182c2d821d21727"},
      {129, "348401f3769d1b8d811658094df5707030d3c7f0305ac490c98dafacba11487b"},
      {1000, "557a0d461baa2b2c24a7b8bf35cb30016e7044666719436f38a03d7e84238259"},
      {4096, "67b0fa68baf258208cd0f5b6108908b74652bf5e28f709bddd3d4a02c4a61b44"},
      {65537, "75e8966773f5830475602adee3b28fb106e4dee8cec366c56379fcc06b293e9f"},
      {200003, "eb4785eb81e9f53f995ce21fffb016c5eb2b84fabd2d3affb1e8584231dee88c"},
  };
  for (const auto& [n, hex] : want) {
    const absl::string_view d(data.data(), n);
    Sha256 whole;
    whole.Update(d);
    EXPECT_EQ(whole.HexDigest(), hex) << n << " bytes in one piece";
    Sha256 pieces;
    for (size_t off = 0, step = 1; off < n; off += step, step = step * 3 % 197 + 1) {
      pieces.Update(d.substr(off, step));
    }
    EXPECT_EQ(pieces.HexDigest(), hex) << n << " bytes in pieces";
  }
}

TEST(Sha256, FileMatchesBuffer) {
  ::fpxint::testing::ScratchDir dir;
  std::string data(3 * 1024 * 1024 + 17, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 131 + 7);
  ::fpxint::testing::WriteFileOrDie(dir.File("x"), data);
  absl::StatusOr<std::string> h = Sha256File(dir.File("x"));
  ASSERT_TRUE(h.ok()) << h.status();
  Sha256 s;
  s.Update(data);
  EXPECT_EQ(*h, s.HexDigest());
  EXPECT_EQ(Sha256File(dir.File("missing")).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace fpxint::core
