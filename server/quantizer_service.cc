// File: server/quantizer_service.cc
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "core/unique_fd.h"
#include "server/log.h"
#include "server/model_files.h"
#include "server/services.h"
#include "server/status_util.h"
#include "server/upload.h"

namespace fpxint::server {
namespace {

// Removes a blob that no record references (after a refused or replaced upload).
void DropIfUnreferenced(const ServiceContext& ctx, const std::string& sha) {
  Journal* j = ctx.journal;
  ctx.store->RemoveIfUnreferenced(sha, [j](const std::string& s) { return j->BlobReferenced(s); });
}

}  // namespace

grpc::Status QuantizerService::UploadModel(grpc::ServerContext* c,
                                           grpc::ServerReader<v1::UploadChunk>* reader,
                                           v1::Model* resp) {
  return Serve(ctx_, c, kRoleQuantize, [&](const Caller& caller) -> absl::Status {
    FPX_ASSIGN_OR_RETURN(std::unique_ptr<StreamGuard::Lease> lease, ctx_.uploads->Open(c));
    UploadPolicy policy = ctx_.upload_policy;
    if (policy.quota_bytes > 0) {
      FPX_ASSIGN_OR_RETURN(policy.quota_used, ctx_.journal->UploadedBytesBy(caller.name));
    }
    UploadAssembler upload(ctx_.store, policy, (caller.roles & kRoleAdmin) != 0);
    v1::UploadChunk chunk;
    while (reader->Read(&chunk)) {
      lease->Progress();
      FPX_RETURN_IF_ERROR(upload.Add(chunk));
      ctx_.metrics->BytesUploaded(chunk.data().size());
    }
    if (lease->timed_out()) return lease->IdleError();
    if (c->IsCancelled()) return absl::CancelledError("client cancelled");
    lease.reset();  // the stream is over: vetting below does not count against the upload limit
    FPX_ASSIGN_OR_RETURN(BlobWriter::Result blob, upload.Finish([this](const std::string& sha) {
      DropIfUnreferenced(ctx_, sha);
    }));
    const v1::UploadHeader& header = upload.header();
    if (header.format() == v1::HF_DIRECTORY) {
      // One file of a directory: staged for this caller's CommitModelFiles, not a model yet.
      FPX_RETURN_IF_ERROR(ctx_.store->MarkStaged(caller.name, blob.sha256));
      resp->set_name(header.name());
      resp->set_format(v1::HF_DIRECTORY);
      resp->set_sha256(blob.sha256);
      resp->set_size_bytes(blob.size);
      resp->set_owner(caller.name);
      resp->set_deduplicated(blob.deduplicated);
      resp->set_tensor_count(upload.content().tensors);
      resp->set_parameter_count(upload.content().parameters);
      for (const auto& [dtype, n] : upload.content().dtypes) (*resp->mutable_dtypes())[dtype] = n;
      v1::ModelFile* f = resp->add_files();
      f->set_path(header.file_path());
      f->set_sha256(blob.sha256);
      f->set_size_bytes(blob.size);
      f->set_tensor_count(upload.content().tensors);
      return absl::OkStatus();
    }
    if (header.format() == v1::TORCHSCRIPT) {
      // Vetted before anything refers to it; a refused archive is not kept.
      auto verdict = ctx_.vetter->Vet(blob.sha256, ctx_.store->PathOf(blob.sha256));
      if (!verdict.ok() || !verdict->passed) {
        if (!blob.deduplicated) DropIfUnreferenced(ctx_, blob.sha256);
        if (!verdict.ok()) return verdict.status();
        LogWarning(
            absl::StrCat("TorchScript upload '", header.name(), "' refused: ", verdict->summary));
        return absl::InvalidArgumentError(absl::StrCat(
            "data: the TorchScript model was refused, and nothing of it was run or kept: ",
            verdict->summary,
            ". Accepted: modules whose every function uses only pure tensor operations "
            "(fpxint-vet --list-ops; operators extend the list with --torchscript-allow-ops)"));
      }
    }
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Model> existing, ctx_.journal->GetModel(header.name()));
    if (existing) {
      if (existing->sha256() != blob.sha256 || existing->format() != header.format()) {
        if (!blob.deduplicated) DropIfUnreferenced(ctx_, blob.sha256);
        return absl::AlreadyExistsError(
            absl::StrCat("header.name: a different model is already named '", header.name(),
                         "' (DeleteModel it first, or choose another name)"));
      }
      *resp = *std::move(existing);
      resp->set_deduplicated(true);
      return absl::OkStatus();
    }
    v1::Model m;
    m.set_name(header.name());
    m.set_format(header.format());
    m.set_sha256(blob.sha256);
    m.set_size_bytes(blob.size);
    m.set_created_unix_ms(NowUnixMs());
    m.set_owner(caller.name);
    *m.mutable_inputs() = header.inputs();
    m.set_tensor_count(upload.content().tensors);
    m.set_parameter_count(upload.content().parameters);
    for (const auto& [dtype, n] : upload.content().dtypes) (*m.mutable_dtypes())[dtype] = n;
    FPX_RETURN_IF_ERROR(ctx_.journal->PutModel(m));
    LogInfo(absl::StrCat("model '", m.name(), "' uploaded: ", v1::ModelFormat_Name(m.format()),
                         ", ", m.size_bytes(), " bytes, sha256 ", m.sha256(),
                         blob.deduplicated ? " (deduplicated)" : ""));
    *resp = m;
    resp->set_deduplicated(blob.deduplicated);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* QuantizerService::CommitModelFiles(
    grpc::CallbackServerContext* c, const v1::CommitModelFilesRequest* req,
    v1::CommitModelFilesResponse* resp) {
  return ServeQueued(ctx_, c, kRoleQuantize, [this, req, resp](const Caller& caller) -> absl::Status {
    FPX_ASSIGN_OR_RETURN(std::vector<std::string> missing,
                         MissingModelFiles(*req, caller.name, *ctx_.store));
    for (const std::string& p : missing) resp->add_missing(p);
    if (req->dry_run()) return absl::OkStatus();
    if (!missing.empty()) {
      const size_t shown = std::min<size_t>(missing.size(), 5);
      return absl::FailedPreconditionError(absl::StrCat(
          "files: ", missing.size(), " of ", req->files_size(),
          " file(s) were not uploaded by this caller (", 
          absl::StrJoin(missing.begin(), missing.begin() + static_cast<long>(shown), ", "),
          missing.size() > shown ? ", ..." : "",
          "); upload each with header.file_path, then commit again"));
    }
    FPX_ASSIGN_OR_RETURN(v1::Model m, BuildDirectoryModel(*req, *ctx_.store));
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Model> existing, ctx_.journal->GetModel(req->name()));
    if (existing) {
      if (existing->sha256() != m.sha256() || existing->format() != m.format()) {
        return absl::AlreadyExistsError(
            absl::StrCat("name: a different model is already named '", req->name(),
                         "' (DeleteModel it first, or choose another name)"));
      }
      *resp->mutable_model() = *std::move(existing);
      resp->mutable_model()->set_deduplicated(true);
      return absl::OkStatus();
    }
    const UploadPolicy& policy = ctx_.upload_policy;
    if (policy.quota_bytes > 0) {
      FPX_ASSIGN_OR_RETURN(uint64_t used, ctx_.journal->UploadedBytesBy(caller.name));
      if (used + m.size_bytes() > policy.quota_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "this caller's uploads hold ", used, " bytes and this model ", m.size_bytes(),
            " more; the quota per caller is ", policy.quota_bytes,
            " bytes (--upload-quota-bytes): delete models (DeleteModel) or ask the operator"));
      }
    }
    m.set_created_unix_ms(NowUnixMs());
    m.set_owner(caller.name);
    FPX_RETURN_IF_ERROR(ctx_.journal->PutModel(m));
    int shards = 0;
    for (const v1::ModelFile& f : m.files()) shards += f.role() == "shard";
    LogInfo(absl::StrCat("model '", m.name(), "' committed: HF_DIRECTORY, ", m.files_size(),
                         " files (", shards, " shards, ", m.tensor_count(), " tensors), ",
                         m.size_bytes(), " bytes"));
    *resp->mutable_model() = std::move(m);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* QuantizerService::GetModel(grpc::CallbackServerContext* c,
                                                     const v1::ModelRef* req, v1::Model* resp) {
  return ServeQueued(ctx_, c, kRoleQuantize, [this, req, resp](const Caller&) -> absl::Status {
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Model> m, ctx_.journal->GetModel(req->name()));
    if (!m) return absl::NotFoundError(absl::StrCat("name: no model '", req->name(), "'"));
    *resp = *std::move(m);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* QuantizerService::ListModels(grpc::CallbackServerContext* c,
                                                       const v1::ListModelsRequest*,
                                                       v1::ListModelsResponse* resp) {
  return ServeQueued(ctx_, c, kRoleQuantize, [this, resp](const Caller&) -> absl::Status {
    FPX_ASSIGN_OR_RETURN(std::vector<v1::Model> all, ctx_.journal->ListModels());
    for (auto& m : all) *resp->add_models() = std::move(m);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* QuantizerService::DeleteModel(grpc::CallbackServerContext* c,
                                                        const v1::ModelRef* req,
                                                        v1::DeleteModelResponse*) {
  return ServeQueued(ctx_, c, kRoleQuantize, [this, req](const Caller&) -> absl::Status {
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Model> m, ctx_.journal->GetModel(req->name()));
    if (!m) return absl::NotFoundError(absl::StrCat("name: no model '", req->name(), "'"));
    FPX_ASSIGN_OR_RETURN(bool busy, ctx_.journal->ModelInUse(req->name()));
    if (busy) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model '", req->name(), "' is used by a queued or running job; cancel it first"));
    }
    FPX_RETURN_IF_ERROR(ctx_.journal->DeleteModel(req->name()));
    DropIfUnreferenced(ctx_, m->sha256());
    for (const v1::ModelFile& f : m->files()) DropIfUnreferenced(ctx_, f.sha256());
    LogInfo(absl::StrCat("model '", req->name(), "' deleted"));
    return absl::OkStatus();
  });
}

// The handlers that hand one request to the job manager and return its answer.
#define FPX_JOB_RPC(Method, Request, Response, call)                                       \
  grpc::ServerUnaryReactor* QuantizerService::Method(grpc::CallbackServerContext* c,       \
                                                     const Request* req, Response* resp) { \
    return ServeQueued(ctx_, c, kRoleQuantize,                                             \
                       [this, req, resp](const Caller&) -> absl::Status {                  \
                         FPX_ASSIGN_OR_RETURN(*resp, ctx_.jobs->call);                     \
                         return absl::OkStatus();                                          \
                       });                                                                 \
  }
FPX_JOB_RPC(SubmitJob, v1::SubmitJobRequest, v1::Job, Submit(*req))
FPX_JOB_RPC(GetJob, v1::JobRef, v1::Job, Get(req->job_id()))
FPX_JOB_RPC(ListJobs, v1::ListJobsRequest, v1::ListJobsResponse, List(*req))
FPX_JOB_RPC(CancelJob, v1::JobRef, v1::Job, Cancel(req->job_id()))
FPX_JOB_RPC(DeleteJob, v1::JobRef, v1::DeleteJobResponse, Delete(req->job_id()))
#undef FPX_JOB_RPC

// ---- WatchJob on the callback API ----

// One open WatchJob call. The hub's thread polls it; gRPC's threads deliver its write
// completions and cancellation. StartWrite and Finish are called outside mu_ (a reaction may run
// inline), and Finish exactly once.
class WatchReactor final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  WatchReactor(WatchHub* hub, std::string job_id) : hub_(hub), job_id_(std::move(job_id)) {}

  // Sends the job when it changed; finishes when it is over (or the server stops with it queued).
  void Poll(JobManager* jobs, bool ready);
  // Refused before it started (authorization, readiness): finished at once, never polled.
  void Refuse(const grpc::Status& s) {
    {
      absl::MutexLock l(&mu_);
      finishing_ = true;
    }
    Finish(s);
  }
  void Ref() { refs_.fetch_add(1); }
  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  void OnWriteDone(bool ok) override;
  void OnCancel() override {
    bool finish = false;
    {
      absl::MutexLock l(&mu_);
      if (!finishing_ && !writing_) finishing_ = finish = true;  // else OnWriteDone(false) finishes
    }
    if (finish) Finish(grpc::Status(grpc::StatusCode::CANCELLED, "watcher went away"));
  }
  void OnDone() override;

 private:
  WatchHub* const hub_;
  const std::string job_id_;
  std::atomic<int> refs_{1};  // gRPC's (until OnDone) and the hub's while it polls
  absl::Mutex mu_;
  uint64_t seen_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool terminal_ ABSL_GUARDED_BY(mu_) = false;   // the event being written ends the watch
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;  // Finish called or about to be
  v1::JobEvent event_;                           // owned by the write in flight
};

// The thread that serves every open watch when a job changes, a watch opens or a write completes.
class WatchHub {
 public:
  WatchHub(JobManager* jobs, std::atomic<bool>* ready) : jobs_(jobs), ready_(ready) {
    thread_ = std::thread([this] { Loop(); });
    // Every job change wakes the hub: watchers are pushed to, not polled.
    jobs_->SetChangeListener([this] { Wake(); });
  }
  ~WatchHub() {
    jobs_->SetChangeListener(nullptr);  // waits for a call in progress
    {
      absl::MutexLock l(&mu_);
      stop_ = true;
    }
    thread_.join();
  }
  void Add(WatchReactor* r) {
    absl::MutexLock l(&mu_);
    open_.insert(r);
    wake_ = true;
  }
  void Remove(WatchReactor* r) {
    absl::MutexLock l(&mu_);
    open_.erase(r);
  }
  void Wake() {
    absl::MutexLock l(&mu_);
    wake_ = true;
  }
  size_t open() {
    absl::MutexLock l(&mu_);
    return open_.size();
  }

 private:
  void Loop() {
    for (;;) {
      std::vector<WatchReactor*> batch;
      {
        absl::MutexLock l(&mu_);
        // Woken by every job change (JobManager::SetChangeListener), a new watcher or a finished
        // write; the timeout only catches the server's readiness turning off at shutdown.
        mu_.AwaitWithTimeout(
            absl::Condition(
                +[](WatchHub* h) ABSL_NO_THREAD_SAFETY_ANALYSIS { return h->stop_ || h->wake_; },
                this),
            absl::Seconds(1));
        if (stop_) return;
        wake_ = false;
        for (WatchReactor* r : open_) {
          r->Ref();  // kept alive while polled outside mu_
          batch.push_back(r);
        }
      }
      const bool ready = ready_ == nullptr || ready_->load();
      for (WatchReactor* r : batch) {
        r->Poll(jobs_, ready);
        r->Unref();
      }
    }
  }

  JobManager* const jobs_;
  std::atomic<bool>* const ready_;
  absl::Mutex mu_;
  std::set<WatchReactor*> open_ ABSL_GUARDED_BY(mu_);
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

void WatchReactor::Poll(JobManager* jobs, bool ready) {
  enum class Act { kNone, kWrite, kFinish } act = Act::kNone;
  grpc::Status status = grpc::Status::OK;
  {
    absl::MutexLock l(&mu_);
    if (finishing_ || writing_) return;
    bool changed = false;
    auto j = jobs->Wait(job_id_, &seen_, absl::ZeroDuration(), &changed);
    if (!j.ok()) {
      status = ToGrpcStatus(j.status());
      finishing_ = true;
      act = Act::kFinish;
    } else {
      const v1::JobState st = j->state();
      terminal_ = st == v1::SUCCEEDED || st == v1::FAILED || st == v1::CANCELLED;
      if (changed) {
        *event_.mutable_job() = *std::move(j);
        writing_ = true;
        act = Act::kWrite;
      } else if (terminal_) {
        finishing_ = true;
        act = Act::kFinish;
      } else if (!ready && st == v1::QUEUED) {
        status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                              "the server is shutting down; the job stays queued");
        finishing_ = true;
        act = Act::kFinish;
      }
    }
  }
  if (act == Act::kWrite) StartWrite(&event_);
  if (act == Act::kFinish) Finish(status);
}

void WatchReactor::OnWriteDone(bool ok) {
  bool finish = false;
  grpc::Status status = grpc::Status::OK;
  {
    absl::MutexLock l(&mu_);
    writing_ = false;
    if (!finishing_ && (!ok || terminal_)) {
      finishing_ = finish = true;
      if (!ok) status = grpc::Status(grpc::StatusCode::CANCELLED, "watcher went away");
    }
  }
  if (finish) {
    Finish(status);
  } else {
    hub_->Wake();  // the next change may already be there
  }
}

void WatchReactor::OnDone() {
  hub_->Remove(this);
  Unref();
}

QuantizerService::QuantizerService(ServiceContext ctx)
    : ctx_(ctx), watch_hub_(std::make_unique<WatchHub>(ctx.jobs, ctx.ready)) {}

QuantizerService::~QuantizerService() = default;

grpc::ServerWriteReactor<v1::JobEvent>* QuantizerService::WatchJob(grpc::CallbackServerContext* c,
                                                                   const v1::JobRef* req) {
  auto* r = new WatchReactor(watch_hub_.get(), req->job_id());
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) {  // the stream's one conversion
    r->Refuse(ToGrpcStatus(s));
    return r;
  }
  watch_hub_->Add(r);
  return r;
}

grpc::Status QuantizerService::DownloadArtifact(grpc::ServerContext* c, const v1::ArtifactRef* req,
                                                grpc::ServerWriter<v1::ArtifactChunk>* writer) {
  return Serve(ctx_, c, kRoleQuantize, [&](const Caller&) -> absl::Status {
    FPX_ASSIGN_OR_RETURN(std::optional<v1::Artifact> a,
                         ctx_.journal->GetArtifact(req->artifact_id()));
    if (!a) {
      return absl::NotFoundError(
          absl::StrCat("artifact_id: no artifact '", req->artifact_id(), "' (see Job.artifacts)"));
    }
    const v1::Artifact& art = *a;
    if (req->offset() > art.size_bytes()) {
      return absl::OutOfRangeError(absl::StrCat("offset: ", req->offset(),
                                                " is past the end of the artifact (",
                                                art.size_bytes(), " bytes)"));
    }
    const uint32_t chunk = req->chunk_bytes() == 0 ? (1u << 20) : req->chunk_bytes();
    if (chunk > (4u << 20)) return absl::InvalidArgumentError("chunk_bytes: at most 4194304");
    FPX_ASSIGN_OR_RETURN(std::unique_ptr<StreamGuard::Lease> lease, ctx_.downloads->Open(c));
    absl::StatusOr<core::UniqueFd> opened = ctx_.store->OpenRead(art.sha256());
    if (!opened.ok()) {
      return absl::DataLossError(absl::StrCat("artifact ", art.artifact_id(),
                                              ": its blob cannot be read from the store: ",
                                              opened.status().message()));
    }
    const core::UniqueFd fd = *std::move(opened);
    uint64_t off = req->offset();
    v1::ArtifactChunk msg;
    msg.set_total_size(art.size_bytes());
    msg.set_sha256(art.sha256());
    msg.set_file_name(art.file_name());
    std::string buf;
    do {
      buf.resize(std::min<uint64_t>(chunk, art.size_bytes() - off));
      const ssize_t n =
          buf.empty() ? 0 : ::pread(fd.get(), buf.data(), buf.size(), static_cast<off_t>(off));
      if (n < 0 || static_cast<size_t>(n) != buf.size()) {
        return absl::DataLossError("artifact blob is shorter than recorded");
      }
      msg.set_offset(off);
      msg.set_data(buf);
      if (!writer->Write(msg)) {
        return lease->timed_out() ? lease->IdleError() : absl::CancelledError("client went away");
      }
      lease->Progress();
      off += buf.size();
    } while (off < art.size_bytes() && !c->IsCancelled());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* QuantizerService::GetDeployment(grpc::CallbackServerContext* c,
                                                          const v1::DeploymentRef* req,
                                                          v1::DeploymentStatus* resp) {
  // Who serves a model (infer) and who deployed it (quantize) may both look at it.
  return ServeQueued(ctx_, c, kRoleInfer | kRoleQuantize,
                     [this, req, resp](const Caller&) -> absl::Status {
    FPX_ASSIGN_OR_RETURN(*resp, ctx_.repo->Describe(req->name(), req->version()));
    return absl::OkStatus();
  });
}

}  // namespace fpxint::server
