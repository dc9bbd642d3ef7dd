// File: server/inference_service.cc
#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "core/status_macros.h"
#include "proto/status_names.h"
#include "server/log.h"
#include "server/oip_codec.h"
#include "server/services.h"
#include "server/status_util.h"

namespace fpxint::server {
namespace {

void FillDuration(const DurationStat& d, inference::StatisticDuration* out) {
  out->set_count(d.count);
  out->set_ns(d.ns);
}

// What every ModelInfer answer carries besides its output: the model, the request's id, and for
// quantized models the precision it ran at.
void FillResponseHeader(const ServedModel& m, const inference::ModelInferRequest& req, int kw,
                        int ka, inference::ModelInferResponse* resp) {
  resp->set_model_name(m.deployment().name());
  resp->set_model_version(m.deployment().version());
  resp->set_id(req.id());
  if (m.quantized()) {
    (*resp->mutable_parameters())["fpxint_terms"].set_int64_param(kw);
    if (m.max_act_terms() > 0) (*resp->mutable_parameters())["fpxint_act_terms"].set_int64_param(ka);
  }
}

}  // namespace

grpc::ServerUnaryReactor* InferenceService::ServerLive(grpc::CallbackServerContext* c,
                                                       const inference::ServerLiveRequest*,
                                                       inference::ServerLiveResponse* resp) {
  return ServeInline<Gate::kOpen>(ctx_, c, 0, [&](const Caller&) {
    resp->set_live(true);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* InferenceService::ServerReady(grpc::CallbackServerContext* c,
                                                        const inference::ServerReadyRequest*,
                                                        inference::ServerReadyResponse* resp) {
  return ServeInline<Gate::kOpen>(ctx_, c, 0, [&](const Caller&) {
    resp->set_ready(ctx_.ready->load());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* InferenceService::ModelReady(grpc::CallbackServerContext* c,
                                                       const inference::ModelReadyRequest* req,
                                                       inference::ModelReadyResponse* resp) {
  // Answers while the server starts or stops: "not ready" then, rather than UNAVAILABLE.
  return ServeInline<Gate::kToken>(ctx_, c, kRoleInfer, [&](const Caller&) -> absl::Status {
    auto m = ctx_.repo->Get(req->name(), req->version());
    if (absl::IsNotFound(m.status())) return m.status();
    resp->set_ready(m.ok() && ctx_.ready->load());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* InferenceService::ServerMetadata(
    grpc::CallbackServerContext* c, const inference::ServerMetadataRequest*,
    inference::ServerMetadataResponse* resp) {
  return ServeInline<Gate::kOpen>(ctx_, c, 0, [&](const Caller&) {
    resp->set_name("fpxint");
    resp->set_version(ctx_.server_version);
    for (const char* e : {"binary_tensor_data", "model_repository", "statistics"}) {
      resp->add_extensions(e);
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* InferenceService::ModelMetadata(
    grpc::CallbackServerContext* c, const inference::ModelMetadataRequest* req,
    inference::ModelMetadataResponse* resp) {
  // Queued: the versions come from the journal.
  return ServeQueued(ctx_, c, kRoleInfer, [this, req, resp](const Caller&) -> absl::Status {
    FPX_ASSIGN_OR_RETURN(std::shared_ptr<ServedModel> m,
                         ctx_.repo->Get(req->name(), req->version()));
    const v1::Deployment& d = m->deployment();
    resp->set_name(d.name());
    for (const std::string& v : ctx_.repo->Versions(d.name())) resp->add_versions(v);
    resp->set_platform(d.platform());
    const v1::TensorSignature sig = InputSignature(d);
    auto* in = resp->add_inputs();
    in->set_name(sig.name());
    in->set_datatype(sig.datatype());
    for (int64_t x : sig.shape()) in->add_shape(x);
    auto* out = resp->add_outputs();
    out->set_name(kOutputName);
    out->set_datatype("FP32");
    out->add_shape(-1);
    return absl::OkStatus();
  });
}

// ModelInfer: admission, model lookup and decoding run here, on gRPC's thread (they only read
// the request); the served model runs the call on the instance that takes it, which then
// encodes the response into place and finishes the call. The request and response stay valid
// until Finish, so the decoded input may borrow the request's bytes.
grpc::ServerUnaryReactor* InferenceService::ModelInfer(grpc::CallbackServerContext* c,
                                                       const inference::ModelInferRequest* req,
                                                       inference::ModelInferResponse* resp) {
  grpc::ServerUnaryReactor* r = c->DefaultReactor();
  ctx_.metrics->PendingAdd(1);
  const uint64_t t0 = SteadyNowNs();
  absl::Status s = ctx_.Admit(c, kRoleInfer);
  if (s.ok() && req->model_name().empty()) {
    s = absl::InvalidArgumentError("model_name: required");
  }
  absl::StatusOr<std::shared_ptr<ServedModel>> served =
      s.ok() ? ctx_.repo->Get(req->model_name(), req->model_version()) : s;
  if (!served.ok()) {
    FinishInfer(r, nullptr, served.status(), t0, -1);
    return r;
  }
  // The repository keeps the model until its destructor has ended every call it holds, so the
  // call may keep a plain pointer.
  ServedModel* m = served->get();
  auto decoded = DecodeInferRequest(*req, m->deployment(), m->max_weight_terms(),
                                    m->max_act_terms(), ctx_.max_message_bytes);
  if (!decoded.ok()) {
    FinishInfer(r, m, decoded.status(), t0, -1);
    return r;
  }
  const uint64_t t1 = SteadyNowNs();
  const int kw = decoded->weight_terms ? decoded->weight_terms : m->max_weight_terms();
  const int ka = decoded->act_terms ? decoded->act_terms : std::min(kw, m->max_act_terms());
  if (m->batching()) {
    SubmitBatched(c, r, req, resp, m, kw, ka, t0, t1, *std::move(decoded));
    return r;
  }
  m->Submit(
      kw, ka, absl::FromChrono(c->deadline()),
      [this, c, r, req, resp, m, kw, ka, t0, t1, in = *std::move(decoded)](
          absl::StatusOr<model::Model*> net, uint64_t queue_ns) mutable {
        if (!net.ok()) {
          FinishInfer(r, m, net.status(), t0, static_cast<int64_t>(queue_ns));
          return;
        }
        if (c->IsCancelled()) {
          FinishInfer(r, m, absl::CancelledError("the client went away before the call ran"), t0,
                      static_cast<int64_t>(queue_ns));
          return;
        }
        FillResponseHeader(*m, *req, kw, ka, resp);
        uint64_t t2 = 0;
        const absl::Status st = (*net)->Forward(
            in.input(), [&](absl::Span<const int64_t> shape, absl::Span<const float> values) {
              t2 = SteadyNowNs();
              return EncodeInferResponse(shape, values, in.raw, resp);
            });
        if (st.ok()) {
          const uint64_t t3 = SteadyNowNs();
          m->Record(true, static_cast<uint64_t>(in.batch()), queue_ns, t1 - t0,
                    t2 - t1 - std::min(queue_ns, t2 - t1), t3 - t2, t3 - t0);
        }
        FinishInfer(r, m, st, t0, static_cast<int64_t>(queue_ns));
      });
  return r;
}

// A model with dynamic batching: the call is refused up front when its first dimension exceeds
// max_batch_size; otherwise it runs in a pass with others, and its share of the output is
// encoded into its own response on the instance's thread.
void InferenceService::SubmitBatched(grpc::CallbackServerContext* c, grpc::ServerUnaryReactor* r,
                                     const inference::ModelInferRequest* req,
                                     inference::ModelInferResponse* resp, ServedModel* m, int kw,
                                     int ka, uint64_t t0, uint64_t t1, DecodedRequest in) {
  const int64_t max = m->deployment().batching().max_batch_size();
  const model::HostTensorRef x = in.input();
  if (x.shape.empty() || x.shape[0] < 1 || x.shape[0] > max) {
    FinishInfer(r, m,
                absl::InvalidArgumentError(absl::StrCat(
                    "inputs[0].shape: [", absl::StrJoin(x.shape, ","), "]; model '",
                    m->deployment().name(), "' batches requests along the first dimension and "
                    "takes 1..", max, " rows in one request (its max_batch_size)")),
                t0, -1);
    return;
  }
  auto owned = std::make_shared<DecodedRequest>(std::move(in));
  m->SubmitBatched(
      kw, ka, absl::FromChrono(c->deadline()), owned->input(),
      [this, c, r, req, resp, m, kw, ka, t0, t1, owned](const absl::Status& s,
                                                        const ServedModel::Share& share) {
        const int64_t queue = static_cast<int64_t>(share.queue_ns);
        if (!s.ok()) {
          FinishInfer(r, m, s, t0, queue);
          return;
        }
        if (share.first) {  // once per pass, whatever becomes of this call
          ctx_.metrics->InferenceBatch(m->deployment().name(), m->deployment().version(),
                                       share.pass_rows, share.pass_calls);
        }
        if (c->IsCancelled()) {
          FinishInfer(r, m, absl::CancelledError("the client went away before its pass ran"), t0,
                      queue);
          return;
        }
        const uint64_t t2 = SteadyNowNs();
        FillResponseHeader(*m, *req, kw, ka, resp);
        (*resp->mutable_parameters())["fpxint_batch_rows"].set_int64_param(share.pass_rows);
        const absl::Status st = EncodeInferResponse(share.shape, share.values, owned->raw, resp);
        if (st.ok()) {
          const uint64_t t3 = SteadyNowNs();
          m->Record(true, static_cast<uint64_t>(owned->batch()), share.queue_ns, t1 - t0,
                    t2 - t1 - std::min(share.queue_ns, t2 - t1), t3 - t2, t3 - t0,
                    share.first ? 1 : 0);
        }
        FinishInfer(r, m, st, t0, queue);
      });
}

void InferenceService::FinishInfer(grpc::ServerUnaryReactor* r, ServedModel* m,
                                   const absl::Status& s, uint64_t t0, int64_t queue_ns) {
  const uint64_t total = SteadyNowNs() - t0;
  if (m != nullptr && !s.ok()) m->Record(false, 0, 0, 0, 0, 0, total);
  const grpc::Status g = ToGrpcStatus(s);
  ctx_.metrics->PendingAdd(-1);
  ctx_.metrics->Inference(m ? m->deployment().name() : "", m ? m->deployment().version() : "",
                          GrpcCodeName(g.error_code()), static_cast<double>(total) * 1e-9,
                          queue_ns < 0 ? -1.0 : static_cast<double>(queue_ns) * 1e-9);
  r->Finish(g);
}

grpc::ServerUnaryReactor* InferenceService::ModelStatistics(
    grpc::CallbackServerContext* c, const inference::ModelStatisticsRequest* req,
    inference::ModelStatisticsResponse* resp) {
  return ServeInline(ctx_, c, kRoleInfer, [&](const Caller&) -> absl::Status {
    bool any = false;
    for (const auto& m : ctx_.repo->Loaded()) {
      const v1::Deployment& d = m->deployment();
      if (!req->name().empty() && d.name() != req->name()) continue;
      if (!req->version().empty() && d.version() != req->version()) continue;
      any = true;
      const ModelStats st = m->stats();
      auto* out = resp->add_model_stats();
      out->set_name(d.name());
      out->set_version(d.version());
      out->set_last_inference(st.last_inference_ms);
      out->set_inference_count(st.inference_count);
      out->set_execution_count(st.execution_count);
      auto* is = out->mutable_inference_stats();
      FillDuration(st.success, is->mutable_success());
      FillDuration(st.fail, is->mutable_fail());
      FillDuration(st.queue, is->mutable_queue());
      FillDuration(st.compute_input, is->mutable_compute_input());
      FillDuration(st.compute_infer, is->mutable_compute_infer());
      FillDuration(st.compute_output, is->mutable_compute_output());
    }
    if (!any && !req->name().empty()) {
      return absl::NotFoundError(absl::StrCat(
          "name: no loaded model '", req->name(), "'",
          req->version().empty() ? "" : absl::StrCat(" version '", req->version(), "'")));
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* InferenceService::RepositoryIndex(
    grpc::CallbackServerContext* c, const inference::RepositoryIndexRequest* req,
    inference::RepositoryIndexResponse* resp) {
  return ServeQueued(ctx_, c, kRoleInfer, [this, req, resp](const Caller&) -> absl::Status {
    for (const auto& e : ctx_.repo->Index()) {
      if (req->ready() && e.state != "READY") continue;
      auto* m = resp->add_models();
      m->set_name(e.name);
      m->set_version(e.version);
      m->set_state(e.state);
      m->set_reason(e.reason);
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* InferenceService::RepositoryModelLoad(
    grpc::CallbackServerContext* c, const inference::RepositoryModelLoadRequest* req,
    inference::RepositoryModelLoadResponse*) {
  // infer loads deployments; quantize (or admin) may also serve a bare upload.
  return ServeQueued(ctx_, c, kRoleInfer | kRoleQuantize,
                     [this, req](const Caller& caller) -> absl::Status {
    if (req->model_name().empty()) return absl::InvalidArgumentError("model_name: required");
    for (const auto& [key, value] : req->parameters()) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameters: '", key,
                       "' is not supported (upload models with fpxint.v1.Quantizer/"
                       "UploadModel; no load parameters are accepted)"));
    }
    FPX_RETURN_IF_ERROR(
        ctx_.repo->Load(req->model_name(),
                        /*may_load_deployments=*/(caller.roles & (kRoleInfer | kRoleAdmin)) != 0,
                        /*may_deploy_uploads=*/(caller.roles & (kRoleQuantize | kRoleAdmin)) != 0));
    LogInfo(absl::StrCat("model '", req->model_name(), "' loaded for inference"));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* InferenceService::RepositoryModelUnload(
    grpc::CallbackServerContext* c, const inference::RepositoryModelUnloadRequest* req,
    inference::RepositoryModelUnloadResponse*) {
  return ServeQueued(ctx_, c, kRoleInfer, [this, req](const Caller&) -> absl::Status {
    FPX_RETURN_IF_ERROR(ctx_.repo->Unload(req->model_name()));
    LogInfo(absl::StrCat("model '", req->model_name(), "' unloaded"));
    return absl::OkStatus();
  });
}

}  // namespace fpxint::server
