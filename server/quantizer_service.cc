// File: server/quantizer_service.cc
#include <fcntl.h>
#include <unistd.h>

#include <regex>

#include "absl/strings/str_cat.h"
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
  auto used = ctx.journal->BlobReferenced(sha);
  if (used.ok() && !*used) ctx.store->Remove(sha).IgnoreError();
}

}  // namespace

grpc::Status QuantizerService::UploadModel(grpc::ServerContext* c,
                                           grpc::ServerReader<v1::UploadChunk>* reader,
                                           v1::Model* resp) {
  unsigned roles = 0;
  if (auto s = ctx_.auth->Check(c, kRoleQuantize, &roles); !s.ok()) return ToGrpcStatus(s);
  UploadAssembler upload(ctx_.store, ctx_.upload_policy, (roles & kRoleAdmin) != 0);
  v1::UploadChunk chunk;
  while (reader->Read(&chunk)) {
    if (auto s = upload.Add(chunk); !s.ok()) return ToGrpcStatus(s);
    ctx_.metrics->BytesUploaded(chunk.data().size());
  }
  if (c->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled");
  auto blob = upload.Finish([this](const std::string& sha) { DropIfUnreferenced(ctx_, sha); });
  if (!blob.ok()) return ToGrpcStatus(blob.status());
  const v1::UploadHeader& header = upload.header();
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
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
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
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto all = ctx_.journal->ListModels();
  if (!all.ok()) return ToGrpcStatus(all.status());
  for (auto& m : *all) *resp->add_models() = std::move(m);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::DeleteModel(grpc::ServerContext* c, const v1::ModelRef* req,
                                           v1::DeleteModelResponse*) {
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
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
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto j = ctx_.jobs->Submit(*req);
  if (!j.ok()) return ToGrpcStatus(j.status());
  *resp = *std::move(j);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::GetJob(grpc::ServerContext* c, const v1::JobRef* req,
                                      v1::Job* resp) {
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto j = ctx_.jobs->Get(req->job_id());
  if (!j.ok()) return ToGrpcStatus(j.status());
  *resp = *std::move(j);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::ListJobs(grpc::ServerContext* c, const v1::ListJobsRequest* req,
                                        v1::ListJobsResponse* resp) {
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto r = ctx_.jobs->List(*req);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = *std::move(r);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::CancelJob(grpc::ServerContext* c, const v1::JobRef* req,
                                         v1::Job* resp) {
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  auto j = ctx_.jobs->Cancel(req->job_id());
  if (!j.ok()) return ToGrpcStatus(j.status());
  *resp = *std::move(j);
  return grpc::Status::OK;
}

grpc::Status QuantizerService::WatchJob(grpc::ServerContext* c, const v1::JobRef* req,
                                        grpc::ServerWriter<v1::JobEvent>* writer) {
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
  uint64_t seen = 0;
  for (;;) {
    bool changed = false;
    auto j = ctx_.jobs->Wait(req->job_id(), &seen, absl::Milliseconds(200), &changed);
    if (!j.ok()) return ToGrpcStatus(j.status());
    if (c->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "watcher went away");
    if (changed) {
      v1::JobEvent ev;
      *ev.mutable_job() = *j;
      if (!writer->Write(ev)) return grpc::Status(grpc::StatusCode::CANCELLED, "watcher went away");
    }
    const v1::JobState st = j->state();
    if (st == v1::SUCCEEDED || st == v1::FAILED || st == v1::CANCELLED) return grpc::Status::OK;
    if (!ctx_.ready->load() && st == v1::QUEUED) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server is shutting down; the job stays queued");
    }
  }
}

grpc::Status QuantizerService::DownloadArtifact(grpc::ServerContext* c, const v1::ArtifactRef* req,
                                                grpc::ServerWriter<v1::ArtifactChunk>* writer) {
  if (auto s = ctx_.auth->Check(c, kRoleQuantize); !s.ok()) return ToGrpcStatus(s);
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
      result = grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      break;
    }
    off += buf.size();
  } while (off < art.size_bytes() && !c->IsCancelled());
  ::close(fd);
  return result;
}

}  // namespace fpxint::server
