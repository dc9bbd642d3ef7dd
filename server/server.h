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
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace fpxint::server {

struct ServerConfig {
  // Empty: 0.0.0.0:8001 with --token-file, else 127.0.0.1:8001 (an open server stays on
  // loopback unless insecure_no_auth says otherwise).
  std::string listen;
  std::string data_dir = "fpxint-data";
  // postgresql://... (a libpq URI): the journal lives in PostgreSQL; empty: SQLite in data_dir.
  std::string database_url;
  std::string replica_id;                         // empty: hostname:pid
  int workers = 1;                                // concurrent jobs
  int max_job_attempts = 3;                       // runs whose replica went away before FAILED
  double job_lease_seconds = 30;                  // a running job's lease, renewed every third
  int queue_limit = 64;                           // queued jobs before RESOURCE_EXHAUSTED
  uint64_t max_upload_bytes = uint64_t{4} << 30;  // per upload
  uint64_t min_free_bytes = 0;                    // free space uploads must leave; 0: no floor
  uint64_t upload_quota_bytes = 0;                // bytes one caller's uploads may hold; 0: none
  double orphan_min_age_seconds = 3600;           // unreferenced blobs older than this are swept
  double retain_jobs_days = 0;                    // finished jobs older than this are deleted; 0: kept
  uint64_t job_memory_limit = 0;                  // bytes a job may plan to hold; 0: no limit
  int threads = 0;                                // compute threads (0: all cores)
  int infer_instances = 1;                        // network copies per served model version
  bool packed_weights = true;                     // serve weight-only quantized models packed
  std::string token_file;                         // empty: no authentication
  bool insecure_no_auth = false;                  // allow a non-loopback --listen without tokens
  std::string tls_cert, tls_key;                  // PEM files; both or neither
  std::string tls_client_ca;                      // PEM: require client certificates
  std::string allow_torchscript_uploads = "all";  // all | admin | none
  std::string vet_binary;                         // fpxint-vet; empty: next to this executable
  std::vector<std::string> torchscript_allow_ops;  // extra allow-list files for fpxint-vet
  double vet_timeout_seconds = 120;               // wall-clock bound of one vetting
  std::string port_file;                          // written with host:port once serving
  std::string metrics_listen;                     // HOST:PORT of GET /metrics; empty: off
  std::string metrics_port_file;                  // written with host:port of /metrics
  double shutdown_grace_seconds = 20;             // running jobs' time to finish on SIGTERM
  int64_t max_message_bytes = 64 << 20;           // gRPC receive limit (ModelInfer requests)
  int infer_queue_limit = 64;                     // ModelInfer calls waiting per served version
  int max_precisions = 8;                         // dense (K_w', K_a') networks per instance
  double infer_queue_timeout_seconds = 10;        // longest wait for a free instance
  int max_rpc_threads = 256;                      // gRPC handler threads (resource quota)
  int64_t grpc_memory_bytes = 0;                  // gRPC buffer memory; 0: 16 x max_message_bytes
  int max_concurrent_streams = 200;               // per connection (HTTP/2 SETTINGS)
  int max_uploads = 16;                           // UploadModel calls at once
  int max_downloads = 32;                         // DownloadArtifact calls at once
  double stream_idle_timeout_seconds = 60;        // an upload/download moving nothing is cancelled
  double keepalive_seconds = 60;                  // server pings idle connections this often
  double keepalive_timeout_seconds = 20;          // and closes them when unanswered

  // InvalidArgument naming the flag.
  absl::Status Validate() const;
  // --listen with its default applied.
  std::string ListenAddress() const;
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
  const std::string& replica_id() const;  // --replica-id, or the hostname:pid default
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
