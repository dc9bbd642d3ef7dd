// File: server/quantizer_service.cc
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "server/log.h"
#include "server/services.h"
#include "server/upload.h"
#include "server/status_util.h"

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
  unsigned roles = 0;
  std::string owner;
  if (auto s = ctx_.Admit(c, kRoleQuantize, &roles, &owner); !s.ok()) return ToGrpcStatus(s);
  auto lease = ctx_.uploads->Open(c);
  if (!lease.ok()) return ToGrpcStatus(lease.status());
  UploadPolicy policy = ctx_.upload_policy;
  if (policy.quota_bytes > 0) {
    auto used = ctx_.journal->UploadedBytesBy(owner);
    if (!used.ok()) return ToGrpcStatus(used.status());
    policy.quota_used = *used;
  }
  UploadAssembler upload(ctx_.store, policy, (roles & kRoleAdmin) != 0);
  v1::UploadChunk chunk;
  while (reader->Read(&chunk)) {
    (*lease)->Progress();
    if (auto s = upload.Add(chunk); !s.ok()) return ToGrpcStatus(s);
    ctx_.metrics->BytesUploaded(chunk.data().size());
  }
  if ((*lease)->timed_out()) return ToGrpcStatus((*lease)->IdleError());
  if (c->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled");
  lease->reset();  // the stream is over: vetting below does not count against the upload limit
  auto blob = upload.Finish([this](const std::string& sha) { DropIfUnreferenced(ctx_, sha); });
  if (!blob.ok()) return ToGrpcStatus(blob.status());
  const v1::UploadHeader& header = upload.header();
  if (header.format() == v1::TORCHSCRIPT) {
    // Vetted before anything refers to it; a refused archive is not kept.
    auto verdict = ctx_.vetter->Vet(blob->sha256, ctx_.store->PathOf(blob->sha256));
    if (!verdict.ok() || !verdict->passed) {
      if (!blob->deduplicated) DropIfUnreferenced(ctx_, blob->sha256);
      if (!verdict.ok()) return ToGrpcStatus(verdict.status());
      LogWarning(absl::StrCat("TorchScript upload '", header.name(), "' refused: ",
                              verdict->summary));
      return ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
          "data: the TorchScript model was refused, and nothing of it was run or kept: ",
          verdict->summary,
          ". Accepted: modules whose every function uses only pure tensor operations "
          "(fpxint-vet --list-ops; operators extend the list with --torchscript-allow-ops)")));
    }
  }
  auto existing = ctx_.journal->GetModel(header.name());
  if (!existing.ok()) return ToGrpcStatus(existing.status());
  if (*existing) {
    if ((*existing)->sha256() != blob->sha256 || (*existing)->format() != header.format()) {
      if (!blob->deduplicated) DropIfUnreferenced(ctx_, blob->sha256);
      return ToGrpcStatus(absl::AlreadyExistsError(
          absl::StrCat("header.name: a different model is already named '", header.name(),
                       "' (DeleteModel it first, or choose another name)")));
    }
    *resp = **existing;
    resp->set_deduplicated(true);
    return grpc::Status::OK;
  }
  v1::Model m;
  m.set_name(header.name());
  m.set_format(header.format());
  m.set_sha256(blob->sha256);
  m.set_size_bytes(blob->size);
  m.set_created_unix_ms(NowUnixMs());
  m.set_owner(owner);
  *m.mutable_inputs() = header.inputs();
  if (auto s = ctx_.journal->PutModel(m); !s.ok()) return ToGrpcStatus(s);
  LogInfo(absl::StrCat("model '", m.name(), "' uploaded: ", v1::ModelFormat_Name(m.format()), ", ",
                       m.size_bytes(), " bytes, sha256 ", m.sha256(),
                       blob->deduplicated ? " (deduplicated)" : ""));
  *resp = m;
  resp->set_deduplicated(blob->deduplicated);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::GetModel(grpc::ServerContext* c, const v1::ModelRef* req,
                                        v1::Model* resp) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto m = ctx_.journal->GetModel(req->name());
  if (!m.ok()) return ToGrpcStatus(m.status());
  if (!*m) {
    return ToGrpcStatus(absl::NotFoundError(absl::StrCat("name: no model '", req->name(), "'")));
  }
  *resp = **m;
  return grpc::Status::OK;
}

grpc::Status QuantizerService::ListModels(grpc::ServerContext* c, const v1::ListModelsRequest*,
                                          v1::ListModelsResponse* resp) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto all = ctx_.journal->ListModels();
  if (!all.ok()) return ToGrpcStatus(all.status());
  for (auto& m : *all) *resp->add_models() = std::move(m);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::DeleteModel(grpc::ServerContext* c, const v1::ModelRef* req,
                                           v1::DeleteModelResponse*) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto m = ctx_.journal->GetModel(req->name());
  if (!m.ok()) return ToGrpcStatus(m.status());
  if (!*m) {
    return ToGrpcStatus(absl::NotFoundError(absl::StrCat("name: no model '", req->name(), "'")));
  }
  auto busy = ctx_.journal->ModelInUse(req->name());
  if (!busy.ok()) return ToGrpcStatus(busy.status());
  if (*busy) {
    return ToGrpcStatus(absl::FailedPreconditionError(absl::StrCat(
        "model '", req->name(), "' is used by a queued or running job; cancel it first")));
  }
  if (auto s = ctx_.journal->DeleteModel(req->name()); !s.ok()) return ToGrpcStatus(s);
  DropIfUnreferenced(ctx_, (*m)->sha256());
  LogInfo(absl::StrCat("model '", req->name(), "' deleted"));
  return grpc::Status::OK;
}

