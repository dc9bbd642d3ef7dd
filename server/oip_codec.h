// File: server/oip_codec.h
//
// Decoding of OIP ModelInfer requests into the model layer's host tensors, and encoding of the
// outputs. Every field of the request is checked before use: names, datatypes, shapes against the
// model's signature, element counts, and raw byte counts (prod(shape) * sizeof(datatype)).
#ifndef FPXINT_SERVER_OIP_CODEC_H_
#define FPXINT_SERVER_OIP_CODEC_H_

#include <string>

#include "absl/status/statusor.h"
#include "fpxint/v1/server_state.pb.h"
#include "inference/grpc_service.pb.h"
#include "model/model.h"

namespace fpxint::server {

inline constexpr char kInputName[] = "input__0";
inline constexpr char kOutputName[] = "output__0";

// The input signature served for a deployment: the declared one, or FP32 of unknown rank.
v1::TensorSignature InputSignature(const v1::Deployment& d);

struct DecodedRequest {
  model::HostTensor input;
  bool raw = false;      // the request used raw_input_contents (answer in kind)
  int weight_terms = 0;  // from fpxint_terms (0: the deployment's K)
  int act_terms = 0;     // from fpxint_act_terms (0: min(weight_terms, K_a))
};

// InvalidArgument naming the field (inputs[0].shape, raw_input_contents[0], parameters
// .fpxint_terms, ...) and what is accepted. max_terms / max_act_terms: the deployment's K_w, K_a
// (0 for FP models, which refuse fpxint_terms). max_message_bytes: the server's gRPC message
// limit; a declared tensor must fit in it (prod(shape) * sizeof(datatype) <= max_message_bytes).
// Nothing is allocated before the payload has been checked against the declared shape, so
// memory follows the bytes actually received, never what a shape claims.
absl::StatusOr<DecodedRequest> DecodeInferRequest(const inference::ModelInferRequest& req,
                                                  const v1::Deployment& d, int max_terms,
                                                  int max_act_terms, int64_t max_message_bytes);

// Fills outputs (FP32, raw when `raw`).
absl::Status EncodeInferResponse(const inference::ModelInferRequest& req,
                                 const model::HostTensor& y, bool raw,
                                 inference::ModelInferResponse* resp);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_OIP_CODEC_H_
