// File: server/services.h
//
// The gRPC service implementations: fpxint.v1.Quantizer and inference.GRPCInferenceService
// (KServe v2 / OIP with Triton's repository and statistics extensions). They translate between
// the wire and the job manager / repository — nothing else: every handler runs inside one of
// the Serve forms below, which admit the caller and map absl::Status to grpc::Status
// (status_util.h) once.
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
#include "server/oip_codec.h"
#include "server/repository.h"
#include "server/status_util.h"
#include "server/store.h"
#include "server/stream_guard.h"
#include "server/validation.h"
#include "server/vetting.h"
#include "server/work_queue.h"

namespace fpxint::server {

// Who is calling: the token's roles and name (ServiceContext::Admit).
struct Caller {
  unsigned roles = 0;
  std::string name;
};

// What an RPC checks before its handler runs.
enum class Gate {
  kReady,  // the server is ready (UNAVAILABLE while it starts or stops), then the token's roles
  kToken,  // the token's roles only: calls that answer while the server starts or stops
  kOpen,   // nothing: health and server metadata
};

struct ServiceContext {
  Journal* journal = nullptr;
  BlobStore* store = nullptr;
  JobManager* jobs = nullptr;
  Repository* repo = nullptr;
  const Authorizer* auth = nullptr;
  TorchScriptVetter* vetter = nullptr;  // every TorchScript upload is vetted before it is kept
  StreamGuard* uploads = nullptr;       // concurrent UploadModel calls, idle timeout
  StreamGuard* downloads = nullptr;     // concurrent DownloadArtifact calls, idle timeout
  WorkQueue* control = nullptr;         // runs the handlers that may block (ServeQueued)
  Metrics* metrics = nullptr;  // always set by Server
  UploadPolicy upload_policy;
  std::atomic<bool>* ready = nullptr;  // false while starting and shutting down
  std::string server_version;
  int64_t max_message_bytes = 64 << 20;  // --max-message-bytes: bounds a declared input tensor

  // The gate of every RPC: readiness (Gate::kReady), then the caller's token must carry one of
  // `roles` (auth.h; Gate::kOpen checks nothing). *caller receives the token's roles and name.
  absl::Status Admit(const grpc::ServerContextBase* c, unsigned roles, Caller* caller = nullptr,
                     Gate gate = Gate::kReady) const {
    if (gate == Gate::kOpen) return absl::OkStatus();
    if (gate == Gate::kReady && ready != nullptr && !ready->load()) {
      return absl::UnavailableError("the server is starting or shutting down; retry shortly");
    }
    return auth->Check(c, static_cast<Role>(roles), caller ? &caller->roles : nullptr,
                       caller ? &caller->name : nullptr);
  }
};

// The edge every handler goes through. Each form admits the caller (ServiceContext::Admit),
// runs `fn(caller)` and converts its absl::Status to grpc::Status, the one conversion of the
// service: handlers return absl::Status and never build grpc::Status. RPC counts and latencies
// are recorded by the metrics interceptor around every form (metrics.h).
//
// Serve: synchronous, on the calling thread (the streaming UploadModel and DownloadArtifact,
// which read and write files chunk by chunk on a thread of their own).
template <Gate G = Gate::kReady, typename Fn>
grpc::Status Serve(const ServiceContext& ctx, const grpc::ServerContextBase* c, unsigned roles,
                   Fn&& fn) {
  Caller caller;
  absl::Status s = ctx.Admit(c, roles, &caller, G);
  if (s.ok()) s = fn(static_cast<const Caller&>(caller));
  return ToGrpcStatus(s);
}

// ServeInline: a callback-API unary call answered on gRPC's own thread. Only for handlers that
// read memory and never block (health, metadata, statistics, the repository index).
template <Gate G = Gate::kReady, typename Fn>
grpc::ServerUnaryReactor* ServeInline(const ServiceContext& ctx, grpc::CallbackServerContext* c,
                                      unsigned roles, Fn&& fn) {
  grpc::ServerUnaryReactor* r = c->DefaultReactor();
  r->Finish(Serve<G>(ctx, c, roles, std::forward<Fn>(fn)));
  return r;
}

// ServeQueued: a callback-API unary call whose handler may block (the journal, the store, model
// loads) runs on the control queue, so gRPC's threads never wait on it. `fn` outlives the
// handler's frame: it captures the request and response pointers by value. RESOURCE_EXHAUSTED
// when the queue is full.
template <typename Fn>
grpc::ServerUnaryReactor* ServeQueued(const ServiceContext& ctx, grpc::CallbackServerContext* c,
                                      unsigned roles, Fn fn) {
  grpc::ServerUnaryReactor* r = c->DefaultReactor();
  const ServiceContext* cx = &ctx;
  const bool queued = ctx.control->Post([cx, c, r, roles, fn = std::move(fn)]() mutable {
    r->Finish(c->IsCancelled() ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away")
                               : Serve(*cx, c, roles, fn));
  });
  if (!queued) {
    r->Finish(ToGrpcStatus(absl::ResourceExhaustedError(
        "too many control requests are waiting to run (models, jobs, repository); retry shortly")));
  }
  return r;
}

class WatchHub;

// The Quantizer on gRPC's callback API: the unary RPCs run on the control queue (ServeQueued),
// WatchJob is pushed by one hub thread when the job manager announces a change (JobManager::
// SetChangeListener; server/quantizer_service.cc). The two bulk streams, UploadModel and
// DownloadArtifact, stay synchronous: each holds one thread that writes or reads the store chunk
// by chunk, and --max-uploads / --max-downloads (StreamGuard) bound how many there are.
using QuantizerBase = v1::Quantizer::WithCallbackMethod_CommitModelFiles<
    v1::Quantizer::WithCallbackMethod_GetModel<
    v1::Quantizer::WithCallbackMethod_ListModels<v1::Quantizer::WithCallbackMethod_DeleteModel<
        v1::Quantizer::WithCallbackMethod_SubmitJob<v1::Quantizer::WithCallbackMethod_GetJob<
            v1::Quantizer::WithCallbackMethod_ListJobs<v1::Quantizer::WithCallbackMethod_CancelJob<
                v1::Quantizer::WithCallbackMethod_DeleteJob<
                    v1::Quantizer::WithCallbackMethod_WatchJob<
                        v1::Quantizer::WithCallbackMethod_GetDeployment<
                            v1::Quantizer::Service>>>>>>>>>>>;

class QuantizerService final : public QuantizerBase {
 public:
  explicit QuantizerService(ServiceContext ctx);
  ~QuantizerService() override;

