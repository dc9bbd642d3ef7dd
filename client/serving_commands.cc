// `fpxint models`, `fpxint infer` and `fpxint health`: the serving side, over the KServe v2 /
// Open Inference Protocol (inference.GRPCInferenceService) and grpc.health.v1.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/commands.h"
#include "client/exit_codes.h"
#include "client/progress.h"
#include "client/rpc.h"
#include "client/tensor_io.h"
#include "fpxint/v1/quantizer.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "inference/grpc_service.grpc.pb.h"

namespace fpxint::client {
namespace {

using inference::GRPCInferenceService;

std::string ShapeString(const google::protobuf::RepeatedField<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// ---- models ----------------------------------------------------------------------------------

void PrintDeployment(const v1::DeploymentStatus& d) {
  std::printf("deployment: %s version %s  %s%s%s\n", d.name().c_str(), d.version().c_str(),
              d.state().c_str(), d.reason().empty() ? "" : ": ", d.reason().c_str());
  if (!d.job_id().empty()) {
    const v1::JobSpec& s = d.spec();
    std::printf("  made by job %s  (%s, W%u x%u%s)\n", d.job_id().c_str(),
                absl::AsciiStrToLower(v1::Granularity_Name(s.granularity())).c_str(),
                s.weight_bits(), s.weight_terms(),
                s.act_terms() ? absl::StrCat(" A", s.act_bits(), " x", s.act_terms()).c_str() : "");
  }
  std::printf("  runs       %s\n", d.composition().c_str());
  if (!d.artifact_sha256().empty()) {
    std::printf("  artifact   sha256 %s (the job's packed_safetensors)\n", d.artifact_sha256().c_str());
  }
  if (!d.served_terms_sha256().empty()) {
    std::printf("  terms      sha256 %s (of the packed terms the loaded network runs)\n",
                d.served_terms_sha256().c_str());
  }
  if (d.fp32_weight_bytes() > 0) {
    std::printf("  weights    %s resident per instance for %s in FP32 (%d layers packed)\n",
                HumanBytes(d.resident_weight_bytes()).c_str(),
                HumanBytes(d.fp32_weight_bytes()).c_str(), d.packed_layers());
  }
  if (d.spec().act_terms() > 0 && d.packed_layers() > 0) {
    const int other = d.packed_layers() - d.folded_layers() - d.integer_layers();
    std::printf("  W×A        %d layers folded (all term products as one u8 x s8 product), %d on "
                "separate integer term products, %d on fp32 products of dequantized terms\n",
                d.folded_layers(), d.integer_layers(), other);
  }
  if (d.packed_layers() > 0) {
    std::printf("  fused      layers with the following ReLU or hardswish in their epilogue: %d; "
                "elementwise ops after packed layers run with their layer: %d\n",
                d.fused_post_ops(), d.fused_tail_steps());
  }
  if (d.batching().max_batch_size() > 0) {
    const v1::DynamicBatching& b = d.batching();
    std::printf("  batching   up to %u rows per pass%s, waiting at most %llu µs for others\n",
                b.max_batch_size(),
                b.preferred_batch_size_size() > 0
                    ? absl::StrCat(", preferred ", absl::StrJoin(b.preferred_batch_size(), ","))
                          .c_str()
                    : "",
                static_cast<unsigned long long>(b.max_queue_delay_microseconds()));
  } else {
    std::printf("  batching   off (each request runs alone)\n");
  }
  if (d.layer_terms_size() > 0) {
    const v1::TermAllocation& a = d.allocation();
    std::printf("  terms      per layer, error budget %g (probe error %.4g, %s of packed terms):\n",
                a.target_rel_error(), a.measured_rel_error(), HumanBytes(a.weight_bytes()).c_str());
    for (const v1::LayerTerms& t : d.layer_terms()) {
      std::printf("    K=%-2u %s\n", t.weight_terms(), t.name().c_str());
    }
  }
}

struct ModelsFlags {
  std::string name;
  std::string version;
};

int RunModels(const ModelsFlags& f, const GlobalOptions& g, const std::string& verb) {
  const std::string cmd = "models " + verb;
  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto q = v1::Quantizer::NewStub((*conn)->channel());
  auto oip = GRPCInferenceService::NewStub((*conn)->channel());
  grpc::ClientContext ctx;
  (*conn)->Prepare(&ctx);
  if (verb == "list") {
    v1::ListModelsResponse models;
    grpc::Status s = q->ListModels(&ctx, v1::ListModelsRequest(), &models);
    if (!s.ok()) return ReportRpcError(cmd, s, g);
    grpc::ClientContext ctx2;
    (*conn)->Prepare(&ctx2);
    inference::RepositoryIndexResponse index;
    s = oip->RepositoryIndex(&ctx2, inference::RepositoryIndexRequest(), &index);
    if (!s.ok()) return ReportRpcError(cmd, s, g);
    if (g.json) {
      nlohmann::json up = nlohmann::json::array(), served = nlohmann::json::array();
      for (const v1::Model& m : models.models()) up.push_back(ProtoToJson(m));
      for (const auto& m : index.models()) served.push_back(ProtoToJson(m));
      PrintJson({{"uploaded", up}, {"served", served}});
    } else if (!g.quiet) {
      std::printf("uploaded models (quantize these):\n");
      if (models.models().empty()) std::printf("  (none; fpxint upload FILE --name NAME)\n");
      for (const v1::Model& m : models.models()) {
        std::printf("  %-28s %-18s %10s  sha256 %s\n", m.name().c_str(),
                    absl::AsciiStrToLower(v1::ModelFormat_Name(m.format())).c_str(),
                    HumanBytes(m.size_bytes()).c_str(), m.sha256().substr(0, 16).c_str());
      }
      std::printf("served models (infer with these):\n");
      if (index.models().empty()) std::printf("  (none; quantize with --deploy-as NAME)\n");
      for (const auto& m : index.models()) {
        std::printf("  %-28s v%-6s %-10s %s\n", m.name().c_str(), m.version().c_str(),
                    m.state().c_str(), m.reason().c_str());
      }
    }
    return kExitOk;
  }
  if (verb == "get") {
    v1::ModelRef ref;
    ref.set_name(f.name);
    v1::Model m;
    grpc::Status s = q->GetModel(&ctx, ref, &m);
    const bool uploaded = s.ok();
    if (!s.ok() && s.error_code() != grpc::StatusCode::NOT_FOUND) return ReportRpcError(cmd, s, g);
    grpc::ClientContext ctx2;
    (*conn)->Prepare(&ctx2);
    inference::ModelMetadataRequest mreq;
    mreq.set_name(f.name);
    mreq.set_version(f.version);
    inference::ModelMetadataResponse md;
    grpc::Status s2 = oip->ModelMetadata(&ctx2, mreq, &md);
    const bool served = s2.ok();
    if (!s2.ok() && s2.error_code() != grpc::StatusCode::NOT_FOUND &&
        s2.error_code() != grpc::StatusCode::FAILED_PRECONDITION) {
      return ReportRpcError(cmd, s2, g);
    }
    grpc::ClientContext ctx3;
    (*conn)->Prepare(&ctx3);
    v1::DeploymentRef dref;
    dref.set_name(f.name);
    dref.set_version(f.version);
    v1::DeploymentStatus dep;
    grpc::Status s3 = q->GetDeployment(&ctx3, dref, &dep);
    const bool deployed = s3.ok();
    if (!s3.ok() && s3.error_code() != grpc::StatusCode::NOT_FOUND &&
        s3.error_code() != grpc::StatusCode::PERMISSION_DENIED) {
      return ReportRpcError(cmd, s3, g);
    }
    if (!uploaded && !served && !deployed) {
      return ReportError(cmd, absl::StrCat("no uploaded or served model named '", f.name, "'"),
                         kExitBadInput, g);
    }
    if (g.json) {
      PrintJson({{"uploaded", uploaded ? ProtoToJson(m) : nlohmann::json(nullptr)},
                 {"served", served ? ProtoToJson(md) : nlohmann::json(nullptr)},
                 {"deployment", deployed ? ProtoToJson(dep) : nlohmann::json(nullptr)}});
    } else if (!g.quiet) {
      if (uploaded) {
        std::printf("uploaded: %s  %s  %s  sha256 %s\n", m.name().c_str(),
                    absl::AsciiStrToLower(v1::ModelFormat_Name(m.format())).c_str(),
                    HumanBytes(m.size_bytes()).c_str(), m.sha256().c_str());
        if (m.tensor_count() > 0) {
          std::vector<std::string> dt;
          for (const auto& [dtype, n] : m.dtypes()) dt.push_back(absl::StrCat(dtype, " ", n));
          std::sort(dt.begin(), dt.end());
          std::printf("  %llu tensors, %llu parameters (%s)\n",
                      static_cast<unsigned long long>(m.tensor_count()),
                      static_cast<unsigned long long>(m.parameter_count()),
                      absl::StrJoin(dt, ", ").c_str());
        }
        if (m.files_size() > 0) {
          int shards = 0;
          for (const v1::ModelFile& mf : m.files()) shards += mf.role() == "shard";
          std::printf("  %d files, %d shard%s:\n", m.files_size(), shards, shards == 1 ? "" : "s");
          for (const v1::ModelFile& mf : m.files()) {
            std::printf("    %-7s %-44s %10s%s\n", mf.role().c_str(), mf.path().c_str(),
                        HumanBytes(mf.size_bytes()).c_str(),
                        mf.role() == "shard"
                            ? absl::StrCat("  ", mf.tensor_count(), " tensors").c_str()
                            : "");
          }
        }
      }
      if (served) {
        std::printf("served: %s  versions %s  platform %s\n", md.name().c_str(),
                    absl::StrJoin(md.versions(), ",").c_str(), md.platform().c_str());
        for (const auto& t : md.inputs()) {
          std::printf("  input  %-12s %-6s %s\n", t.name().c_str(), t.datatype().c_str(),
                      ShapeString(t.shape()).c_str());
        }
        for (const auto& t : md.outputs()) {
          std::printf("  output %-12s %-6s %s\n", t.name().c_str(), t.datatype().c_str(),
                      ShapeString(t.shape()).c_str());
        }
      }
      if (deployed) PrintDeployment(dep);
    }
    return kExitOk;
  }
  grpc::Status s;
  if (verb == "load") {
    inference::RepositoryModelLoadRequest r;
    r.set_model_name(f.name);
    inference::RepositoryModelLoadResponse resp;
    s = oip->RepositoryModelLoad(&ctx, r, &resp);
  } else if (verb == "unload") {
    inference::RepositoryModelUnloadRequest r;
    r.set_model_name(f.name);
    inference::RepositoryModelUnloadResponse resp;
    s = oip->RepositoryModelUnload(&ctx, r, &resp);
  } else {  // delete
    v1::ModelRef r;
    r.set_name(f.name);
    v1::DeleteModelResponse resp;
    s = q->DeleteModel(&ctx, r, &resp);
  }
  if (!s.ok()) return ReportRpcError(cmd, s, g);
  const char* done = verb == "load" ? "loaded" : verb == "unload" ? "unloaded" : "deleted";
  if (g.json) {
    PrintJson({{"model", f.name}, {"result", done}});
  } else if (!g.quiet) {
    std::printf("%s %s\n", done, f.name.c_str());
  }
  return kExitOk;
}

// ---- infer -----------------------------------------------------------------------------------

struct InferFlags {
  std::string model;
  std::string version;
  std::vector<std::string> inputs;
  std::string shape;
  std::string datatype;
  std::string input_name;
  int64_t terms = 0;
  int64_t act_terms = 0;
  std::string output;
  int repeat = 1;
  int max_values = 16;
};

absl::StatusOr<std::vector<int64_t>> ParseShape(const std::string& s) {
  std::vector<int64_t> out;
  for (absl::string_view d : absl::StrSplit(s, ',', absl::SkipWhitespace())) {
    int64_t v;
    if (!absl::SimpleAtoi(d, &v) || v < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--shape '", s, "': expected D1,D2,... (non-negative)"));
    }
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError("--shape: empty");
  return out;
}

// Reads one input file according to its extension, filling the name/datatype the model expects
// when the file does not say.
absl::StatusOr<HostTensor> LoadInput(const std::string& path, const InferFlags& f,
                                     const inference::ModelMetadataResponse::TensorMetadata* meta) {
  auto data = ReadWholeFile(path);
  if (!data.ok()) return data.status();
  const std::string want_dt = !f.datatype.empty() ? f.datatype : meta ? meta->datatype() : "FP32";
  absl::StatusOr<HostTensor> t;
  if (absl::EndsWithIgnoreCase(path, ".npy")) {
    t = ParseNpy(*data);
  } else if (absl::EndsWithIgnoreCase(path, ".json")) {
    t = ParseTensorJson(*data, want_dt);
  } else {
    if (f.shape.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", path, "' is read as raw little-endian ", want_dt,
                       " bytes; give --shape D1,D2,... (or use a .npy or .json file)"));
    }
    t = HostTensor{"", want_dt, {}, std::move(*data)};
  }
  if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", t.status().message()));
  if (!f.shape.empty()) {
    auto shape = ParseShape(f.shape);
    if (!shape.ok()) return shape.status();
    auto n = ElementCount(*shape);
    if (!n.ok()) return n.status();
    if (static_cast<size_t>(*n) * DatatypeSize(t->datatype) != t->bytes.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--shape ", f.shape, " needs ", static_cast<size_t>(*n) * DatatypeSize(t->datatype),
          " bytes of ", t->datatype, "; '", path, "' has ", t->bytes.size()));
    }
    t->shape = *shape;
  }
  if (!f.input_name.empty()) t->name = f.input_name;
  if (t->name.empty() && meta != nullptr) t->name = meta->name();
  if (t->name.empty()) t->name = "input__0";
  return t;
}

