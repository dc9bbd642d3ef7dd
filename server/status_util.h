// File: server/status_util.h
//
// The one place where absl::Status becomes grpc::Status (DESIGN.md: errors are absl::Status inside
// the service and are mapped once, at the service edge).
#ifndef FPXINT_SERVER_STATUS_UTIL_H_
#define FPXINT_SERVER_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace fpxint::server {

grpc::Status ToGrpcStatus(const absl::Status& s);

// Milliseconds since the Unix epoch.
int64_t NowUnixMs();

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_STATUS_UTIL_H_
