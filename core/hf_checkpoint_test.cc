#include "core/hf_checkpoint.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(HfCheckpoint, SafeRelativePaths) {
  for (const char* ok : {"model.safetensors", "config.json", "tokenizer/vocab.txt",
                         "model-00001-of-00002.safetensors", "_x", "a/b/c/d"}) {
    EXPECT_TRUE(IsSafeRelativePath(ok)) << ok;
  }
  for (const char* bad : {"", "/etc/passwd", "../x", "a/../b", ".hidden", "a//b", "a/", "a b",
                          "a/b/c/d/e", "x\\y", "\xc3\xa9"}) {
    EXPECT_FALSE(IsSafeRelativePath(bad)) << bad;
  }
  EXPECT_FALSE(IsSafeRelativePath(std::string(129, 'a')));
  EXPECT_TRUE(IsSafeRelativePath(std::string(128, 'a')));
}

TEST(HfCheckpoint, ParsesAnIndexAndWritesItBack) {
  const std::string text = R"({"metadata": {"total_size": 1234, "format": "pt", "n": 3},
    "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                   "b.weight": "model-00002-of-00002.safetensors",
                   "a.bias": "model-00001-of-00002.safetensors"}})";
  absl::StatusOr<HfIndex> idx = ParseHfIndex(text);
  ASSERT_TRUE(idx.ok()) << idx.status();
  ASSERT_TRUE(idx->total_size.has_value());
  EXPECT_EQ(*idx->total_size, 1234u);
  ASSERT_EQ(idx->metadata.size(), 1u);  // the number-valued "n" is dropped
  EXPECT_EQ(idx->metadata[0].first, "format");
  ASSERT_EQ(idx->weight_map.size(), 3u);
  EXPECT_EQ(idx->weight_map[2].first, "a.bias");
  ASSERT_EQ(idx->shards.size(), 2u);
  EXPECT_EQ(idx->shards[0], "model-00001-of-00002.safetensors");
  absl::StatusOr<HfIndex> again = ParseHfIndex(HfIndexToJson(*idx));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->weight_map, idx->weight_map);
  EXPECT_EQ(again->metadata, idx->metadata);
  EXPECT_EQ(again->total_size, idx->total_size);
}

TEST(HfCheckpoint, RefusesBadIndexesNamingTheMember) {
  auto err = [](const std::string& text) {
    absl::StatusOr<HfIndex> r = ParseHfIndex(text);
    return r.ok() ? std::string("ok") : std::string(r.status().message());
  };
  EXPECT_NE(err("{}").find("weight_map"), std::string::npos);
  EXPECT_NE(err(R"({"weight_map": []})").find("not an object"), std::string::npos);
  EXPECT_NE(err(R"({"weight_map": {}})").find("empty"), std::string::npos);
  EXPECT_NE(err(R"({"weight_map": {"w": 3}})").find("weight_map['w']"), std::string::npos);
  EXPECT_NE(err(R"({"weight_map": {"w": "../../etc/passwd"}})").find("not a plain relative"),
            std::string::npos);
  EXPECT_NE(err(R"({"weight_map": {"w": "a", "w": "b"}})").find("w"), std::string::npos);
  EXPECT_NE(err(R"({"metadata": 1, "weight_map": {"w": "a"}})").find("metadata"),
            std::string::npos);
  EXPECT_NE(err("[1]").find("object"), std::string::npos);
  EXPECT_NE(err("{").find(kHfIndexFile), std::string::npos);
}

TEST(HfCheckpoint, LimitsStopLargeIndexes) {
  std::string text = R"({"weight_map": {)";
  for (int i = 0; i < 100; ++i) absl::StrAppend(&text, i ? "," : "", "\"t", i, "\": \"s", i, "\"");
  text += "}}";
  HfIndexLimits l;
  l.max_tensors = 50;
  EXPECT_EQ(ParseHfIndex(text, l).status().code(), absl::StatusCode::kResourceExhausted);
  l.max_tensors = 1000;
  l.max_shards = 10;
  absl::StatusOr<HfIndex> r = ParseHfIndex(text, l);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  l.max_bytes = 10;
  EXPECT_EQ(ParseHfIndex(text, l).status().code(), absl::StatusCode::kResourceExhausted);
  l = HfIndexLimits{};
  r = ParseHfIndex(text, l);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->shards.size(), 100u);
}

}  // namespace
}  // namespace fpxint::core
