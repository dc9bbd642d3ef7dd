// File: server/metrics.h
//
// The server's Prometheus metrics (docs/ARCHITECTURE.md "Metrics"; names and labels are a
// contract with deploy/prometheus/alerts.yml and deploy/grafana/dashboards/fpxint.json), the gRPC
// interceptor that counts every RPC by method and status code, process metrics from /proc, and the
// HTTP exposer on --metrics-listen (prometheus-cpp's civetweb; see stack_size_fix.cc for why it
// needs bigger thread stacks in this process).
//
// Metrics is always there (a server without --metrics-listen still counts; tests read Text()).
#ifndef FPXINT_SERVER_METRICS_H_
#define FPXINT_SERVER_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>

#include <grpcpp/support/server_interceptor.h>

#include "absl/status/statusor.h"
#include "fpxint/v1/quantizer.pb.h"

namespace fpxint::server {

class Metrics {
 public:
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One ModelInfer: `status` is the gRPC code name; `model` is "" for requests that named no
  // deployed model (so that arbitrary names cannot create series).
  void Inference(const std::string& model, const std::string& version, const std::string& status,
                 double seconds, double queue_seconds);
  void PendingAdd(int delta);
  // One forward pass of a model with dynamic batching: its first-dimension rows and calls.
  void InferenceBatch(const std::string& model, const std::string& version, int64_t rows,
                      int calls);

  void JobSubmitted(v1::Granularity g);
  // `seconds` < 0: the job never ran (cancelled in the queue); no duration is observed.
  void JobFinished(v1::Granularity g, v1::JobState state, double seconds, int layers,
                   uint64_t bytes_written);
  void SetJobsQueued(int n);
  // A runner's write refused by the journal's lease fence (server/jobs.h).
  void JobWriteFenced();
  // fpxint_replica_info{replica, journal}: which replica this is, on which journal backend.
  void SetReplica(const std::string& replica_id, const std::string& journal);
  void SetQueueLimit(int n);
  void SetWorkers(int n);
  void WorkersBusyAdd(int delta);
  void BytesUploaded(uint64_t n);

  // Weights of one instance of a served model version: its layers' FP32 size and what it holds
  // (packed terms for packed layers). Cleared when the version is unloaded.
  void SetModelWeights(const std::string& model, const std::string& version, uint64_t fp32_bytes,
                       uint64_t resident_bytes);
  void ClearModelWeights(const std::string& model, const std::string& version);
  void Rpc(const std::string& method, const std::string& code, double seconds);

  // The text exposition format of everything (what /metrics serves).
  std::string Text() const;

  // An interceptor factory for grpc::ServerBuilder that calls Rpc() for every call.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> InterceptorFactory();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  friend class MetricsExposer;
};

// Serves GET /metrics on `address` (HOST:PORT, port 0 = any free port).
class MetricsExposer {
 public:
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(const std::string& address,
                                                               Metrics* metrics);
  ~MetricsExposer();
  int port() const { return port_; }

 private:
  struct State;
  MetricsExposer() = default;
  std::unique_ptr<State> state_;
  int port_ = 0;
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_METRICS_H_
