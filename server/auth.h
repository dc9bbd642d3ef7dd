// File: server/auth.h
//
// Bearer-token authorization with roles. The token file has one token per line:
//
//   <token> <role>[,<role>...] [name]     # comment
//
// The optional name identifies the caller in model records and upload quotas (default
// "token#<line>"; never the token itself).
//
// Roles: quantize (the Quantizer service, and serving an upload through RepositoryModelLoad),
// infer (inference, repository and statistics RPCs), admin (everything, and what the operator
// reserves to it, such as TorchScript uploads under --allow-torchscript-uploads admin). Clients
// send `authorization: Bearer <token>`. Without a token file the server is open: every caller
// has quantize and infer, nobody has admin (the server binds loopback only unless told
// --insecure-no-auth). Health, reflection and metrics are always open.
#ifndef FPXINT_SERVER_AUTH_H_
#define FPXINT_SERVER_AUTH_H_

#include <grpcpp/server_context.h>

#include <array>
#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace fpxint::server {

enum Role : unsigned { kRoleQuantize = 1, kRoleInfer = 2, kRoleAdmin = 4 };

class Authorizer {
 public:
  Authorizer() = default;  // open: every call is allowed
  // InvalidArgument naming the line at fault.
  static absl::StatusOr<Authorizer> FromFile(const std::string& path);
  static absl::StatusOr<Authorizer> FromText(const std::string& text);

  bool open() const { return tokens_.empty(); }
  // Unauthenticated (no or unknown token) or PermissionDenied (token lacks `role`; a mask such as
  // kRoleInfer | kRoleQuantize accepts any of its roles; admin passes every check). Once the
  // token is known, *roles (if non-null) receives the caller's roles and *name (if non-null) its
  // name: the token's name, or "anonymous" on an open server.
  absl::Status Check(const grpc::ServerContextBase* ctx, Role role, unsigned* roles = nullptr,
                     std::string* name = nullptr) const;

 private:
  struct Token {
    unsigned roles = 0;
    std::string name;  // from the token file, or "token#<line>"
  };
  // SHA-256 of each token -> its roles and name: a presented token is hashed once and compared
  // with every digest in constant time, so neither the time of a failed check nor its length
  // says anything about the tokens (which are never kept or logged in clear after loading).
  std::map<std::array<uint8_t, 32>, Token> tokens_;
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_AUTH_H_
