// File: server/services.h
//
// The gRPC service implementations: fpxint.v1.Quantizer and inference.GRPCInferenceService
// (KServe v2 / OIP with Triton's repository and statistics extensions). They translate between
// the wire and the job manager / repository — nothing else: every handler runs inside Serve,
// which admits the caller and maps absl::Status to grpc::Status (status_util.h) once.
#ifndef FPXINT_SERVER_SERVICES_H_
#define FPXINT_SERVER_SERVICES_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "fpxint/v1/quantizer.grpc.pb.h"
#include "inference/grpc_service.grpc.pb.h"
#include "server/auth.h"
#include "server/jobs.h"
#include "server/journal.h"
#include "server/metrics.h"
#include "server/repository.h"
#include "server/status_util.h"
#include "server/store.h"
#include "server/stream_guard.h"
#include "server/validation.h"
#include "server/vetting.h"

namespace fpxint::server {

struct ServiceContext {
  Journal* journal = nullptr;
  BlobStore* store = nullptr;
  JobManager* jobs = nullptr;
  Repository* repo = nullptr;
  const Authorizer* auth = nullptr;
  TorchScriptVetter* vetter = nullptr;  // every TorchScript upload is vetted before it is kept
  StreamGuard* uploads = nullptr;       // concurrent UploadModel calls, idle timeout
  StreamGuard* downloads = nullptr;     // concurrent DownloadArtifact calls, idle timeout
  Metrics* metrics = nullptr;  // always set by Server
  UploadPolicy upload_policy;
  std::atomic<bool>* ready = nullptr;  // false while starting and shutting down
  std::string server_version;

  // The gate of every RPC that reads or changes state: UNAVAILABLE until the server has
  // recovered its jobs and deployments (and again while it shuts down), then the caller's
  // token must carry `role` (auth.h). *roles and *name receive the caller's roles and name.
  absl::Status Admit(const grpc::ServerContextBase* c, Role role, unsigned* roles = nullptr,
                     std::string* name = nullptr) const {
    if (ready != nullptr && !ready->load()) {
      return absl::UnavailableError("the server is starting or shutting down; retry shortly");
    }
    return auth->Check(c, role, roles, name);
  }
  int64_t max_message_bytes = 64 << 20;  // --max-message-bytes: bounds a declared input tensor
};

// Who is calling: the token's roles and name (ServiceContext::Admit).
struct Caller {
  unsigned roles = 0;
  std::string name;
};

// The edge every handler goes through: admits the caller for `roles` (any of them; readiness
// first, then the token), runs `fn(caller)`, and converts its absl::Status to grpc::Status, the
// one conversion of the service. Handlers return absl::Status and never build grpc::Status.
template <typename Fn>
grpc::Status Serve(const ServiceContext& ctx, const grpc::ServerContextBase* c, unsigned roles,
                   Fn&& fn) {
  Caller caller;
  absl::Status s = ctx.Admit(c, static_cast<Role>(roles), &caller.roles, &caller.name);
  if (s.ok()) s = fn(static_cast<const Caller&>(caller));
  return ToGrpcStatus(s);
}
// Serve without the readiness gate, for calls that answer while the server starts or stops
// (ModelReady says "not ready" then rather than UNAVAILABLE).
template <typename Fn>
grpc::Status ServeAnytime(const ServiceContext& ctx, const grpc::ServerContextBase* c,
                          unsigned roles, Fn&& fn) {
  Caller caller;
  absl::Status s = ctx.auth->Check(c, static_cast<Role>(roles), &caller.roles, &caller.name);
  if (s.ok()) s = fn(static_cast<const Caller&>(caller));
  return ToGrpcStatus(s);
}
// For RPCs open to every caller (health, server metadata): no token, same conversion.
template <typename Fn>
grpc::Status ServeOpen(Fn&& fn) {
  return ToGrpcStatus(fn());
}

class WatchHub;

// WatchJob is on gRPC's callback API: a watcher holds no thread while it waits. One hub thread
// writes to every open watch when the job manager announces a change (JobManager::
// SetChangeListener; server/quantizer_service.cc); the other RPCs are synchronous.
class QuantizerService final
    : public v1::Quantizer::WithCallbackMethod_WatchJob<v1::Quantizer::Service> {
 public:
  explicit QuantizerService(ServiceContext ctx);
  ~QuantizerService() override;

  grpc::Status UploadModel(grpc::ServerContext* c, grpc::ServerReader<v1::UploadChunk>* reader,
                           v1::Model* resp) override;
  grpc::Status GetModel(grpc::ServerContext* c, const v1::ModelRef* req, v1::Model* resp) override;
  grpc::Status ListModels(grpc::ServerContext* c, const v1::ListModelsRequest* req,
                          v1::ListModelsResponse* resp) override;
  grpc::Status DeleteModel(grpc::ServerContext* c, const v1::ModelRef* req,
                           v1::DeleteModelResponse* resp) override;
  grpc::Status SubmitJob(grpc::ServerContext* c, const v1::SubmitJobRequest* req,
                         v1::Job* resp) override;
  grpc::Status GetJob(grpc::ServerContext* c, const v1::JobRef* req, v1::Job* resp) override;
  grpc::Status ListJobs(grpc::ServerContext* c, const v1::ListJobsRequest* req,
                        v1::ListJobsResponse* resp) override;
  grpc::Status CancelJob(grpc::ServerContext* c, const v1::JobRef* req, v1::Job* resp) override;
  grpc::Status DeleteJob(grpc::ServerContext* c, const v1::JobRef* req,
                         v1::DeleteJobResponse* resp) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(grpc::CallbackServerContext* c,
                                                  const v1::JobRef* req) override;
  grpc::Status DownloadArtifact(grpc::ServerContext* c, const v1::ArtifactRef* req,
                                grpc::ServerWriter<v1::ArtifactChunk>* writer) override;
  grpc::Status GetDeployment(grpc::ServerContext* c, const v1::DeploymentRef* req,
                             v1::DeploymentStatus* resp) override;

 private:
  ServiceContext ctx_;
  std::unique_ptr<WatchHub> watch_hub_;
};

class InferenceService final : public inference::GRPCInferenceService::Service {
 public:
  explicit InferenceService(ServiceContext ctx) : ctx_(ctx) {}

