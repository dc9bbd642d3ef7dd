#include "client/rpc.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <google/protobuf/message.h>
#include <google/protobuf/util/json_util.h>

#include "absl/strings/str_cat.h"
#include "client/exit_codes.h"

namespace fpxint::client {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read '", path, "'"));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (ss.str().find("-----BEGIN") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": '", path, "' is not a PEM file"));
  }
  return ss.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Connection>> Connection::Open(const GlobalOptions& g) {
  std::unique_ptr<Connection> c(new Connection(g));
  if (g.server.empty()) return absl::InvalidArgumentError("--server: empty; give HOST:PORT");
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (g.tls_ca.empty() && g.tls_cert.empty()) {
    creds = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions o;
    if (!g.tls_ca.empty()) {
      auto ca = ReadPem(g.tls_ca, "--tls-ca");
      if (!ca.ok()) return ca.status();
      o.pem_root_certs = *ca;
    }
    if (!g.tls_cert.empty() || !g.tls_key.empty()) {
      if (g.tls_cert.empty() || g.tls_key.empty()) {
        return absl::InvalidArgumentError("--tls-cert and --tls-key go together (mutual TLS)");
      }
      auto cert = ReadPem(g.tls_cert, "--tls-cert");
      if (!cert.ok()) return cert.status();
      auto key = ReadPem(g.tls_key, "--tls-key");
      if (!key.ok()) return key.status();
      o.pem_cert_chain = *cert;
      o.pem_private_key = *key;
    }
    creds = grpc::SslCredentials(o);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  c->channel_ = grpc::CreateCustomChannel(g.server, creds, args);
  return c;
}

void Connection::Prepare(grpc::ClientContext* ctx, bool deadline) const {
  if (!g_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + g_.token);
  if (deadline && g_.timeout_seconds > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(g_.timeout_seconds * 1000)));
  }
}

int ExitCodeForRpc(const grpc::Status& s) {
  switch (s.error_code()) {
    case grpc::StatusCode::OK: return kExitOk;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED: return kExitAuth;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE: return kExitBadInput;
    case grpc::StatusCode::CANCELLED: return kExitCancelled;
    default: return kExitIoError;
  }
}

void ReportErrorJsonOnly(const std::string& message, int exit_code) {
  PrintJson({{"error", {{"code", "USAGE"}, {"message", message}, {"exit_code", exit_code}}}});
}

int ReportError(const std::string& command, const std::string& message, int exit_code,
                const GlobalOptions& g) {
  std::fprintf(stderr, "fpxint %s: %s\n", command.c_str(), message.c_str());
  if (g.json) {
    const char* code = exit_code == kExitUsage ? "USAGE" : exit_code == kExitBadInput ? "BAD_INPUT" : "IO";
    PrintJson({{"error", {{"code", code}, {"message", message}, {"exit_code", exit_code}}}});
  }
  return exit_code;
}

int ReportRpcError(const std::string& command, const grpc::Status& s, const GlobalOptions& g) {
  std::string msg = absl::StrCat(GrpcCodeName(s.error_code()), ": ", s.error_message());
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
    absl::StrAppend(&msg, "\n  (is fpxint-server running at ", g.server,
                    "? set --server or FPXINT_SERVER", g.tls_ca.empty() ? "" : "; check --tls-ca",
                    ")");
  } else if (s.error_code() == grpc::StatusCode::UNAUTHENTICATED && g.token.empty()) {
    absl::StrAppend(&msg, "\n  (this server needs a token: --token or FPXINT_TOKEN)");
  } else if (s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    absl::StrAppend(&msg, "\n  (no answer within --timeout ", g.timeout_seconds, " s)");
  }
  const int code = ExitCodeForRpc(s);
  std::fprintf(stderr, "fpxint %s: %s\n", command.c_str(), msg.c_str());
  if (g.json) {
    PrintJson({{"error",
                {{"code", GrpcCodeName(s.error_code())},
                 {"message", s.error_message()},
                 {"exit_code", code}}}});
  }
  return code;
}

nlohmann::json ProtoToJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(m, &out, o).ok()) return nlohmann::json::object();
  return nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
}

void PrintJson(const nlohmann::json& j) {
  // Messages may echo bytes the user sent; invalid UTF-8 is replaced, never a crash.
  std::printf("%s\n", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  std::fflush(stdout);
}

}  // namespace fpxint::client