// Index of the largest value along the last axis, per row (the predicted class or token).
std::vector<int64_t> ArgmaxLastAxis(const nlohmann::json& values, int64_t last) {
  std::vector<int64_t> out;
  if (last <= 0) return out;
  for (size_t row = 0; row + last <= values.size(); row += last) {
    size_t best = row;
    for (size_t i = row + 1; i < row + last; ++i) {
      if (values[i].get<double>() > values[best].get<double>()) best = i;
    }
    out.push_back(static_cast<int64_t>(best - row));
  }
  return out;
}

int RunInfer(const InferFlags& f, const GlobalOptions& g) {
  const std::string cmd = "infer";
  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto oip = GRPCInferenceService::NewStub((*conn)->channel());
  inference::ModelMetadataResponse md;
  {
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    inference::ModelMetadataRequest r;
    r.set_name(f.model);
    r.set_version(f.version);
    grpc::Status s = oip->ModelMetadata(&ctx, r, &md);
    if (!s.ok()) return ReportRpcError(cmd, s, g);
  }
  if (f.inputs.size() > static_cast<size_t>(std::max(1, md.inputs_size()))) {
    return ReportError(cmd, absl::StrCat("model '", f.model, "' takes ", md.inputs_size(),
                                         " input(s); got ", f.inputs.size()),
                       kExitUsage, g);
  }
  for (const std::string& path : f.inputs) {
    if (f.shape.empty() && !absl::EndsWithIgnoreCase(path, ".npy") &&
        !absl::EndsWithIgnoreCase(path, ".json")) {
      return ReportError(cmd, absl::StrCat("'", path, "' is read as raw little-endian bytes; give "
                                           "--shape D1,D2,... (or use a .npy or .json file)"),
                         kExitUsage, g);
    }
  }
  inference::ModelInferRequest req;
  req.set_model_name(f.model);
  req.set_model_version(f.version);
  for (size_t i = 0; i < f.inputs.size(); ++i) {
    const auto* meta = static_cast<int>(i) < md.inputs_size() ? &md.inputs(static_cast<int>(i)) : nullptr;
    auto t = LoadInput(f.inputs[i], f, meta);
    if (!t.ok()) return ReportError(cmd, std::string(t.status().message()), kExitBadInput, g);
    auto* in = req.add_inputs();
    in->set_name(t->name);
    in->set_datatype(t->datatype);
    for (int64_t d : t->shape) in->add_shape(d);
    req.add_raw_input_contents(std::move(t->bytes));
  }
  if (f.terms > 0) (*req.mutable_parameters())["fpxint_terms"].set_int64_param(f.terms);
  if (f.act_terms > 0) (*req.mutable_parameters())["fpxint_act_terms"].set_int64_param(f.act_terms);
  inference::ModelInferResponse resp;
  std::vector<double> ms;
  for (int r = 0; r < f.repeat; ++r) {
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    const auto t0 = std::chrono::steady_clock::now();
    grpc::Status s = oip->ModelInfer(&ctx, req, &resp);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (!s.ok()) return ReportRpcError(cmd, s, g);
  }
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double v : ms) sum += v;
  const nlohmann::json latency = {{"mean", sum / ms.size()},
                                  {"p50", sorted[sorted.size() / 2]},
                                  {"min", sorted.front()},
                                  {"max", sorted.back()},
                                  {"runs", ms.size()}};
  // Outputs as host tensors (raw contents, or the typed fields when the server used those).
  std::vector<HostTensor> outs;
  for (int i = 0; i < resp.outputs_size(); ++i) {
    const auto& o = resp.outputs(i);
    HostTensor t{o.name(), o.datatype(), {o.shape().begin(), o.shape().end()}, ""};
    if (i < resp.raw_output_contents_size()) {
      t.bytes = resp.raw_output_contents(i);
    } else if (o.contents().fp32_contents_size() > 0) {
      t.bytes.assign(reinterpret_cast<const char*>(o.contents().fp32_contents().data()),
                     o.contents().fp32_contents_size() * sizeof(float));
    }
    outs.push_back(std::move(t));
  }
  if (!f.output.empty()) {
    absl::Status ws;
    if (absl::EndsWithIgnoreCase(f.output, ".npy")) {
      if (outs.empty()) return ReportError(cmd, "the model returned no outputs", kExitIoError, g);
      auto npy = EncodeNpy(outs[0]);
      ws = npy.ok() ? WriteWholeFile(f.output, *npy) : npy.status();
    } else {
      nlohmann::json all = nlohmann::json::array();
      for (const HostTensor& t : outs) {
        auto v = TensorValues(t);
        if (!v.ok()) return ReportError(cmd, std::string(v.status().message()), kExitIoError, g);
        all.push_back({{"name", t.name}, {"datatype", t.datatype}, {"shape", t.shape}, {"data", *v}});
      }
      ws = WriteWholeFile(f.output, nlohmann::json{{"outputs", all}}.dump() + "\n");
    }
    if (!ws.ok()) return ReportError(cmd, std::string(ws.message()), kExitIoError, g);
  }
  nlohmann::json jouts = nlohmann::json::array();
  for (const HostTensor& t : outs) {
    auto v = TensorValues(t);
    if (!v.ok()) return ReportError(cmd, std::string(v.status().message()), kExitIoError, g);
    const int64_t last = t.shape.empty() ? 0 : t.shape.back();
    if (g.json) {
      nlohmann::json o = {{"name", t.name}, {"datatype", t.datatype}, {"shape", t.shape}};
      if (f.output.empty()) o["data"] = *v;
      if (t.datatype.rfind("FP", 0) == 0 && last > 1) o["argmax_last_axis"] = ArgmaxLastAxis(*v, last);
      jouts.push_back(o);
      continue;
    }
    if (g.quiet) continue;
    std::vector<std::string> shown;
    for (size_t i = 0; i < v->size() && static_cast<int>(i) < f.max_values; ++i) {
      shown.push_back(absl::StrFormat("%.6g", (*v)[i].get<double>()));
    }
    std::printf("%s  %s %s  [%s%s]\n", t.name.c_str(), t.datatype.c_str(),
                absl::StrCat("[", absl::StrJoin(t.shape, ", "), "]").c_str(),
                absl::StrJoin(shown, ", ").c_str(),
                v->size() > shown.size() ? absl::StrCat(", ... ", v->size(), " values").c_str() : "");
    if (t.datatype.rfind("FP", 0) == 0 && last > 1) {
      std::vector<int64_t> am = ArgmaxLastAxis(*v, last);
      const size_t n = std::min<size_t>(am.size(), 64);
      std::printf("  argmax over the last axis: [%s%s]\n",
                  absl::StrJoin(am.begin(), am.begin() + static_cast<std::ptrdiff_t>(n), ", ").c_str(),
                  am.size() > n ? ", ..." : "");
    }
  }
  if (g.json) {
    PrintJson({{"model_name", resp.model_name()}, {"model_version", resp.model_version()},
               {"outputs", jouts}, {"latency_ms", latency},
               {"saved_to", f.output.empty() ? nlohmann::json(nullptr) : nlohmann::json(f.output)}});
  } else if (!g.quiet) {
    std::printf("%s v%s: %s%.2f ms%s\n", resp.model_name().c_str(), resp.model_version().c_str(),
                f.repeat > 1 ? absl::StrFormat("%d runs, p50 ", f.repeat).c_str() : "",
                latency["p50"].get<double>(),
                f.output.empty() ? "" : absl::StrCat(", outputs saved to ", f.output).c_str());
  }
  return kExitOk;
}

