// libFuzzer target: the CLI's parsers of user files (client/tensor_io.h, client/job_file.h):
// .npy headers and data, JSON tensors, YAML/JSON job files and their conversion to a JobSpec.
// Byte 0 selects the parser. Invariants: a parsed .npy tensor holds exactly prod(shape) elements
// and re-encodes to a file that parses to the same tensor.
#include <cstdint>
#include <cstdlib>

#include "client/job_file.h"
#include "client/tensor_io.h"

using namespace fpxint::client;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const absl::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 3) {
    case 0: {
      auto t = ParseNpy(text);
      if (!t.ok()) return 0;
      auto n = ElementCount(t->shape);
      if (!n.ok() || static_cast<size_t>(*n) * DatatypeSize(t->datatype) != t->bytes.size()) {
        std::abort();
      }
      auto again = EncodeNpy(*t);
      if (!again.ok()) std::abort();
      auto back = ParseNpy(*again);
      if (!back.ok() || back->bytes != t->bytes || back->shape != t->shape) std::abort();
      if (*n < (1 << 16)) (void)TensorValues(*t);
      return 0;
    }
    case 1: {
      auto t = ParseTensorJson(text, "FP32");
      if (!t.ok()) return 0;
      auto n = ElementCount(t->shape);
      if (!n.ok() || static_cast<size_t>(*n) * DatatypeSize(t->datatype) != t->bytes.size()) {
        std::abort();
      }
      return 0;
    }
    default: {
      auto j = ParseYamlOrJson(text);
      if (!j.ok() || !j->is_object()) return 0;
      (void)JobSpecFromJson(*j);
      return 0;
    }
  }
}
