#include "core/json.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace fpxint::core {
namespace {

TEST(Json, ParsesDocumentsExactly) {
  absl::StatusOr<JsonValue> v = ParseJson(
      R"( {"a": [1, 18446744073709551615, -2.5e3, true, false, null], "s": "x\"\\\/\n\u00e9\ud83d\ude00", "o": {}} )");
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_TRUE(v->is_object());
  const JsonValue* a = v->Find("a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->array().size(), 6u);
  EXPECT_EQ(a->array()[0].AsUint64(), 1u);
  EXPECT_EQ(a->array()[1].AsUint64(), UINT64_MAX);
  EXPECT_FALSE(a->array()[2].AsUint64().has_value());
  EXPECT_EQ(a->array()[2].AsDouble(), -2500.0);
  EXPECT_TRUE(a->array()[3].boolean());
  EXPECT_EQ(a->array()[5].kind(), JsonValue::Kind::kNull);
  EXPECT_EQ(v->Find("s")->str(), "x\"\\/\n\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_EQ(v->Find("missing"), nullptr);
}

TEST(Json, RejectsMalformedInputWithOffsets) {
  const char* bad[] = {"", "{", "{\"a\":}", "{\"a\":1,}", "[1 2]", "{\"a\":1} x", "01", "1.",
                       "\"\\x\"", "\"\\ud800\"", "{\"a\":1,\"a\":2}", "\"a\nb\"", "tru", "-",
                       "{1:2}", "[\"\\u12\"]"};
  for (const char* s : bad) {
    absl::StatusOr<JsonValue> v = ParseJson(s);
    EXPECT_FALSE(v.ok()) << s;
    if (!v.ok() && std::string(s) != "{\"a\":1,\"a\":2}") {
      EXPECT_NE(v.status().message().find("at byte"), std::string::npos) << s << ": " << v.status();
    }
  }
  EXPECT_NE(ParseJson("{\"a\":1,\"a\":2}").status().message().find("duplicate key"),
            std::string::npos);
}

TEST(Json, DepthIsBounded) {
  std::string deep(100, '[');
  deep += std::string(100, ']');
  EXPECT_FALSE(ParseJson(deep, 64).ok());
  EXPECT_TRUE(ParseJson(deep, 128).ok());
  EXPECT_NE(ParseJson(std::string(100000, '[')).status().message().find("too deep"),
            std::string::npos);
}

// Objects past the hash threshold: duplicates are found wherever they are, short keys (stored
// inline in std::string) and long ones alike, and keys that differ only late are distinct.
TEST(Json, FindsDuplicateKeysAmongManyMembers) {
  const std::string long_prefix(40, 'p');
  std::string doc = "{";
  for (int i = 0; i < 5000; ++i) {
    absl::StrAppend(&doc, i ? "," : "", "\"", i % 2 ? long_prefix : "", i, "\":", i);
  }
  absl::StatusOr<JsonValue> v = ParseJson(doc + "}");
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_EQ(v->object().size(), 5000u);
  EXPECT_EQ(v->Find(absl::StrCat(long_prefix, 4999))->str(), "4999");
  for (const std::string& dup : {std::string("7"), std::string("0"), long_prefix + "4999"}) {
    // ("7" is an odd index, so without the prefix it is new; "0" and the long key repeat.)
    absl::StatusOr<JsonValue> d = ParseJson(absl::StrCat(doc, ",\"", dup, "\":1}"));
    if (dup == "7") {
      EXPECT_TRUE(d.ok()) << d.status();
    } else {
      EXPECT_NE(d.status().message().find(absl::StrCat("duplicate key \"", dup, "\"")),
                std::string::npos)
          << d.status();
    }
  }
  EXPECT_FALSE(ParseJson(R"({"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9,"a":0})").ok());
}

// max_members bounds every object and stops the parser at the first key past it.
TEST(Json, StopsAtTheMemberLimit) {
  JsonLimits limits;
  limits.max_members = 3;
  EXPECT_TRUE(ParseJson(R"({"a":1,"b":{"x":1,"y":2,"z":3},"c":3})", limits).ok());
  for (const char* doc : {R"({"a":1,"b":2,"c":3,"d":4})", R"({"a":{"w":0,"x":1,"y":2,"z":3}})",
                          R"({"a":1,"b":2,"c":3,"d" and then anything)"}) {
    absl::StatusOr<JsonValue> v = ParseJson(doc, limits);
    EXPECT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted) << doc << ": " << v.status();
    EXPECT_NE(v.status().message().find("more than 3 members"), std::string::npos) << v.status();
  }
  limits.max_depth = 1;
  EXPECT_NE(ParseJson(R"({"a":{"b":[]}})", limits).status().message().find("too deep"),
            std::string::npos);
}

TEST(Json, WriterRoundTrips) {
  JsonWriter w;
  w.BeginObject().Key("n").Int(-3).Key("d").Double(0.1).Key("inf").Double(INFINITY);
  w.Key("s").String("q\"\x01").Key("l").BeginArray().Bool(true).Null().EndArray().EndObject();
  EXPECT_EQ(w.str(), R"({"n":-3,"d":0.1,"inf":null,"s":"q\"\u0001","l":[true,null]})");
  absl::StatusOr<JsonValue> v = ParseJson(w.str());
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->Find("s")->str(), "q\"\x01");
  EXPECT_EQ(v->Find("d")->AsDouble(), 0.1);
}

}  // namespace
}  // namespace fpxint::core
