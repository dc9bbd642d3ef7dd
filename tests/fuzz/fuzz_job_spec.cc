// libFuzzer target: the server's job spec validation (server/validation.h NormalizeJobSpec, with
// its regex compilation of include/exclude) and upload header validation, on arbitrary protobuf
// messages. Invariant: a spec that passes has every field inside its documented range.
#include <cstdint>
#include <cstdlib>

#include "server/validation.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  if (mode & 1) {
    fpxint::v1::UploadHeader h;
    if (!h.ParseFromArray(data + 1, static_cast<int>(size - 1))) return 0;
    fpxint::server::UploadPolicy p;
    p.max_upload_bytes = 1 << 30;
    p.torchscript = static_cast<fpxint::server::TorchScriptUploads>((mode >> 1) % 3);
    if (fpxint::server::CheckUploadHeader(h, p, (mode & 8) != 0).ok()) {
      if (h.name().empty() || h.name().size() > 128 || h.name().find('/') != std::string::npos ||
          h.name() == "..") {
        std::abort();
      }
    }
    return 0;
  }
  fpxint::v1::JobSpec spec;
  if (!spec.ParseFromArray(data + 1, static_cast<int>(size - 1))) return 0;
  fpxint::v1::Model model;
  model.set_name("m");
  model.set_format((mode & 2) ? fpxint::v1::TORCHSCRIPT : fpxint::v1::SAFETENSORS);
  if (fpxint::server::NormalizeJobSpec(model, &spec).ok()) {
    if (spec.weight_bits() < 1 || spec.weight_bits() > 8 || spec.weight_terms() < 1 ||
        spec.weight_terms() > 16 || spec.act_bits() > 8 || spec.act_terms() > 16 ||
        !(spec.eps() >= 0 && spec.eps() < 1)) {
      std::abort();
    }
    (void)fpxint::server::WeightSpec(spec);
  }
  return 0;
}
