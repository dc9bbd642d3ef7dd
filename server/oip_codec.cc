// File: server/oip_codec.cc
#include "server/oip_codec.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/dtype.h"

namespace fpxint::server {
namespace {

absl::Status Bad(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

int64_t ElementSize(const std::string& dt) {
  if (dt == "FP32" || dt == "INT32") return 4;
  if (dt == "FP16") return 2;
  if (dt == "INT64") return 8;
  if (dt == "UINT8") return 1;
  return 0;
}

template <typename T>
T LoadLE(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // x86-64 is little-endian, as the protocol
  return v;
}

}  // namespace

model::HostTensorRef DecodedRequest::input() const {
  model::HostTensorRef r = model::HostTensorRef::Of(owned);
  if (borrowed != nullptr) r.data = borrowed;
  return r;
}

v1::TensorSignature InputSignature(const v1::Deployment& d) {
  if (d.inputs_size() == 1) {
    v1::TensorSignature s = d.inputs(0);
    if (s.name().empty()) s.set_name(kInputName);
    if (s.datatype().empty()) s.set_datatype("FP32");
    return s;
  }
  v1::TensorSignature s;
  s.set_name(kInputName);
  s.set_datatype("FP32");
  s.add_shape(-1);
  return s;
}

absl::StatusOr<DecodedRequest> DecodeInferRequest(const inference::ModelInferRequest& req,
                                                  const v1::Deployment& d, int max_terms,
                                                  int max_act_terms, int64_t max_message_bytes) {
  const v1::TensorSignature sig = InputSignature(d);
  if (req.inputs_size() != 1) {
    return Bad("inputs", absl::StrCat(req.inputs_size(), " tensors; this model takes exactly 1 ('",
                                      sig.name(), "')"));
  }
  const auto& in = req.inputs(0);
  if (in.name() != sig.name()) {
    return Bad("inputs[0].name",
               absl::StrCat("'", in.name(), "'; this model's input is '", sig.name(), "'"));
  }
  const bool int_model = sig.datatype() == "INT64";
  const char* accepted = int_model ? "INT64, INT32, UINT8" : "FP32, FP16, UINT8";
  const int64_t esize = ElementSize(in.datatype());
  if (esize == 0 || (int_model && (in.datatype() == "FP32" || in.datatype() == "FP16")) ||
      (!int_model && (in.datatype() == "INT64" || in.datatype() == "INT32"))) {
    return Bad("inputs[0].datatype", absl::StrCat("'", in.datatype(), "'; accepted: ", accepted));
  }
  // Shape: non-negative dims, an element count whose bytes fit in one message, and the
  // signature where it is known.
  const int64_t max_elements = std::max<int64_t>(0, max_message_bytes) / esize;
  int64_t numel = 1;
  for (int64_t dim : in.shape()) {
    if (dim < 0) return Bad("inputs[0].shape", "dimensions must be >= 0");
    if (dim > 0 && numel > max_elements / dim) {
      return Bad("inputs[0].shape",
                 absl::StrCat("[", absl::StrJoin(in.shape(), ","), "] of ", in.datatype(),
                              " is more than ", max_elements, " elements (", max_message_bytes,
                              " bytes, --max-message-bytes)"));
    }
    numel *= dim;
  }
  const bool rank_known = !(sig.shape_size() == 1 && sig.shape(0) == -1 && d.inputs_size() == 0);
  bool shape_ok = !rank_known || in.shape_size() == sig.shape_size();
  for (int i = 0; shape_ok && rank_known && i < sig.shape_size(); ++i) {
    shape_ok = sig.shape(i) < 0 || sig.shape(i) == in.shape(i);
  }
  if (in.shape_size() == 0 || !shape_ok) {
    return Bad("inputs[0].shape",
               absl::StrCat("[", absl::StrJoin(in.shape(), ","), "]; this model takes [",
                            absl::StrJoin(sig.shape(), ","), "] (-1: any size)"));
  }
  DecodedRequest out;
  model::HostTensor& t = out.owned;
  t.shape.assign(in.shape().begin(), in.shape().end());
  t.type = int_model ? model::HostTensor::Type::kInt64 : model::HostTensor::Type::kFloat32;
  const size_t n = static_cast<size_t>(numel);
  // Allocates the decoded tensor; called only once the payload is known to hold numel values.
  auto allocate = [&] {
    if (int_model) {
      t.i64.resize(n);
    } else {
      t.f32.resize(n);
    }
  };
  if (req.raw_input_contents_size() > 0) {
    out.raw = true;
    if (req.raw_input_contents_size() != req.inputs_size()) {
      return Bad("raw_input_contents",
                 absl::StrCat(req.raw_input_contents_size(), " entries for ", req.inputs_size(),
                              " inputs; give one per input, in order"));
    }
    if (in.has_contents()) {
      return Bad("inputs[0].contents", "must be empty when raw_input_contents is used");
    }
    const std::string& raw = req.raw_input_contents(0);
    if (static_cast<int64_t>(raw.size()) != numel * esize) {
      return Bad("raw_input_contents[0]",
                 absl::StrCat(raw.size(), " bytes; shape [", absl::StrJoin(in.shape(), ","),
                              "] of ", in.datatype(), " needs ", numel * esize));
    }
    // The bytes are the tensor already: borrow them when aligned for the type (heap strings
    // are), copy them otherwise.
    const bool same_type = in.datatype() == (int_model ? "INT64" : "FP32");
    if (same_type && reinterpret_cast<uintptr_t>(raw.data()) % esize == 0) {
      out.borrowed = raw.data();
    } else {
      allocate();
      const char* p = raw.data();
      for (size_t i = 0; i < n; ++i, p += esize) {
        if (in.datatype() == "FP32")
          t.f32[i] = LoadLE<float>(p);
        else if (in.datatype() == "FP16")
          t.f32[i] = core::HalfToFloat(LoadLE<uint16_t>(p));
        else if (in.datatype() == "UINT8") {
          if (int_model)
            t.i64[i] = static_cast<uint8_t>(*p);
          else
            t.f32[i] = static_cast<uint8_t>(*p);
        } else if (in.datatype() == "INT32")
          t.i64[i] = LoadLE<int32_t>(p);
        else
          t.i64[i] = LoadLE<int64_t>(p);
      }
    }
  } else {
    const auto& c = in.contents();
    int64_t got = 0;
    const char* field = "";
    if (in.datatype() == "FP32") {
      got = c.fp32_contents_size();
      field = "fp32_contents";
    } else if (in.datatype() == "FP16") {
      return Bad("inputs[0].datatype", "FP16 can only be sent in raw_input_contents");
    } else if (in.datatype() == "UINT8") {
      got = c.uint_contents_size();
      field = "uint_contents";
    } else if (in.datatype() == "INT32") {
      got = c.int_contents_size();
      field = "int_contents";
    } else {
      got = c.int64_contents_size();
      field = "int64_contents";
    }
    if (got != numel) {
      return Bad(absl::StrCat("inputs[0].contents.", field),
                 absl::StrCat(got, " values; shape [", absl::StrJoin(in.shape(), ","), "] needs ",
                              numel, " (or send raw_input_contents)"));
    }
    allocate();
    if (in.datatype() == "FP32") {
      for (int64_t i = 0; i < numel; ++i) t.f32[i] = c.fp32_contents(i);
    } else if (in.datatype() == "UINT8") {
      for (int64_t i = 0; i < numel; ++i) {
        if (c.uint_contents(i) > 255)
          return Bad("inputs[0].contents.uint_contents", "UINT8 values are 0..255");
        if (int_model)
          t.i64[i] = c.uint_contents(i);
        else
          t.f32[i] = static_cast<float>(c.uint_contents(i));
      }
    } else if (in.datatype() == "INT32") {
      for (int64_t i = 0; i < numel; ++i) t.i64[i] = c.int_contents(i);
    } else {
      for (int64_t i = 0; i < numel; ++i) t.i64[i] = c.int64_contents(i);
    }
  }
  for (const auto& [key, p] : req.parameters()) {
    if (key != "fpxint_terms" && key != "fpxint_act_terms") continue;
    if (p.parameter_choice_case() != inference::InferParameter::kInt64Param) {
      return Bad(absl::StrCat("parameters.", key), "must be an int64_param");
    }
    const int64_t v = p.int64_param();
    const int64_t max = key == "fpxint_terms" ? max_terms : max_act_terms;
    if (max == 0) {
      return Bad(absl::StrCat("parameters.", key),
                 key == "fpxint_terms" ? "this model is not an fpxint series expansion"
                                       : "this model does not expand activations");
    }
    if (v < 1 || v > max) {
      return Bad(absl::StrCat("parameters.", key),
                 absl::StrCat(v, "; this model has 1..", max, " terms"));
    }
    (key == "fpxint_terms" ? out.weight_terms : out.act_terms) = static_cast<int>(v);
  }
  for (int i = 0; i < req.outputs_size(); ++i) {
    if (req.outputs(i).name() != kOutputName) {
      return Bad(absl::StrCat("outputs[", i, "].name"),
                 absl::StrCat("'", req.outputs(i).name(), "'; this model's output is '",
                              kOutputName, "'"));
    }
  }
  return out;
}

absl::Status EncodeInferResponse(absl::Span<const int64_t> shape, absl::Span<const float> values,
                                 bool raw, inference::ModelInferResponse* resp) {
  auto* o = resp->add_outputs();
  o->set_name(kOutputName);
  o->set_datatype("FP32");
  for (int64_t d : shape) o->add_shape(d);
  if (raw) {
    resp->add_raw_output_contents()->assign(reinterpret_cast<const char*>(values.data()),
                                            values.size() * sizeof(float));
  } else {
    auto* c = o->mutable_contents()->mutable_fp32_contents();
    c->Reserve(static_cast<int>(values.size()));
    for (float v : values) c->AddAlreadyReserved(v);
  }
  return absl::OkStatus();
}

}  // namespace fpxint::server