// ---- health ----------------------------------------------------------------------------------

struct HealthFlags {
  std::string service;
  double wait_seconds = 0;
};

int RunHealth(const HealthFlags& f, const GlobalOptions& g) {
  const std::string cmd = "health";
  auto conn = Connection::Open(g);
  if (!conn.ok()) return ReportError(cmd, std::string(conn.status().message()), kExitUsage, g);
  auto health = grpc::health::v1::Health::NewStub((*conn)->channel());
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(f.wait_seconds * 1000));
  grpc::health::v1::HealthCheckResponse hr;
  grpc::Status s;
  for (;;) {
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(f.service);
    s = health->Check(&ctx, req, &hr);
    const bool serving = s.ok() && hr.status() == grpc::health::v1::HealthCheckResponse::SERVING;
    if (serving || std::chrono::steady_clock::now() >= until) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (!s.ok()) return ReportRpcError(cmd, s, g);
  const std::string status = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(hr.status());
  const bool serving = hr.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  // Server identity from OIP metadata (open without a token); best effort.
  auto oip = GRPCInferenceService::NewStub((*conn)->channel());
  inference::ServerMetadataResponse meta;
  {
    grpc::ClientContext ctx;
    (*conn)->Prepare(&ctx);
    (void)oip->ServerMetadata(&ctx, inference::ServerMetadataRequest(), &meta);
  }
  if (g.json) {
    PrintJson({{"status", status}, {"serving", serving}, {"service", f.service},
               {"server", g.server}, {"name", meta.name()}, {"version", meta.version()}});
  } else if (!g.quiet) {
    std::printf("%s: %s%s%s\n", g.server.c_str(), status.c_str(),
                f.service.empty() ? "" : (" (service " + f.service + ")").c_str(),
                meta.name().empty() ? "" : ("  " + meta.name() + " " + meta.version()).c_str());
  }
  return serving ? kExitOk : kExitIoError;
}

}  // namespace

