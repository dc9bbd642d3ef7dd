// Job files (client/job_file.h): YAML and JSON to a JobSpec, typed scalars, and the bounds that
// keep a hostile file from exhausting the parser.
#include "client/job_file.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace fpxint::client {
namespace {

TEST(JobFile, YamlAndJsonGiveTheSameSpec) {
  const char* yaml =
      "# w4x2\n"
      "model: ocr_rec\n"
      "granularity: layer\n"
      "bits: 4\n"
      "terms: 2\n"
      "scale: channel\n"
      "outputs: [packed_safetensors, dequantized_torchscript]\n"
      "deploy:\n"
      "  enabled: true\n"
      "  name: 'ocr_rec_w4x2'\n";
  auto y = ParseYamlOrJson(yaml);
  ASSERT_TRUE(y.ok()) << y.status();
  auto j = ParseYamlOrJson(
      R"({"model": "ocr_rec", "granularity": "layer", "bits": 4, "terms": 2, "scale": "channel",
          "outputs": ["packed_safetensors", "dequantized_torchscript"],
          "deploy": {"enabled": true, "name": "ocr_rec_w4x2"}})");
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ(*y, *j);
  auto spec = JobSpecFromJson(*y);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model(), "ocr_rec");
  EXPECT_EQ(spec->weight_bits(), 4u);
  EXPECT_EQ(spec->weight_terms(), 2u);
  EXPECT_TRUE(spec->deploy().enabled());
  EXPECT_EQ(spec->deploy().name(), "ocr_rec_w4x2");
}

// An error budget in a job file: the target, the bounds, and pins as one string or a list.
TEST(JobFile, ErrorBudgetFieldsAndPinLists) {
  for (const char* pins : {"'conv.*=3'", "['conv.*=3', 'fc=1']"}) {
    auto y = ParseYamlOrJson(absl::StrCat("model: m\ngranularity: layer\n"
                                          "target_rel_error: 0.01\nmax_terms: 3\n"
                                          "weight_terms_for: ", pins, "\n"));
    ASSERT_TRUE(y.ok()) << y.status();
    auto spec = JobSpecFromJson(*y);
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->target_rel_error(), 0.01);
    EXPECT_EQ(spec->max_terms(), 3u);
    ASSERT_GE(spec->weight_terms_for_size(), 1);
    EXPECT_EQ(spec->weight_terms_for(0), "conv.*=3");
  }
  auto bad = ParseYamlOrJson("model: m\nweight_terms_for: [3]\n");
  ASSERT_TRUE(bad.ok());
  EXPECT_NE(JobSpecFromJson(*bad).status().message().find("weight_terms_for"), std::string::npos);
}

TEST(JobFile, DeploymentBatchingTakesAListOrOneSize) {
  for (const char* sizes : {"4", "[4, 8]"}) {
    auto y = ParseYamlOrJson(absl::StrCat("model: m\ngranularity: layer\ndeploy_as: m-b\n"
                                          "deploy:\n  batching:\n    max_batch_size: 8\n"
                                          "    preferred_batch_size: ", sizes, "\n"
                                          "    max_queue_delay_microseconds: 500\n"));
    ASSERT_TRUE(y.ok()) << y.status();
    auto spec = JobSpecFromJson(*y);
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_TRUE(spec->deploy().enabled());
    EXPECT_EQ(spec->deploy().name(), "m-b");
    EXPECT_EQ(spec->deploy().batching().max_batch_size(), 8u);
    ASSERT_GE(spec->deploy().batching().preferred_batch_size_size(), 1);
    EXPECT_EQ(spec->deploy().batching().preferred_batch_size(0), 4u);
    EXPECT_EQ(spec->deploy().batching().max_queue_delay_microseconds(), 500u);
  }
  auto bad = ParseYamlOrJson("model: m\ndeploy:\n  batching:\n    preferred_batch_size: [x]\n");
  ASSERT_TRUE(bad.ok());
  EXPECT_NE(JobSpecFromJson(*bad).status().message().find(
                "deploy.batching.preferred_batch_size: expected non-negative integers"),
            std::string::npos)
      << JobSpecFromJson(*bad).status();
}

TEST(JobFile, PlainScalarsAreTypedQuotedOnesAreStrings) {
  auto v = ParseYamlOrJson("a: 4\nb: '4'\nc: true\nd: \"true\"\ne: 1.5e-3\nf: ~\ng: conv.*\n");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_TRUE((*v)["a"].is_number_integer());
  EXPECT_TRUE((*v)["b"].is_string());
  EXPECT_TRUE((*v)["c"].is_boolean());
  EXPECT_TRUE((*v)["d"].is_string());
  EXPECT_DOUBLE_EQ((*v)["e"].get<double>(), 1.5e-3);
  EXPECT_TRUE((*v)["f"].is_null());
  EXPECT_EQ((*v)["g"], "conv.*");
}

TEST(JobFile, BadAndHostileFilesAreRefusedWithTheLine) {
  struct Bad {
    std::string text;
    const char* reason;
  } bad[] = {
      {"model: a\nmodel: b\n", "line 2: duplicate key 'model'"},
      {"model: [a\n", "line"},
      {std::string(20, '[') + std::string(20, ']'), "nested too deeply"},
      {"a:\n" + std::string(65, ' ') + "b: 1\n", "indented more than 64"},
      {"- - - - - - - - - - - - - - - - - - - - x\n", "line 1: nested too deeply"},
      // 9 levels of 10 aliases each: 10^9 values once expanded.
      {"a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
       "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",
       "more than 10000 values"},
      {std::string("model: \xff\n"), "not UTF-8"},
      {std::string((1 << 20) + 1, ' '), "at most 1048576 bytes"},
  };
  for (const Bad& b : bad) {
    auto v = ParseYamlOrJson(b.text);
    ASSERT_FALSE(v.ok()) << b.text.substr(0, 80);
    EXPECT_TRUE(absl::IsInvalidArgument(v.status()));
    EXPECT_NE(v.status().message().find(b.reason), std::string::npos) << v.status();
  }
}

}  // namespace
}  // namespace fpxint::client
