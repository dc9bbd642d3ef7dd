// libFuzzer target: the torch.save reader (core/torch_state_dict.h): its zip reader and its
// restricted unpickler, at the limits the server reads uploads with (StateDictLimits' defaults).
// The first byte picks the mode:
//   0: the rest is a whole file (zip structure, Zip64 fields, entry bounds);
//   1: the rest is data.pkl, wrapped here in a valid stored zip with storages "0" (64 bytes) and
//      "1" (7 bytes), so mutations reach the unpickler directly.
// A crash, a sanitizer report, a leak, a tensor whose elements lie outside its storage, or
// accepted tensors beyond a limit (per storage, names' bytes, bytes against the storages') is a
// bug.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/torch_state_dict.h"

namespace {

void Put16(std::string* s, uint32_t v) { s->push_back(char(v & 0xff)); s->push_back(char(v >> 8)); }
void Put32(std::string* s, uint32_t v) { Put16(s, v & 0xffff); Put16(s, v >> 16); }

// A stored zip of `entries` (name, data); CRCs are left 0 (the reader does not check them).
std::string Zip(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string out, cd;
  for (const auto& [name, data] : entries) {
    const uint32_t local = static_cast<uint32_t>(out.size());
    Put32(&out, 0x04034b50); Put16(&out, 20); Put16(&out, 0); Put16(&out, 0);
    Put32(&out, 0); Put32(&out, 0);
    Put32(&out, static_cast<uint32_t>(data.size())); Put32(&out, static_cast<uint32_t>(data.size()));
    Put16(&out, static_cast<uint32_t>(name.size())); Put16(&out, 0);
    out += name;
    out += data;
    Put32(&cd, 0x02014b50); Put16(&cd, 20); Put16(&cd, 20); Put16(&cd, 0); Put16(&cd, 0);
    Put32(&cd, 0); Put32(&cd, 0);
    Put32(&cd, static_cast<uint32_t>(data.size())); Put32(&cd, static_cast<uint32_t>(data.size()));
    Put16(&cd, static_cast<uint32_t>(name.size())); Put16(&cd, 0); Put16(&cd, 0); Put16(&cd, 0);
    Put16(&cd, 0); Put32(&cd, 0); Put32(&cd, local);
    cd += name;
  }
  const uint32_t cd_off = static_cast<uint32_t>(out.size());
  out += cd;
  Put32(&out, 0x06054b50); Put16(&out, 0); Put16(&out, 0);
  Put16(&out, static_cast<uint32_t>(entries.size())); Put16(&out, static_cast<uint32_t>(entries.size()));
  Put32(&out, static_cast<uint32_t>(cd.size())); Put32(&out, cd_off); Put16(&out, 0);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::string file;
  if (data[0] == 1) {
    file = Zip({{"archive/data.pkl", std::string(reinterpret_cast<const char*>(data + 1), size - 1)},
                {"archive/data/0", std::string(64, '\x3f')},
                {"archive/data/1", std::string(7, '\x01')}});
  } else {
    file.assign(reinterpret_cast<const char*>(data + 1), size - 1);
  }
  const auto* begin = reinterpret_cast<const uint8_t*>(file.data());
  const fpxint::core::StateDictLimits limits;  // the production limits
  auto sd = fpxint::core::TorchStateDict::FromBuffer(absl::MakeConstSpan(begin, file.size()), limits);
  if (!sd.ok()) return 0;
  if ((*sd)->tensors().size() > limits.max_tensors) std::abort();
  // Zip entries do not share bytes, so the storages fit in the file and bound the tensors.
  if ((*sd)->storage_bytes() > file.size()) std::abort();
  uint64_t total_bytes = 0, name_bytes = 0;
  std::map<const uint8_t*, uint64_t> per_storage;  // non-empty storages start at distinct bytes
  for (const fpxint::core::StateDictTensor& t : (*sd)->tensors()) {
    if (!t.storage.empty() &&
        (t.storage.data() < begin || t.storage.data() + t.storage.size() > begin + file.size())) {
      std::abort();
    }
    if (!t.storage.empty() && ++per_storage[t.storage.data()] > limits.max_tensors_per_storage) {
      std::abort();
    }
    name_bytes += t.name.size();
    const int64_t n = t.numel();
    if (n < 0) std::abort();
    total_bytes += static_cast<uint64_t>(n) * fpxint::core::DTypeSize(t.dtype);
    if (n > 0 && n < (1 << 16)) {
      // Copies every element through the checked strides: ASan reports any read outside.
      std::vector<uint8_t> out(static_cast<size_t>(n) * fpxint::core::DTypeSize(t.dtype));
      t.CopyTo(out.data());
    }
  }
  if (name_bytes > limits.max_name_total_bytes || total_bytes != (*sd)->total_tensor_bytes() ||
      total_bytes > limits.max_alias_factor * (*sd)->storage_bytes() + limits.max_broadcast_bytes) {
    std::abort();
  }
  return 0;
}
