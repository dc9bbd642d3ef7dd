// File: core/sha256.h
//
// SHA-256, incremental, on OpenSSL's EVP interface (SHA-NI or AVX2 where the CPU has them). The
// one hash of the project: uploads, artifacts, the store and the CLI all use it.
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

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX

namespace fpxint::core {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(absl::Span<const uint8_t> data);
  void Update(absl::string_view data) {
    Update(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
  }
  // Finishes the hash. The object must not be updated afterwards.
  std::array<uint8_t, 32> Digest();
  // Lower-case hex of Digest().
  std::string HexDigest();

 private:
  evp_md_ctx_st* ctx_;
};

// Hex SHA-256 of a whole byte range.
std::string Sha256Hex(absl::Span<const uint8_t> data);
// Hex SHA-256 of a file, read in 1 MiB chunks. NotFound / PermissionDenied / Internal on I/O errors.
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_SHA256_H_
