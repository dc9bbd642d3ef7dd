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
  // The input's shape and type; its values are `owned` when they had to be converted (typed
  // contents, FP16, UINT8, INT32), otherwise read in place from raw_input_contents[0].
  model::HostTensor owned;
  const void* borrowed = nullptr;  // into the request: valid while it is
  bool raw = false;      // the request used raw_input_contents (answer in kind)
  int weight_terms = 0;  // from fpxint_terms (0: the deployment's K)
  int act_terms = 0;     // from fpxint_act_terms (0: min(weight_terms, K_a))

  // The input for model::Model::Forward.
  model::HostTensorRef input() const;
  int64_t batch() const { return owned.shape.empty() ? 1 : owned.shape[0]; }
};

// InvalidArgument naming the field (inputs[0].shape, raw_input_contents[0], parameters
// .fpxint_terms, ...) and what is accepted. max_terms / max_act_terms: the deployment's K_w, K_a
// (0 for FP models, which refuse fpxint_terms). max_message_bytes: the server's gRPC message
// limit; a declared tensor must fit in it (prod(shape) * sizeof(datatype) <= max_message_bytes).
// Nothing is allocated before the payload has been checked against the declared shape, so
// memory follows the bytes actually received, never what a shape claims. Raw bytes that already
// are the model's input type (FP32 for float models, INT64 for token models; little-endian, as
// this host) are not copied: the result borrows them from `req`, which must outlive it.
absl::StatusOr<DecodedRequest> DecodeInferRequest(const inference::ModelInferRequest& req,
                                                  const v1::Deployment& d, int max_terms,
                                                  int max_act_terms, int64_t max_message_bytes);

// Fills outputs with the FP32 tensor (shape, values): raw_output_contents when `raw` (one copy,
// from the network's output into the response), fp32_contents otherwise.
absl::Status EncodeInferResponse(absl::Span<const int64_t> shape, absl::Span<const float> values,
                                 bool raw, inference::ModelInferResponse* resp);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_OIP_CODEC_H_
