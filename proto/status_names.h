// File: proto/status_names.h
//
// gRPC status code names as the wire documentation spells them ("INVALID_ARGUMENT"), shared by
// the server (metrics labels, logs) and the CLI (error messages, --json). gRPC's codes are
// absl::StatusCode's numbers, so Abseil names them.
#ifndef FPXINT_PROTO_STATUS_NAMES_H_
#define FPXINT_PROTO_STATUS_NAMES_H_

#include <grpcpp/support/status_code_enum.h>

#include <string>

#include "absl/status/status.h"

namespace fpxint {

inline std::string GrpcCodeName(grpc::StatusCode code) {
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "UNKNOWN" : name;
}

}  // namespace fpxint

#endif  // FPXINT_PROTO_STATUS_NAMES_H_
