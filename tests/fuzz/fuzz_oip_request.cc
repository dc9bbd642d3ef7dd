// libFuzzer target: OIP ModelInfer request decoding (server/oip_codec.h) — names, datatypes,
// shapes, typed and raw contents, parameters — against three deployments: an FP model with a
// fixed FP32 signature, a series model with a variable batch, and an INT64 token model.
// Invariants: a decoded input's element count matches its shape; one read in place points into
// the request at exactly the shape's bytes, aligned.
#include <cstdint>
#include <cstdlib>

#include "server/oip_codec.h"
#include "server/server.h"

namespace {

fpxint::v1::Deployment MakeDeployment(int which) {
  fpxint::v1::Deployment d;
  d.set_name("m");
  d.set_version("1");
  auto* sig = d.add_inputs();
  sig->set_name(which == 2 ? "tokens" : "input__0");
  if (which == 0) {
    d.set_platform("pytorch_torchscript");
    sig->set_datatype("FP32");
    for (int64_t v : {1, 3, 8, 8}) sig->add_shape(v);
  } else if (which == 1) {
    d.set_platform("fpxint_series");
    sig->set_datatype("FP32");
    for (int64_t v : {-1, 16}) sig->add_shape(v);
  } else {
    d.set_platform("fpxint_series");
    sig->set_datatype("INT64");
    for (int64_t v : {1, -1}) sig->add_shape(v);
  }
  return d;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const fpxint::v1::Deployment kDeployments[3] = {MakeDeployment(0), MakeDeployment(1),
                                                         MakeDeployment(2)};
  const int which = data[0] % 3;
  inference::ModelInferRequest req;
  if (!req.ParseFromArray(data + 1, static_cast<int>(size - 1))) return 0;
  const int max_terms = which == 0 ? 0 : 4;
  // The server's default message limit: a declared shape may claim up to that many bytes.
  static const int64_t kMaxMessage = fpxint::server::ServerConfig{}.max_message_bytes;
  auto dec = fpxint::server::DecodeInferRequest(req, kDeployments[which], max_terms,
                                                which == 0 ? 0 : 2, kMaxMessage);
  if (!dec.ok()) return 0;
  const fpxint::model::HostTensorRef t = dec->input();
  int64_t n = 1;
  for (int64_t d : t.shape) {
    if (d < 0) std::abort();
    n *= d;
  }
  const bool i64 = t.type == fpxint::model::HostTensor::Type::kInt64;
  const size_t esize = i64 ? sizeof(int64_t) : sizeof(float);
  if (dec->borrowed != nullptr) {
    // Read in place: the raw payload holds exactly the shape's values, aligned for them.
    if (t.data != req.raw_input_contents(0).data()) std::abort();
    if (req.raw_input_contents(0).size() != static_cast<size_t>(n) * esize) std::abort();
    if (reinterpret_cast<uintptr_t>(t.data) % esize != 0) std::abort();
  } else {
    const size_t have = i64 ? dec->owned.i64.size() : dec->owned.f32.size();
    if (static_cast<size_t>(n) != have) std::abort();
  }
  if (dec->weight_terms < 0 || dec->weight_terms > max_terms) std::abort();
  // Encoding an output of the same shape back must work.
  inference::ModelInferResponse resp;
  if (!i64) {
    (void)fpxint::server::EncodeInferResponse(
        t.shape, absl::MakeConstSpan(static_cast<const float*>(t.data), static_cast<size_t>(n)),
        dec->raw, &resp);
  }
  return 0;
}
