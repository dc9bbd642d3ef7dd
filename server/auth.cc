// File: server/auth.cc
#include "server/auth.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "server/store.h"

namespace fpxint::server {
namespace {

// "'quantize'", "'infer' or 'quantize'", ...: the roles any of which a call accepts.
std::string RoleNames(unsigned roles) {
  std::vector<std::string> names;
  if (roles & kRoleInfer) names.push_back("'infer'");
  if (roles & kRoleQuantize) names.push_back("'quantize'");
  if (names.empty() || (roles & kRoleAdmin)) names.push_back("'admin'");
  return absl::StrJoin(names, " or ");
}

std::array<uint8_t, 32> TokenDigest(absl::string_view token) {
  core::Sha256 h;
  h.Update(token);
  return h.Digest();
}

// Constant-time comparison of two digests (fixed length: no early exit anywhere).
bool SameDigest(const std::array<uint8_t, 32>& a, const std::array<uint8_t, 32>& b) {
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

}  // namespace

absl::StatusOr<Authorizer> Authorizer::FromText(const std::string& text) {
  Authorizer a;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = line.substr(0, line.find('#'));
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    std::vector<absl::string_view> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (parts.size() != 2 && parts.size() != 3) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file line ", line_no, ": expected '<token> <role>[,<role>...] [name]'"));
    }
    if (parts[0].size() < 16) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file line ", line_no, ": tokens have at least 16 characters"));
    }
    unsigned roles = 0;
    for (absl::string_view r : absl::StrSplit(parts[1], ',')) {
      if (r == "quantize")
        roles |= kRoleQuantize;
      else if (r == "infer")
        roles |= kRoleInfer;
      else if (r == "admin")
        roles |= kRoleAdmin;
      else {
        return absl::InvalidArgumentError(absl::StrCat("token file line ", line_no,
                                                       ": unknown role '", r,
                                                       "'; accepted: quantize, infer, admin"));
      }
    }
    a.tokens_[TokenDigest(parts[0])] =
        Token{roles, parts.size() == 3 ? std::string(parts[2]) : absl::StrCat("token#", line_no)};
  }
  if (a.tokens_.empty()) {
    return absl::InvalidArgumentError(
        "token file: no tokens (an empty file would leave the server open)");
  }
  return a;
}

absl::StatusOr<Authorizer> Authorizer::FromFile(const std::string& path) {
  FPX_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path, "--token-file"));
  return FromText(text);
}

absl::Status Authorizer::Check(const grpc::ServerContextBase* ctx, Role role, unsigned* roles,
                               std::string* name) const {
  if (open()) {
    // No tokens, so no caller can be told apart: everyone gets quantize and infer, nobody
    // admin (what is reserved to admin stays reserved).
    if (roles) *roles = kRoleQuantize | kRoleInfer;
    if (name) *name = "anonymous";
    if (role == kRoleAdmin) {
      return absl::PermissionDeniedError(
          "this call needs the 'admin' role, and a server without --token-file has no admin");
    }
    return absl::OkStatus();
  }
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "missing metadata 'authorization: Bearer <token>' (this server requires a token)");
  }
  absl::string_view value(it->second.data(), it->second.size());
  if (!absl::ConsumePrefix(&value, "Bearer ") && !absl::ConsumePrefix(&value, "bearer ")) {
    return absl::UnauthenticatedError("metadata 'authorization': expected 'Bearer <token>'");
  }
  const Token* found = nullptr;
  const std::array<uint8_t, 32> presented = TokenDigest(value);
  for (const auto& [digest, t] : tokens_) {  // every token compared: constant time overall
    if (SameDigest(digest, presented)) found = &t;
  }
  if (found == nullptr) {
    return absl::UnauthenticatedError("metadata 'authorization': unknown token");
  }
  if (roles) *roles = found->roles;
  if (name) *name = found->name;
  if ((found->roles & (role | kRoleAdmin)) == 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("this token lacks the ", RoleNames(role), " role needed for this call"));
  }
  return absl::OkStatus();
}

}  // namespace fpxint::server
