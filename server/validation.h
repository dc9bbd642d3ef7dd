// File: server/validation.h
//
// Every check the server applies to untrusted request fields before using them: names, upload
// headers and job specs. No LibTorch and no gRPC calls here, so the fuzzers (tests/fuzz/) run
// exactly this code. Errors are InvalidArgument (or PermissionDenied / ResourceExhausted) naming
// the field and saying what is accepted.
#ifndef FPXINT_SERVER_VALIDATION_H_
#define FPXINT_SERVER_VALIDATION_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/quant_spec.h"
#include "fpxint/v1/quantizer.pb.h"
#include "model/model.h"

namespace fpxint::server {

// Model and tensor names: 1-128 of [A-Za-z0-9._-], starting with a letter or digit (so never
// "..", never a path).
absl::Status CheckName(const std::string& name, absl::string_view field);
// A replica id (a directory name under the store's tmp/): the same, and ':' (hostname:pid).
absl::Status CheckReplicaId(const std::string& id, absl::string_view field);

enum class TorchScriptUploads { kAll, kAdmin, kNone };

struct UploadPolicy {
  uint64_t max_upload_bytes = 0;
  // Free bytes the data directory keeps: an upload that would leave less is RESOURCE_EXHAUSTED
  // (checked at the header, against its declared size, and every 16 MiB). 0: no floor.
  uint64_t min_free_bytes = 0;
  // Bytes one caller's uploads may hold together (--upload-quota-bytes; 0: no quota), and what
  // this caller's uploads already hold (filled per call).
  uint64_t quota_bytes = 0;
  uint64_t quota_used = 0;
  TorchScriptUploads torchscript = TorchScriptUploads::kAll;
};

// The first message of an upload. `is_admin`: the caller has the admin role.
absl::Status CheckUploadHeader(const v1::UploadHeader& h, const UploadPolicy& policy,
                               bool is_admin);

// Deployment versions: a positive integer of 1-9 digits, no leading zero ("1", "12").
absl::Status CheckVersion(const std::string& version, absl::string_view field);

// Fills defaults (b=4, K_w=2, SYM, RESCALED, PER_CHANNEL) into *spec and checks every field
// against `model`. InvalidArgument naming the field (e.g. "spec.weight_bits: 9; accepted 1..8").
absl::Status NormalizeJobSpec(const v1::Model& model, v1::JobSpec* spec);

// The core spec of a normalized spec's weight terms, and the model layer's spec (LAYER/MODEL).
core::ExpansionSpec WeightSpec(const v1::JobSpec& spec);
model::ModelExpansionSpec ToModelExpansionSpec(const v1::JobSpec& spec);

// spec.weight_terms_for as (RE2 pattern, K) pairs; InvalidArgument naming the entry that is not
// PATTERN=K with K in 1..max_terms or whose pattern does not compile.
absl::StatusOr<std::vector<std::pair<std::string, int>>> WeightTermPins(const v1::JobSpec& spec);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_VALIDATION_H_