  grpc::Status UploadModel(grpc::ServerContext* c, grpc::ServerReader<v1::UploadChunk>* reader,
                           v1::Model* resp) override;
  grpc::ServerUnaryReactor* CommitModelFiles(grpc::CallbackServerContext* c,
                                             const v1::CommitModelFilesRequest* req,
                                             v1::CommitModelFilesResponse* resp) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* c, const v1::ModelRef* req,
                                     v1::Model* resp) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* c,
                                       const v1::ListModelsRequest* req,
                                       v1::ListModelsResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteModel(grpc::CallbackServerContext* c, const v1::ModelRef* req,
                                        v1::DeleteModelResponse* resp) override;
  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* c,
                                      const v1::SubmitJobRequest* req, v1::Job* resp) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* c, const v1::JobRef* req,
                                   v1::Job* resp) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* c,
                                     const v1::ListJobsRequest* req,
                                     v1::ListJobsResponse* resp) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* c, const v1::JobRef* req,
                                      v1::Job* resp) override;
  grpc::ServerUnaryReactor* DeleteJob(grpc::CallbackServerContext* c, const v1::JobRef* req,
                                      v1::DeleteJobResponse* resp) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(grpc::CallbackServerContext* c,
                                                  const v1::JobRef* req) override;
  grpc::Status DownloadArtifact(grpc::ServerContext* c, const v1::ArtifactRef* req,
                                grpc::ServerWriter<v1::ArtifactChunk>* writer) override;
  grpc::ServerUnaryReactor* GetDeployment(grpc::CallbackServerContext* c,
                                          const v1::DeploymentRef* req,
                                          v1::DeploymentStatus* resp) override;

 private:
  ServiceContext ctx_;
  std::unique_ptr<WatchHub> watch_hub_;
};

// KServe v2 / OIP on gRPC's callback API. ModelInfer is admitted and decoded on gRPC's thread,
// then handed to the served model (ServedModel::Submit): the instance that runs it computes,
// encodes the response and finishes the call on its own thread, so no thread waits for another.
// Repository loads and unloads run on the control queue; the rest answer inline.
class InferenceService final : public inference::GRPCInferenceService::CallbackService {
 public:
  explicit InferenceService(ServiceContext ctx) : ctx_(ctx) {}

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* c,
                                       const inference::ServerLiveRequest* req,
                                       inference::ServerLiveResponse* resp) override;
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* c,
                                        const inference::ServerReadyRequest* req,
                                        inference::ServerReadyResponse* resp) override;
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* c,
                                       const inference::ModelReadyRequest* req,
                                       inference::ModelReadyResponse* resp) override;
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* c,
                                           const inference::ServerMetadataRequest* req,
                                           inference::ServerMetadataResponse* resp) override;
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* c,
                                          const inference::ModelMetadataRequest* req,
                                          inference::ModelMetadataResponse* resp) override;
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* c,
                                       const inference::ModelInferRequest* req,
                                       inference::ModelInferResponse* resp) override;
  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* c,
                                            const inference::ModelStatisticsRequest* req,
                                            inference::ModelStatisticsResponse* resp) override;
  grpc::ServerUnaryReactor* RepositoryIndex(grpc::CallbackServerContext* c,
                                            const inference::RepositoryIndexRequest* req,
                                            inference::RepositoryIndexResponse* resp) override;
  grpc::ServerUnaryReactor* RepositoryModelLoad(
      grpc::CallbackServerContext* c, const inference::RepositoryModelLoadRequest* req,
      inference::RepositoryModelLoadResponse* resp) override;
  grpc::ServerUnaryReactor* RepositoryModelUnload(
      grpc::CallbackServerContext* c, const inference::RepositoryModelUnloadRequest* req,
      inference::RepositoryModelUnloadResponse* resp) override;

 private:
  // Ends a ModelInfer call: a failure in the model's statistics (m: the model, when the call
  // got that far; a success is recorded by the caller, with its phases), the inference metrics
  // (queue_ns < 0: the call never reached the model's queue), and the call's status.
  void FinishInfer(grpc::ServerUnaryReactor* r, ServedModel* m, const absl::Status& s,
                   uint64_t t0, int64_t queue_ns);
  // ModelInfer on a model with dynamic batching (ServedModel::SubmitBatched).
  void SubmitBatched(grpc::CallbackServerContext* c, grpc::ServerUnaryReactor* r,
                     const inference::ModelInferRequest* req, inference::ModelInferResponse* resp,
                     ServedModel* m, int kw, int ka, uint64_t t0, uint64_t t1, DecodedRequest in);

  ServiceContext ctx_;
};

}  // namespace fpxint::server

#endif  // FPXINT_SERVER_SERVICES_H_
