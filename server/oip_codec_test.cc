// The OIP request codec (server/oip_codec.h): what a ModelInferRequest may declare is checked
// against what it carries before anything is allocated, and every refusal names the field.
#include "server/oip_codec.h"

#include <cstring>
#include <string>

#include "absl/strings/match.h"
#include "core/dtype.h"
#include "gtest/gtest.h"

namespace fpxint::server {
namespace {

constexpr int64_t kTwoGiB = int64_t{2} << 30;

v1::Deployment Mnist() {
  v1::Deployment d;
  auto* sig = d.add_inputs();
  sig->set_name("input__0");
  sig->set_datatype("FP32");
  sig->add_shape(-1);
  sig->add_shape(784);
  return d;
}

inference::ModelInferRequest Request(const char* datatype, std::vector<int64_t> shape) {
  inference::ModelInferRequest req;
  auto* in = req.add_inputs();
  in->set_name("input__0");
  in->set_datatype(datatype);
  for (int64_t d : shape) in->add_shape(d);
  return req;
}

TEST(DecodeInferRequest, DeclaredShapeIsCheckedAgainstThePayloadBeforeUse) {
  const v1::Deployment d = Mnist();
  inference::ModelInferRequest req = Request("FP32", {342000, 784});
  req.add_raw_input_contents(std::string(60, '\0'));
  auto r = DecodeInferRequest(req, d, 0, 0, kTwoGiB);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "raw_input_contents[0]")) << r.status();
  // With a 64 MiB message limit the same shape is refused for its size alone.
  r = DecodeInferRequest(req, d, 0, 0, int64_t{64} << 20);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "--max-message-bytes")) << r.status();
  // Typed contents: the count is checked before the tensor is allocated.
  req.clear_raw_input_contents();
  req.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1.0f);
  r = DecodeInferRequest(req, d, 0, 0, kTwoGiB);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "fp32_contents")) << r.status();
}

TEST(DecodeInferRequest, Fp16AndUint8DecodeToTheirValues) {
  const v1::Deployment d = Mnist();
  inference::ModelInferRequest req = Request("FP16", {1, 784});
  std::string raw(784 * 2, '\0');
  for (int i = 0; i < 784; ++i) {
    const uint16_t h = core::FloatToHalf(static_cast<float>(i) / 8);
    std::memcpy(&raw[2 * i], &h, 2);
  }
  req.add_raw_input_contents(raw);
  auto r = DecodeInferRequest(req, d, 0, 0, kTwoGiB);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->raw);
  EXPECT_EQ(r->owned.shape, (std::vector<int64_t>{1, 784}));
  EXPECT_EQ(r->owned.f32[100], 12.5f);
  EXPECT_EQ(r->input().data, r->owned.f32.data());  // converted, not borrowed  // exact in FP16
  inference::ModelInferRequest u8 = Request("UINT8", {1, 784});
  for (int i = 0; i < 784; ++i) u8.mutable_inputs(0)->mutable_contents()->add_uint_contents(i % 256);
  r = DecodeInferRequest(u8, d, 0, 0, kTwoGiB);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->owned.f32[300], 44.0f);
  u8.mutable_inputs(0)->mutable_contents()->set_uint_contents(3, 256);
  r = DecodeInferRequest(u8, d, 0, 0, kTwoGiB);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "UINT8 values are 0..255")) << r.status();
}

TEST(DecodeInferRequest, TermParametersAreBoundedByTheDeployment) {
  const v1::Deployment d = Mnist();
  inference::ModelInferRequest req = Request("FP32", {1, 784});
  req.add_raw_input_contents(std::string(784 * 4, '\0'));
  (*req.mutable_parameters())["fpxint_terms"].set_int64_param(2);
  auto r = DecodeInferRequest(req, d, /*max_terms=*/3, /*max_act_terms=*/0, kTwoGiB);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->weight_terms, 2);
  (*req.mutable_parameters())["fpxint_terms"].set_int64_param(4);
  r = DecodeInferRequest(req, d, 3, 0, kTwoGiB);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "parameters.fpxint_terms: 4; this model has 1..3"))
      << r.status();
  r = DecodeInferRequest(req, d, 0, 0, kTwoGiB);  // an FP model
  EXPECT_TRUE(absl::StrContains(r.status().message(), "not an fpxint series expansion")) << r.status();
  (*req.mutable_parameters())["fpxint_terms"].set_string_param("2");
  r = DecodeInferRequest(req, d, 3, 0, kTwoGiB);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "must be an int64_param")) << r.status();
  req.mutable_parameters()->erase("fpxint_terms");
  (*req.mutable_parameters())["fpxint_act_terms"].set_int64_param(1);
  r = DecodeInferRequest(req, d, 3, 0, kTwoGiB);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "does not expand activations")) << r.status();
}

TEST(DecodeInferRequest, RawBytesOfTheModelsTypeAreReadInPlace) {
  const v1::Deployment d = Mnist();
  inference::ModelInferRequest req = Request("FP32", {2, 784});
  std::string raw(2 * 784 * 4, '\0');
  const float v = 0.75f;
  std::memcpy(&raw[4 * 785], &v, 4);
  req.add_raw_input_contents(raw);
  auto r = DecodeInferRequest(req, d, 0, 0, kTwoGiB);
  ASSERT_TRUE(r.ok()) << r.status();
  const model::HostTensorRef in = r->input();
  EXPECT_EQ(in.data, static_cast<const void*>(req.raw_input_contents(0).data()));
  EXPECT_TRUE(r->owned.f32.empty());  // nothing allocated for the values
  EXPECT_EQ(std::vector<int64_t>(in.shape.begin(), in.shape.end()),
            (std::vector<int64_t>{2, 784}));
  EXPECT_EQ(static_cast<const float*>(in.data)[785], 0.75f);
  EXPECT_EQ(r->batch(), 2);
}

TEST(EncodeInferResponse, AnswersInTheRequestsKind) {
  const model::HostTensor y = model::HostTensor::Float({1, 3}, {1.5f, -2.0f, 0.25f});
  inference::ModelInferResponse raw, typed;
  ASSERT_TRUE(EncodeInferResponse(y.shape, y.f32, /*raw=*/true, &raw).ok());
  ASSERT_EQ(raw.raw_output_contents_size(), 1);
  float back[3];
  std::memcpy(back, raw.raw_output_contents(0).data(), sizeof(back));
  EXPECT_EQ(back[1], -2.0f);
  ASSERT_TRUE(EncodeInferResponse(y.shape, y.f32, /*raw=*/false, &typed).ok());
  ASSERT_EQ(typed.outputs_size(), 1);
  EXPECT_EQ(typed.outputs(0).datatype(), "FP32");
  EXPECT_EQ(typed.outputs(0).contents().fp32_contents(2), 0.25f);
  EXPECT_EQ(typed.outputs(0).shape_size(), 2);
}

}  // namespace
}  // namespace fpxint::server
