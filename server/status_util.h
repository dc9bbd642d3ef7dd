// File: server/status_util.h
//
// The one place where absl::Status becomes grpc::Status (docs/ARCHITECTURE.md "Errors": errors
// are absl::Status inside the service and are mapped once, at the service edge), and the server's
// small shared helpers: clocks and JSON rendering of its protobuf records.
#ifndef FPXINT_SERVER_STATUS_UTIL_H_
#define FPXINT_SERVER_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace google::protobuf {
class Message;
}  // namespace google::protobuf

namespace fpxint::server {

grpc::Status ToGrpcStatus(const absl::Status& s);

// Milliseconds since the Unix epoch.
int64_t NowUnixMs();
// Monotonic nanoseconds, for durations.
uint64_t SteadyNowNs();

// Indented JSON with the .proto field names (reports, repository config.json).
absl::StatusOr<std::string> ProtoToJson(const google::protobuf::Message& m);

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_STATUS_UTIL_H_
