// File: core/sha256.h
//
// SHA-256 (FIPS 180-4), incremental. The core depends on Abseil only, so it carries its own.
//
// Example:
//   Sha256 h; h.Update(bytes); std::string hex = h.HexDigest();
#ifndef FPXINT_CORE_SHA256_H_
#define FPXINT_CORE_SHA256_H_

#include <array>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace fpxint::core {

class Sha256 {
 public:
  Sha256();
  void Update(absl::Span<const uint8_t> data);
  void Update(absl::string_view data) {
    Update(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
  }
  // Finishes the hash. The object must not be updated afterwards.
  std::array<uint8_t, 32> Digest();
  // Lower-case hex of Digest().
  std::string HexDigest();

 private:
  void Block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

// Hex SHA-256 of a whole byte range.
std::string Sha256Hex(absl::Span<const uint8_t> data);
// Hex SHA-256 of a file, read in 1 MiB chunks. NotFound / PermissionDenied / Internal on I/O errors.
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_SHA256_H_
