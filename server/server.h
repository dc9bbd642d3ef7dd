// File: server/server.h
//
// fpxint-server assembled: store, journal, job manager, inference repository, the gRPC services
// (fpxint.v1.Quantizer, inference.GRPCInferenceService, grpc.health.v1.Health, reflection) on one
// port, optionally with TLS / mutual TLS. Used by the binary and by in-process tests.
#ifndef FPXINT_SERVER_SERVER_H_
#define FPXINT_SERVER_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace fpxint::server {

struct ServerConfig {
  std::string listen = "0.0.0.0:8001";
  std::string data_dir = "fpxint-data";
  int workers = 1;                                // concurrent jobs
  int queue_limit = 64;                           // queued jobs before RESOURCE_EXHAUSTED
  uint64_t max_upload_bytes = uint64_t{4} << 30;  // per upload
  uint64_t job_memory_limit = 0;                  // bytes a job may plan to hold; 0: no limit
  int threads = 0;                                // compute threads (0: all cores)
  int infer_instances = 1;                        // network copies per served model version
  bool packed_weights = true;                     // serve weight-only quantized models packed
  std::string token_file;                         // empty: no authentication
  std::string tls_cert, tls_key;                  // PEM files; both or neither
  std::string tls_client_ca;                      // PEM: require client certificates
  std::string allow_torchscript_uploads = "all";  // all | admin | none
  std::string port_file;                          // written with host:port once serving
  std::string metrics_listen;                     // HOST:PORT of GET /metrics; empty: off
  std::string metrics_port_file;                  // written with host:port of /metrics
  double shutdown_grace_seconds = 20;             // running jobs' time to finish on SIGTERM
  int64_t max_message_bytes = 64 << 20;           // gRPC receive limit (ModelInfer requests)

  // InvalidArgument naming the flag.
  absl::Status Validate() const;
};

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerConfig& config);
  ~Server();

  int port() const;
  int metrics_port() const;  // 0 when --metrics-listen is off
  // The metrics text exposition (what GET /metrics serves).
  std::string MetricsText() const;
  std::string address() const;  // host:port actually bound
  // Stops accepting, lets jobs finish for the grace period (then re-queues them), drains RPCs.
  void Shutdown();
  // Blocks until Shutdown() has finished.
  void Wait();

 private:
  struct Impl;
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_SERVER_H_
