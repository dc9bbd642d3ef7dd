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