void AddServingCommands(CLI::App& app, const GlobalOptions& g, int* exit_code) {
  CLI::App* models = app.add_subcommand("models", "Uploaded and served models");
  models->require_subcommand(1);
  auto mf = std::make_shared<ModelsFlags>();
  CLI::App* list = models->add_subcommand("list", "Uploaded models and the served model repository");
  list->callback([mf, &g, exit_code] { *exit_code = RunModels(*mf, g, "list"); });
  struct Verb {
    const char* name;
    const char* help;
  };
  for (Verb v : {Verb{"get", "Show an uploaded model, a served model's inputs and outputs, and its deployment (job, artifact, how its terms combine)"},
                 Verb{"load", "Load a served model from the repository (RepositoryModelLoad)"},
                 Verb{"unload", "Unload a served model (RepositoryModelUnload); it stays on disk"},
                 Verb{"delete", "Delete an uploaded model (its blob goes when nothing uses it)"}}) {
    const std::string name = v.name;
    CLI::App* sc = models->add_subcommand(name, v.help);
    sc->add_option("NAME", mf->name, "model name")->required();
    if (name == "get") sc->add_option("--version", mf->version, "served model version (default: latest)");
    sc->callback([mf, &g, exit_code, name] { *exit_code = RunModels(*mf, g, name); });
  }

  auto inf = std::make_shared<InferFlags>();
  CLI::App* i = AddCommand(app,
      "infer",
      "Run inference on a served model through the Open Inference Protocol (ModelInfer).\n"
      "Inputs: .npy (dtype and shape from the file), .json ({\"data\": [...], \"shape\": [...],\n"
      "\"datatype\": \"FP32\"} or a nested list), or raw little-endian bytes with --shape.\n"
      "  fpxint infer ocr_rec_w4x2 -i line.npy\n"
      "  fpxint infer ocr_rec_w4x2 -i line.npy --terms 1 -o logits.npy   # any-precision: K'=1\n"
      "  fpxint infer fmnist -i img.f32 --shape 1,1,28,28 --repeat 20 --json");
  i->add_option("MODEL", inf->model, "served model name")->required();
  i->add_option("--version", inf->version, "model version (default: latest)");
  i->add_option("-i,--input", inf->inputs, "input file (.npy, .json or raw); repeat per input")
      ->required()
      ->check(CLI::ExistingFile);
  i->add_option("--shape", inf->shape, "input shape D1,D2,... (raw input, or to reshape)");
  i->add_option("--datatype", inf->datatype, "input datatype for raw/JSON input (default: the model's)")
      ->check(CLI::IsMember({"FP32", "FP16", "FP64", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL"}));
  i->add_option("--input-name", inf->input_name, "input tensor name (default: the model's)");
  i->add_option("--terms", inf->terms, "run the first K' weight terms only (fpxint_terms)")
      ->check(CLI::Range(int64_t{1}, int64_t{16}));
  i->add_option("--act-terms", inf->act_terms, "run the first K' activation terms only (fpxint_act_terms)")
      ->check(CLI::Range(int64_t{1}, int64_t{16}));
  i->add_option("-o,--output", inf->output, "save outputs: .npy (first output) or .json (all)");
  i->add_option("--repeat", inf->repeat, "send the request N times and report latency")
      ->check(CLI::Range(1, 100000));
  i->add_option("--max-values", inf->max_values, "values shown per output (default 16)")
      ->check(CLI::NonNegativeNumber);
  i->callback([inf, &g, exit_code] { *exit_code = RunInfer(*inf, g); });

  auto hf = std::make_shared<HealthFlags>();
  CLI::App* h = AddCommand(app,
      "health",
      "Ask the server's gRPC health service: exit 0 when SERVING, 4 otherwise\n"
      "For container health checks and scripts; no token needed.\n"
      "  fpxint health --server 127.0.0.1:8001 --wait 30");
  h->add_option("--service", hf->service,
                "service to check (default \"\": the whole server; also "
                "inference.GRPCInferenceService, fpxint.v1.Quantizer)");
  h->add_option("--wait", hf->wait_seconds, "keep asking for up to this many seconds until SERVING")
      ->check(CLI::NonNegativeNumber);
  h->callback([hf, &g, exit_code] { *exit_code = RunHealth(*hf, g); });
}

}  // namespace fpxint::client
