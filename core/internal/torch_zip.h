// File: core/internal/torch_zip.h
//
// The zip reader of core/torch_state_dict.h: the central directory of a torch.save archive, each
// entry resolved to its bytes, every offset and length checked against the file before use.
// Internal to core.
#ifndef FPXINT_CORE_INTERNAL_TORCH_ZIP_H_
#define FPXINT_CORE_INTERNAL_TORCH_ZIP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/torch_state_dict.h"

namespace fpxint::core::internal {

// InvalidArgument "not a readable torch.save file: <what>".
inline absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("not a readable torch.save file: ", what));
}

inline uint16_t Le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t Le32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
inline uint64_t Le64(const uint8_t* p) { return uint64_t{Le32(p)} | (uint64_t{Le32(p + 4)} << 32); }

struct ZipEntry {
  std::string name;
  absl::Span<const uint8_t> data;  // the stored bytes (compressed ones when !stored)
  bool stored = true;
};

// The entry is compressed (torch.save writes stored entries only).
absl::Status NotStored(absl::string_view name);

// The central directory's entries, each resolved to its bytes; sizes and offsets from Zip64
// extra fields when present. Only stored entries (method 0, all torch.save writes) are usable.
absl::StatusOr<std::vector<ZipEntry>> ReadZip(absl::Span<const uint8_t> f,
                                              const StateDictLimits& limits);

}  // namespace fpxint::core::internal

#endif  // FPXINT_CORE_INTERNAL_TORCH_ZIP_H_
