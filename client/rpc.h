// File: client/rpc.h
//
// The CLI's side of a gRPC call: one channel per command (plain or TLS, optional client
// certificate), bearer-token metadata, per-call deadlines, and the mapping of a failed call to an
// exit code and a message a person can act on.
#ifndef FPXINT_CLIENT_RPC_H_
#define FPXINT_CLIENT_RPC_H_

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "client/options.h"
#include "nlohmann/json.hpp"
#include "proto/status_names.h"

namespace google::protobuf {
class Message;
}

namespace fpxint::client {

class Connection {
 public:
  // Reads the TLS files named in `g` (a missing file is an error naming the flag).
  static absl::StatusOr<std::unique_ptr<Connection>> Open(const GlobalOptions& g);

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  // Adds the token and, for unary calls (`deadline` true), the --timeout deadline.
  void Prepare(grpc::ClientContext* ctx, bool deadline = true) const;
  const GlobalOptions& options() const { return g_; }

 private:
  explicit Connection(const GlobalOptions& g) : g_(g) {}
  GlobalOptions g_;
  std::shared_ptr<grpc::Channel> channel_;
};

using ::fpxint::GrpcCodeName;  // "INVALID_ARGUMENT", "OK", ... (proto/status_names.h)

// Exit code of a failed call: UNAUTHENTICATED/PERMISSION_DENIED -> 7, INVALID_ARGUMENT,
// NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, OUT_OF_RANGE -> 3, CANCELLED -> 6, else 4.
int ExitCodeForRpc(const grpc::Status& s);

// Prints "fpxint <command>: <CODE>: <message>" to stderr, with a hint for the usual causes
// (server not reachable, token missing), and returns ExitCodeForRpc(s). With --json, also prints
// {"error": {"code": ..., "message": ...}} on stdout so pipelines always get a document.
int ReportRpcError(const std::string& command, const grpc::Status& s, const GlobalOptions& g);

// Prints only the JSON error document {"error": {"message", "exit_code"}} on stdout.
void ReportErrorJsonOnly(const std::string& message, int exit_code);

// Prints "fpxint <command>: <message>" to stderr (and the JSON error document with --json) and
// returns `exit_code`.
int ReportError(const std::string& command, const std::string& message, int exit_code,
                const GlobalOptions& g);

// The proto3 JSON mapping of `m` with the .proto field names (snake_case), enums as names and
// fields at their defaults included, so that the schema is the same for every message.
nlohmann::json ProtoToJson(const google::protobuf::Message& m);

// Prints `j` (pretty, 2 spaces) and a newline on stdout.
void PrintJson(const nlohmann::json& j);

}  // namespace fpxint::client

#endif  // FPXINT_CLIENT_RPC_H_
