// File: server/quantizer_service.cc
#include <fcntl.h>
#include <unistd.h>

#include <regex>

#include "absl/strings/str_cat.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "server/log.h"
#include "server/services.h"
#include "server/status_util.h"

namespace fpxint::server {
namespace {

constexpr int kMaxSignatureRank = 8;

absl::Status CheckName(const std::string& name, absl::string_view field) {
  static const std::regex kName("[A-Za-z0-9][A-Za-z0-9._-]{0,127}");
  if (!std::regex_match(name, kName)) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": '", name.substr(0, 64),
        "'; accepted: 1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"));
  }
  return absl::OkStatus();
}

absl::Status CheckHeader(const v1::UploadHeader& h, const ServiceContext& ctx, unsigned roles) {
  FPX_RETURN_IF_ERROR(CheckName(h.name(), "header.name"));
  switch (h.format()) {
    case v1::SAFETENSORS:
      break;
    case v1::TORCHSCRIPT:
      if (ctx.torchscript_uploads == TorchScriptUploads::kNone ||
          (ctx.torchscript_uploads == TorchScriptUploads::kAdmin && !(roles & kRoleAdmin))) {
        return absl::PermissionDeniedError(
            "header.format: this server refuses TORCHSCRIPT uploads from this caller (a "
            "TorchScript archive can run code when loaded; --allow-torchscript-uploads)");
      }
      break;
    case v1::TORCH_STATE_DICT:
      return absl::InvalidArgumentError(
          "header.format: TORCH_STATE_DICT is not supported by this server yet; accepted: "
          "TORCHSCRIPT, SAFETENSORS");
    default:
      return absl::InvalidArgumentError(
          "header.format: required; accepted: TORCHSCRIPT, SAFETENSORS");
  }
  if (!IsSha256Hex(h.sha256())) {
    return absl::InvalidArgumentError(
        "header.sha256: required; 64 lower-case hex digits of the file's SHA-256");
  }
  if (h.size_bytes() > ctx.max_upload_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("header.size_bytes: ", h.size_bytes(), " exceeds the server's limit of ",
                     ctx.max_upload_bytes, " bytes (--max-upload-bytes)"));
  }
  if (h.inputs_size() > 1) {
    return absl::InvalidArgumentError("header.inputs: at most one input tensor is supported");
  }
  for (const v1::TensorSignature& s : h.inputs()) {
    if (s.datatype() != "FP32" && s.datatype() != "INT64") {
      return absl::InvalidArgumentError(
          absl::StrCat("header.inputs[0].datatype: '", s.datatype(), "'; accepted: FP32, INT64"));
    }
    if (s.shape_size() == 0 || s.shape_size() > kMaxSignatureRank) {
      return absl::InvalidArgumentError("header.inputs[0].shape: rank 1..8");
    }
    for (int64_t d : s.shape()) {
      if (d < -1 || d == 0 || d > (int64_t{1} << 24)) {
        return absl::InvalidArgumentError(
            "header.inputs[0].shape: dimensions are -1 (variable) or 1..16777216");
      }
    }
    if (!s.name().empty()) FPX_RETURN_IF_ERROR(CheckName(s.name(), "header.inputs[0].name"));
  }
  return absl::OkStatus();
}

// The uploaded bytes must be what the header says they are.
absl::Status CheckContent(const std::string& path, v1::ModelFormat format) {
  if (format == v1::SAFETENSORS) {
    auto r = core::SafetensorsReader::Open(path);
    if (!r.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("data: not a valid safetensors file: ", r.status().message()));
    }
    return absl::OkStatus();
  }
  char magic[4] = {0};
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  const bool ok = fd >= 0 && ::read(fd, magic, 4) == 4 && magic[0] == 'P' && magic[1] == 'K' &&
                  magic[2] == 3 && magic[3] == 4;
  if (fd >= 0) ::close(fd);
  if (!ok) {
    return absl::InvalidArgumentError(
        "data: not a TorchScript archive (a zip file written by torch.jit.save)");
  }
  return absl::OkStatus();
}

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
  v1::UploadChunk chunk;
  if (!reader->Read(&chunk)) {
    return ToGrpcStatus(
        absl::InvalidArgumentError("the upload stream was empty; the first "
                                   "message must carry `header`"));
  }
  if (!chunk.has_header()) {
    return ToGrpcStatus(absl::InvalidArgumentError("the first message must carry `header`"));
  }
  const v1::UploadHeader header = chunk.header();
  if (auto s = CheckHeader(header, ctx_, roles); !s.ok()) return ToGrpcStatus(s);
  auto writer = ctx_.store->NewWriter(ctx_.max_upload_bytes);
  if (!writer.ok()) return ToGrpcStatus(writer.status());
  int index = 1;
  while (reader->Read(&chunk)) {
    if (chunk.has_header()) {
      return ToGrpcStatus(absl::InvalidArgumentError(
          absl::StrCat("message ", index, ": `header` is allowed in the first message only")));
    }
    if (auto s = (*writer)->Append(chunk.data()); !s.ok()) return ToGrpcStatus(s);
    ctx_.metrics->BytesUploaded(chunk.data().size());
    ++index;
  }
  if (c->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled");
  const uint64_t got = (*writer)->bytes_written();
  if (header.size_bytes() != 0 && got != header.size_bytes()) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("data: received ", got, " bytes, header.size_bytes says ", header.size_bytes(),
                     " (truncated upload?); nothing was stored")));
  }
  auto blob = (*writer)->Commit(header.sha256());
  if (!blob.ok()) return ToGrpcStatus(blob.status());
  const std::string path = ctx_.store->PathOf(blob->sha256);
  if (auto s = CheckContent(path, header.format()); !s.ok()) {
    if (!blob->deduplicated) DropIfUnreferenced(ctx_, blob->sha256);
    return ToGrpcStatus(s);
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