grpc::Status QuantizerService::SubmitJob(grpc::ServerContext* c, const v1::SubmitJobRequest* req,
                                         v1::Job* resp) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto j = ctx_.jobs->Submit(*req);
  if (!j.ok()) return ToGrpcStatus(j.status());
  *resp = *std::move(j);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::GetJob(grpc::ServerContext* c, const v1::JobRef* req,
                                      v1::Job* resp) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto j = ctx_.jobs->Get(req->job_id());
  if (!j.ok()) return ToGrpcStatus(j.status());
  *resp = *std::move(j);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::ListJobs(grpc::ServerContext* c, const v1::ListJobsRequest* req,
                                        v1::ListJobsResponse* resp) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto r = ctx_.jobs->List(*req);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = *std::move(r);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::CancelJob(grpc::ServerContext* c, const v1::JobRef* req,
                                         v1::Job* resp) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto j = ctx_.jobs->Cancel(req->job_id());
  if (!j.ok()) return ToGrpcStatus(j.status());
  *resp = *std::move(j);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::DeleteJob(grpc::ServerContext* c, const v1::JobRef* req,
                                         v1::DeleteJobResponse* resp) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto r = ctx_.jobs->Delete(req->job_id());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = *std::move(r);
  return grpc::Status::OK;
}

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

// The thread that polls every open watch, every 100 ms or when a write completes.
class WatchHub {
 public:
  WatchHub(JobManager* jobs, std::atomic<bool>* ready) : jobs_(jobs), ready_(ready) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~WatchHub() {
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
        mu_.AwaitWithTimeout(absl::Condition(
                                 +[](WatchHub* h) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                   return h->stop_ || h->wake_;
                                 },
                                 this),
                             absl::Milliseconds(100));
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
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) {
    r->Refuse(ToGrpcStatus(s));
    return r;
  }
  watch_hub_->Add(r);
  return r;
}

grpc::Status QuantizerService::DownloadArtifact(grpc::ServerContext* c, const v1::ArtifactRef* req,
                                                grpc::ServerWriter<v1::ArtifactChunk>* writer) {
  if (auto s = ctx_.Admit(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto a = ctx_.journal->GetArtifact(req->artifact_id());
  if (!a.ok()) return ToGrpcStatus(a.status());
  if (!*a) {
    return ToGrpcStatus(absl::NotFoundError(
        absl::StrCat("artifact_id: no artifact '", req->artifact_id(), "' (see Job.artifacts)")));
  }
  const v1::Artifact& art = **a;
  if (req->offset() > art.size_bytes()) {
    return ToGrpcStatus(absl::OutOfRangeError(absl::StrCat("offset: ", req->offset(),
                                                           " is past the end of the artifact (",
                                                           art.size_bytes(), " bytes)")));
  }
  uint32_t chunk = req->chunk_bytes() == 0 ? (1u << 20) : req->chunk_bytes();
  if (chunk > (4u << 20)) {
    return ToGrpcStatus(absl::InvalidArgumentError("chunk_bytes: at most 4194304"));
  }
  auto lease = ctx_.downloads->Open(c);
  if (!lease.ok()) return ToGrpcStatus(lease.status());
  const std::string path = ctx_.store->PathOf(art.sha256());
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return ToGrpcStatus(absl::DataLossError(
        absl::StrCat("artifact ", art.artifact_id(), ": its blob is missing from the store")));
  }
  uint64_t off = req->offset();
  v1::ArtifactChunk msg;
  msg.set_total_size(art.size_bytes());
  msg.set_sha256(art.sha256());
  msg.set_file_name(art.file_name());
  std::string buf;
  grpc::Status result = grpc::Status::OK;
  do {
    buf.resize(std::min<uint64_t>(chunk, art.size_bytes() - off));
    ssize_t n = buf.empty() ? 0 : ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(off));
    if (n < 0 || static_cast<size_t>(n) != buf.size()) {
      result = ToGrpcStatus(absl::DataLossError("artifact blob is shorter than recorded"));
      break;
    }
    msg.set_offset(off);
    msg.set_data(buf);
    if (!writer->Write(msg)) {
      result = (*lease)->timed_out() ? ToGrpcStatus((*lease)->IdleError())
                                     : grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      break;
    }
    (*lease)->Progress();
    off += buf.size();
  } while (off < art.size_bytes() && !c->IsCancelled());
  ::close(fd);
  return result;
}

grpc::Status QuantizerService::GetDeployment(grpc::ServerContext* c, const v1::DeploymentRef* req,
                                             v1::DeploymentStatus* resp) {
  // Who serves a model (infer) and who deployed it (quantize) may both look at it.
  unsigned roles = 0;
  absl::Status admitted = ctx_.Admit(c, kRoleInfer, &roles);
  if (absl::IsPermissionDenied(admitted) && (roles & kRoleQuantize) != 0) admitted = absl::OkStatus();
  if (!admitted.ok()) return ToGrpcStatus(admitted);
  auto d = ctx_.repo->Describe(req->name(), req->version());
  if (!d.ok()) return ToGrpcStatus(d.status());
  *resp = *std::move(d);
  return grpc::Status::OK;
}

}  // namespace fpxint::server
