// File: server/inference_service.cc
#include <chrono>

#include "absl/strings/str_cat.h"
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

}  // namespace

grpc::Status InferenceService::ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                                          inference::ServerLiveResponse* resp) {
  return ServeOpen([&] {
    resp->set_live(true);
    return absl::OkStatus();
  });
}

grpc::Status InferenceService::ServerReady(grpc::ServerContext*,
                                           const inference::ServerReadyRequest*,
                                           inference::ServerReadyResponse* resp) {
  return ServeOpen([&] {
    resp->set_ready(ctx_.ready->load());
    return absl::OkStatus();
  });
}

grpc::Status InferenceService::ModelReady(grpc::ServerContext* c,
                                          const inference::ModelReadyRequest* req,
                                          inference::ModelReadyResponse* resp) {
  return ServeAnytime(ctx_, c, kRoleInfer, [&](const Caller&) -> absl::Status {
    auto m = ctx_.repo->Get(req->name(), req->version());
    if (absl::IsNotFound(m.status())) return m.status();
    resp->set_ready(m.ok() && ctx_.ready->load());
    return absl::OkStatus();
  });
}

grpc::Status InferenceService::ServerMetadata(grpc::ServerContext*,
                                              const inference::ServerMetadataRequest*,
                                              inference::ServerMetadataResponse* resp) {
  return ServeOpen([&] {
    resp->set_name("fpxint");
    resp->set_version(ctx_.server_version);
    for (const char* e : {"binary_tensor_data", "model_repository", "statistics"}) {
      resp->add_extensions(e);
    }
    return absl::OkStatus();
  });
}

grpc::Status InferenceService::ModelMetadata(grpc::ServerContext* c,
                                             const inference::ModelMetadataRequest* req,
                                             inference::ModelMetadataResponse* resp) {
  return Serve(ctx_, c, kRoleInfer, [&](const Caller&) -> absl::Status {
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

grpc::Status InferenceService::ModelInfer(grpc::ServerContext* c,
                                          const inference::ModelInferRequest* req,
                                          inference::ModelInferResponse* resp) {
  ctx_.metrics->PendingAdd(1);
  const uint64_t t0 = SteadyNowNs();
  std::string model, version;
  uint64_t queue_ns = ~uint64_t{0};
  const grpc::Status s = Serve(ctx_, c, kRoleInfer, [&](const Caller&) {
    return Infer(c, req, resp, &model, &version, &queue_ns);
  });
  ctx_.metrics->PendingAdd(-1);
  ctx_.metrics->Inference(model, version, GrpcCodeName(s.error_code()),
                          static_cast<double>(SteadyNowNs() - t0) * 1e-9,
                          queue_ns == ~uint64_t{0} ? -1.0 : static_cast<double>(queue_ns) * 1e-9);
  return s;
}

absl::Status InferenceService::Infer(grpc::ServerContext* c,
                                     const inference::ModelInferRequest* req,
                                     inference::ModelInferResponse* resp, std::string* model,
                                     std::string* version, uint64_t* queue_out) {
  if (req->model_name().empty()) return absl::InvalidArgumentError("model_name: required");
  FPX_ASSIGN_OR_RETURN(std::shared_ptr<ServedModel> served,
                       ctx_.repo->Get(req->model_name(), req->model_version()));
  ServedModel& m = *served;
  *model = m.deployment().name();
  *version = m.deployment().version();
  const uint64_t t0 = SteadyNowNs();
  auto decoded = DecodeInferRequest(*req, m.deployment(), m.max_weight_terms(), m.max_act_terms(),
                                    ctx_.max_message_bytes);
  if (!decoded.ok()) {
    m.Record(false, 0, 0, 0, 0, 0, SteadyNowNs() - t0);
    return decoded.status();
  }
  const uint64_t t1 = SteadyNowNs();
  const int kw = decoded->weight_terms ? decoded->weight_terms : m.max_weight_terms();
  const int ka = decoded->act_terms ? decoded->act_terms : std::min(kw, m.max_act_terms());
  uint64_t queue_ns = 0;
  auto y = m.Infer(decoded->input, kw, ka, &queue_ns, absl::FromChrono(c->deadline()));
  *queue_out = queue_ns;
  const uint64_t t2 = SteadyNowNs();
  if (!y.ok()) {
    m.Record(false, 0, 0, 0, 0, 0, t2 - t0);
    return y.status();
  }
  resp->set_model_name(m.deployment().name());
  resp->set_model_version(m.deployment().version());
  resp->set_id(req->id());
  if (m.quantized()) {
    (*resp->mutable_parameters())["fpxint_terms"].set_int64_param(kw);
    if (m.max_act_terms() > 0)
      (*resp->mutable_parameters())["fpxint_act_terms"].set_int64_param(ka);
  }
  FPX_RETURN_IF_ERROR(EncodeInferResponse(*req, *y, decoded->raw, resp));
  const uint64_t t3 = SteadyNowNs();
  const uint64_t batch = decoded->input.shape.empty() ? 1 : decoded->input.shape[0];
  m.Record(true, batch, queue_ns, t1 - t0, t2 - t1 - queue_ns, t3 - t2, t3 - t0);
  return absl::OkStatus();
}

grpc::Status InferenceService::ModelStatistics(grpc::ServerContext* c,
                                               const inference::ModelStatisticsRequest* req,
                                               inference::ModelStatisticsResponse* resp) {
  return Serve(ctx_, c, kRoleInfer, [&](const Caller&) -> absl::Status {
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

grpc::Status InferenceService::RepositoryIndex(grpc::ServerContext* c,
                                               const inference::RepositoryIndexRequest* req,
                                               inference::RepositoryIndexResponse* resp) {
  return Serve(ctx_, c, kRoleInfer, [&](const Caller&) -> absl::Status {
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

grpc::Status InferenceService::RepositoryModelLoad(grpc::ServerContext* c,
                                                   const inference::RepositoryModelLoadRequest* req,
                                                   inference::RepositoryModelLoadResponse*) {
  // infer loads deployments; quantize (or admin) may also serve a bare upload.
  return Serve(ctx_, c, kRoleInfer | kRoleQuantize, [&](const Caller& caller) -> absl::Status {
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

grpc::Status InferenceService::RepositoryModelUnload(
    grpc::ServerContext* c, const inference::RepositoryModelUnloadRequest* req,
    inference::RepositoryModelUnloadResponse*) {
  return Serve(ctx_, c, kRoleInfer, [&](const Caller&) -> absl::Status {
    FPX_RETURN_IF_ERROR(ctx_.repo->Unload(req->model_name()));
    LogInfo(absl::StrCat("model '", req->model_name(), "' unloaded"));
    return absl::OkStatus();
  });
}

}  // namespace fpxint::server