  grpc::Status ServerLive(grpc::ServerContext* c, const inference::ServerLiveRequest* req,
                          inference::ServerLiveResponse* resp) override;
  grpc::Status ServerReady(grpc::ServerContext* c, const inference::ServerReadyRequest* req,
                           inference::ServerReadyResponse* resp) override;
  grpc::Status ModelReady(grpc::ServerContext* c, const inference::ModelReadyRequest* req,
                          inference::ModelReadyResponse* resp) override;
  grpc::Status ServerMetadata(grpc::ServerContext* c, const inference::ServerMetadataRequest* req,
                              inference::ServerMetadataResponse* resp) override;
  grpc::Status ModelMetadata(grpc::ServerContext* c, const inference::ModelMetadataRequest* req,
                             inference::ModelMetadataResponse* resp) override;
  grpc::Status ModelInfer(grpc::ServerContext* c, const inference::ModelInferRequest* req,
                          inference::ModelInferResponse* resp) override;
  grpc::Status ModelStatistics(grpc::ServerContext* c, const inference::ModelStatisticsRequest* req,
                               inference::ModelStatisticsResponse* resp) override;
  grpc::Status RepositoryIndex(grpc::ServerContext* c, const inference::RepositoryIndexRequest* req,
                               inference::RepositoryIndexResponse* resp) override;
  grpc::Status RepositoryModelLoad(grpc::ServerContext* c,
                                   const inference::RepositoryModelLoadRequest* req,
                                   inference::RepositoryModelLoadResponse* resp) override;
  grpc::Status RepositoryModelUnload(grpc::ServerContext* c,
                                     const inference::RepositoryModelUnloadRequest* req,
                                     inference::RepositoryModelUnloadResponse* resp) override;

 private:
  // ModelInfer's work; fills the model/version labels and the instance wait for the metrics.
  absl::Status Infer(grpc::ServerContext* c, const inference::ModelInferRequest* req,
                     inference::ModelInferResponse* resp, std::string* model, std::string* version,
                     uint64_t* queue_ns);

  ServiceContext ctx_;
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_SERVICES_H_
