// File: client/job_file.h
//
// Job specs for `fpxint quantize`: from a YAML or JSON job file, from flags, or both (flags win).
// The file is the fpxint.v1.JobSpec message with its .proto field names; the CLI's own spellings
// are accepted too (bits, terms, act-bits, lower-case enum values, scale: channel|tensor|group,
// deploy-as). Unknown keys and values are errors that list what is accepted.
//
//   # w4x2.yaml
//   model: ocr_rec
//   granularity: layer
//   bits: 4
//   terms: 2
//   scale: channel
//   outputs: [packed_safetensors, dequantized_torchscript]
//   deploy: {enabled: true, name: ocr_rec_w4x2}
#ifndef FPXINT_CLIENT_JOB_FILE_H_
#define FPXINT_CLIENT_JOB_FILE_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "fpxint/v1/quantizer.pb.h"
#include "nlohmann/json.hpp"

namespace fpxint::client {

// YAML (yaml-cpp; JSON is YAML too) -> JSON, with YAML 1.2 core-schema scalars: plain true/false,
// integers, floats and null are typed, quoted scalars stay strings. At most 1 MiB and 16 levels
// of nesting (checked before parsing); duplicate keys are refused. Errors carry the line number.
absl::StatusOr<nlohmann::json> ParseYamlOrJson(absl::string_view text);

// Canonicalizes keys and enum spellings and converts to a JobSpec. Errors name the key.
absl::StatusOr<v1::JobSpec> JobSpecFromJson(const nlohmann::json& j);

// Reads `path` (YAML or JSON) into a JSON object (not yet converted, so flags can be merged).
absl::StatusOr<nlohmann::json> LoadJobFile(const std::string& path);

}  // namespace fpxint::client

#endif  // FPXINT_CLIENT_JOB_FILE_H_
