// File: server/executor.cc
#include "server/executor.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/atomic_file.h"
#include "core/artifact.h"
#include "core/hf_checkpoint.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "core/torch_state_dict.h"
#include "model/budget.h"
#include "model/model.h"
#include "server/status_util.h"
#include "server/store.h"
#include "server/upload.h"
#include "server/validation.h"

namespace fpxint::server {
namespace {

namespace fs = std::filesystem;

bool Wants(const v1::JobSpec& s, v1::OutputFormat f) {
  return std::find(s.outputs().begin(), s.outputs().end(), f) != s.outputs().end();
}

void AddTerms(const std::vector<core::TermError>& errors, v1::LayerResult* l) {
  for (const core::TermError& e : errors) {
    v1::TermError* t = l->add_terms();
    t->set_k(e.k);
    t->set_rel_fro(e.rel_fro);
    t->set_rel_max(e.rel_max);
    t->set_sqnr_db(std::isinf(e.sqnr_db) ? 999.0 : e.sqnr_db);
  }
}

// ---- Memory budget ----
//
// What an expansion holds at its peak, from the shapes alone. Tensors are expanded one at a time
// and their packed terms spilled to disk before the next (core/artifact.h), so a TENSOR job
// holds the largest tensor's K packed terms and scales, plus an fp64 copy of it when it has one
// scale per tensor (channel and group scales stream row by row). A torch.save file's views that
// are not contiguous in their storage (transposed, strided, broadcast, or one storage under
// many names) are copied out together before the expansion starts: their bytes add to it. LAYER
// and MODEL jobs keep every
// layer's terms (for the probe and the exports) and the network in LibTorch: counted as three
// times the TorchScript file (the module, its frozen copy, the layers' FP copies).
struct MemoryNeed {
  uint64_t bytes = 0;
  std::string largest;  // the tensor that decides it (TENSOR) or a summary (network)
};

uint64_t TermsBytes(const std::vector<int64_t>& shape, const core::ExpansionSpec& ws) {
  absl::StatusOr<core::TensorLayout> l = core::TensorLayout::Make(shape, ws);
  if (!l.ok()) return 0;
  const uint64_t per_term = static_cast<uint64_t>(l->rows * l->packed_row_bytes) +
                            static_cast<uint64_t>(l->num_scales(ws)) * 8;
  uint64_t n = per_term * static_cast<uint64_t>(ws.terms);
  if (ws.scale == core::ScaleGranularity::kTensor) n += static_cast<uint64_t>(l->numel()) * 8;
  return n;
}

std::string MiB(uint64_t b) {
  return b < (uint64_t{1} << 20) ? absl::StrFormat("%.1f KiB", b / 1024.0)
                                 : absl::StrFormat("%.1f MiB", b / 1048576.0);
}

absl::Status CheckMemory(const MemoryNeed& need, uint64_t limit) {
  if (limit == 0 || need.bytes <= limit) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "the job needs about ", MiB(need.bytes), " of memory (", need.largest,
      "); this server allows ", MiB(limit), " per job (--job-memory-limit): use fewer terms or "
      "bits, channel or group scales instead of tensor scales, or ask the operator for more"));
}

absl::StatusOr<MemoryNeed> TensorJobNeed(const std::string& source, v1::ModelFormat format,
                                         const core::ExpansionSpec& ws) {
  MemoryNeed need;
  auto add = [&](const std::string& name, core::DType dtype, const std::vector<int64_t>& shape) {
    if (shape.size() < 2 || !core::IsFloating(dtype)) return;
    const uint64_t b = TermsBytes(shape, ws);
    if (b > need.bytes) {
      int64_t numel = 1;
      for (int64_t d : shape) numel *= d;
      need.bytes = b;
      need.largest = absl::StrCat("largest tensor '", name, "', ", numel, " values");
    }
  };
  if (format == v1::TORCH_STATE_DICT) {
    FPX_ASSIGN_OR_RETURN(auto sd, core::TorchStateDict::Open(source));
    for (const core::StateDictTensor& t : sd->tensors()) add(t.name, t.dtype, t.shape);
    uint64_t copies = 0;
    int copied = 0;
    for (const core::StateDictTensor& t : sd->tensors()) {
      if (t.contiguous()) continue;
      copies += static_cast<uint64_t>(t.numel()) * core::DTypeSize(t.dtype);
      ++copied;
    }
    if (copies > 0) {
      need.bytes += copies;
      need.largest = absl::StrCat(need.largest, need.largest.empty() ? "" : ", and ", copied,
                                  " non-contiguous view(s) copied out, ", MiB(copies));
    }
  } else {
    FPX_ASSIGN_OR_RETURN(auto reader, core::SafetensorsReader::Open(source));
    for (const core::TensorInfo& t : reader->tensors()) add(t.name, t.dtype, t.shape);
  }
  return need;
}

// Reports progress with phase and fraction; layers as given.
class Reporter {
 public:
  explicit Reporter(const JobContext& ctx) : ctx_(ctx) { p_.set_terms(0); }
  void Phase(absl::string_view phase, double fraction) {
    p_.set_phase(std::string(phase));
    p_.set_fraction(fraction);
    Send();
  }
  void Layer(int done, int total, const std::string& name, double lo, double hi) {
    p_.set_layers_done(done);
    p_.set_layers_total(total);
    p_.set_current_layer(name);
    p_.set_fraction(lo + (hi - lo) * (total > 0 ? static_cast<double>(done) / total : 1.0));
    Send();
  }
  void Written(uint64_t bytes) {
    p_.set_bytes_written(p_.bytes_written() + bytes);
    Send();
  }
  void Terms(uint32_t k) { p_.set_terms(k); }

 private:
  void Send() {
    if (ctx_.progress) ctx_.progress(p_);
  }
  const JobContext& ctx_;
  v1::Progress p_;
};

absl::Status CheckCancel(const JobContext& ctx) {
  if (ctx.cancel && ctx.cancel->load()) return absl::CancelledError("the job was cancelled");
  return absl::OkStatus();
}

// The job's report (its spec and result, as JSON), <model>.report.json among its outputs.
absl::Status AddReport(const v1::JobSpec& spec, const JobContext& ctx, JobOutput* out) {
  v1::Job j;
  *j.mutable_spec() = spec;
  *j.mutable_result() = out->result;
  FPX_ASSIGN_OR_RETURN(std::string json, ProtoToJson(j));
  const std::string path = (fs::path(ctx.scratch_dir) / "report.json").string();
  FPX_RETURN_IF_ERROR(core::WriteFileAtomic(path, json));
  out->files.push_back({"report_json", ctx.model.name() + ".report.json", path, ""});
  return absl::OkStatus();
}

// The probe input: fixed-seed N(0,1) values of the model's declared input shape (variable
// dimensions 1), or for a token model (an INT64 input) fixed-seed token ids below its smallest
// embedding table's size. nullopt, with the reason in result->probe_note, when there is none.
std::optional<model::HostTensor> ProbeInput(const v1::Model& m, const model::Model& net,
                                            v1::JobResult* result) {
  const bool tokens = m.inputs_size() == 1 && m.inputs(0).datatype() == "INT64";
  if (m.inputs_size() != 1 || (m.inputs(0).datatype() != "FP32" && !tokens)) {
    result->set_probe_note(
        "no probe: the upload declared no single FP32 or INT64 input signature "
        "(UploadHeader.inputs)");
    return std::nullopt;
  }
  if (tokens && net.token_vocabulary() <= 0) {
    result->set_probe_note(
        "no probe: the model takes token ids but looks none up in a constant embedding table, "
        "so there is no range to draw them from");
    return std::nullopt;
  }
  std::vector<int64_t> shape;
  int64_t n = 1;
  for (int64_t d : m.inputs(0).shape()) {
    shape.push_back(d < 0 ? 1 : d);
    n *= shape.back();
  }
  if (shape.empty() || n <= 0 || n > (int64_t{1} << 26)) {
    result->set_probe_note("no probe: the input signature has no usable shape");
    return std::nullopt;
  }
  return tokens ? model::TokenProbeInput(shape, net.token_vocabulary()) : model::ProbeInput(shape);
}

// The layers' sensitivity into the report, ranked by error per MiB of a term.
void AddSensitivity(const v1::JobSpec& spec, const std::vector<model::Model::LayerSensitivity>& sens,
                    const model::Model& net, v1::JobResult* result) {
  const core::ExpansionSpec ws = WeightSpec(spec);
  std::vector<v1::LayerSensitivity> out;
  for (const model::Model::LayerSensitivity& s : sens) {
    v1::LayerSensitivity l;
    l.set_name(s.name);
    for (double e : s.rel_fro) l.add_rel_fro(e);
    const uint64_t bytes = model::PackedTermBytes(net.layers()[s.layer].weight_shape, ws);
    l.set_bytes_per_term(bytes);
    l.set_error_per_mib(bytes > 0 && !s.rel_fro.empty() ? s.rel_fro[0] / (bytes / 1048576.0) : 0);
    out.push_back(std::move(l));
  }
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.error_per_mib() > b.error_per_mib();
  });
  for (v1::LayerSensitivity& l : out) *result->add_sensitivity() = std::move(l);
}

// An error-budgeted job (spec.target_rel_error; docs/ALGORITHM.md §6a): chooses each layer's K
// (model::AllocateModelTerms), reports it with the layers' sensitivity, and keeps those terms in
// the model. FailedPrecondition with the best error when the target cannot be met at max_terms.
absl::Status AllocateLayerTerms(const v1::JobSpec& spec, const model::HostTensor& probe,
                                const JobContext& ctx, model::Model* net, v1::JobResult* result) {
  model::BudgetSpec b;
  b.target = spec.target_rel_error();
  b.min_terms = static_cast<int>(spec.min_terms());
  b.max_terms = static_cast<int>(spec.max_terms());
  FPX_ASSIGN_OR_RETURN(b.pins, WeightTermPins(spec));
  FPX_ASSIGN_OR_RETURN(model::BudgetOutcome o, model::AllocateModelTerms(net, probe, b, ctx.cancel));
  AddSensitivity(spec, o.sensitivity, *net, result);
  v1::TermAllocation* a = result->mutable_allocation();
  a->set_target_rel_error(b.target);
  a->set_estimated_rel_error(o.estimated_error);
  a->set_measured_rel_error(o.measured_error);
  a->set_weight_bytes(o.weight_bytes);
  a->set_rounds(static_cast<uint32_t>(o.rounds));
  a->set_activation_floor(o.activation_floor);
  double best = o.measured_error;
  for (const model::BudgetOutcome::Uniform& u : o.uniform) {
    v1::UniformTerms* x = a->add_uniform();
    x->set_weight_terms(static_cast<uint32_t>(u.terms));
    x->set_weight_bytes(u.weight_bytes);
    x->set_rel_error(u.rel_error);
    best = std::min(best, u.rel_error);
  }
  if (!o.met && o.activation_floor >= b.target) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "target_rel_error %.4e not reached: the activations alone (%u terms of %u bits, every "
        "layer at max_terms) measure %.4e on the probe, and the best error reached is %.4e; "
        "raise act_terms or the target",
        b.target, spec.act_terms(), spec.act_bits(), o.activation_floor, best));
  }
  if (!o.met) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "target_rel_error %.4e not reached: the chosen terms per layer measured %.4e on the "
        "probe, and the best error reached (max_terms %d in every layer) is %.4e; raise "
        "max_terms or the target",
        b.target, o.measured_error, b.max_terms, best));
  }
  return net->KeepTerms(o.terms);
}

// The data-free probe: the probe input run through FP and through every precision k = 1..K of
// the expansion.
void RunProbe(const v1::JobSpec& spec, const model::HostTensor& input, model::Model* net,
              v1::JobResult* result) {
  if (!net->SetPrecision(0, 0).ok()) return;
  auto ref = net->Forward(input);
  if (!ref.ok()) {
    result->set_probe_note(absl::StrCat("no probe: ", ref.status().message()));
    return;
  }
  double ref_sq = 0, ref_max = 0;
  for (float v : ref->f32) {
    ref_sq += double{v} * v;
    ref_max = std::max(ref_max, std::fabs(double{v}));
  }
  const int ka_max = static_cast<int>(spec.act_terms());
  for (int k = 1; k <= static_cast<int>(spec.weight_terms()); ++k) {
    const int ka = std::min(k, ka_max);
    if (!net->SetPrecision(k, ka).ok()) break;
    auto y = net->Forward(input);
    if (!y.ok() || y->f32.size() != ref->f32.size()) break;
    double d_sq = 0, d_max = 0;
    for (size_t i = 0; i < y->f32.size(); ++i) {
      const double d = double{y->f32[i]} - ref->f32[i];
      d_sq += d * d;
      d_max = std::max(d_max, std::fabs(d));
    }
    v1::ProbeError* p = result->add_probe();
    p->set_weight_terms(k);
    p->set_act_terms(ka);
    p->set_rel_fro(ref_sq > 0 ? std::sqrt(d_sq / ref_sq) : 0);
    p->set_rel_max(ref_max > 0 ? d_max / ref_max : 0);
  }
  net->SetPrecision(0, 0).IgnoreError();
}

core::ArtifactOptions TensorOptions(const v1::JobSpec& spec, const JobContext& ctx) {
  core::ArtifactOptions opts;
  opts.spec = WeightSpec(spec);
  opts.include_regex = spec.include();
  opts.exclude_regex = spec.exclude();
  if (spec.preset() == "transformer") {
    opts.keep_regex = core::kTransformerPresetKeep;
    opts.keep_reason = "kept by --preset transformer (an embedding, norm, bias or lm_head; "
                       "--include naming it expands it)";
  }
  opts.expand.pool = ctx.pool;
  opts.expand.cancel = ctx.cancel;
  return opts;
}

void AddTensorResults(const core::ExpandReport& report, v1::JobResult* result) {
  for (const core::TensorReport& t : report.tensors) {
    v1::LayerResult* l = result->add_layers();
    l->set_name(t.name);
    l->set_op("tensor");
    for (int64_t d : t.shape) l->add_shape(d);
    AddTerms(t.terms, l);
  }
}

void SetTotals(uint64_t bytes_in, uint64_t bytes_out, double seconds, v1::JobResult* result) {
  result->set_bytes_in(bytes_in);
  result->set_bytes_out(bytes_out);
  result->set_compression_ratio(bytes_out ? static_cast<double>(bytes_in) / bytes_out : 0);
  if (seconds > 0) result->set_read_gb_per_second(bytes_in / seconds / 1e9);
}

// One shard task of a TENSOR job over a directory model (JobContext::shard): the shard's packed
// artifact as packed/<shard>, and with DEQUANTIZED_SAFETENSORS the shard dequantized as
// dequantized/<shard>, with the memory of one tensor at a time (as for one file). The job's
// indexes and sidecars come from AssembleDirectoryJob once every shard is done.
absl::StatusOr<JobOutput> RunShardTask(const v1::JobSpec& spec, const JobContext& ctx,
                                       Reporter* rep) {
  const SourceFile* src = nullptr;
  for (const SourceFile& f : ctx.files) {
    if (f.role == "shard" && f.path == ctx.shard) src = &f;
  }
  if (src == nullptr) {
    return absl::FailedPreconditionError(
        ctx.shard.empty() ? "a directory model's TENSOR job runs as shard tasks; this run names "
                            "no shard"
                          : absl::StrCat("the model lists no shard '", ctx.shard, "'"));
  }
  {
    FPX_ASSIGN_OR_RETURN(MemoryNeed need,
                         TensorJobNeed(src->blob_path, v1::SAFETENSORS, WeightSpec(spec)));
    FPX_RETURN_IF_ERROR(CheckMemory(need, ctx.memory_limit));
  }
  FPX_RETURN_IF_ERROR(CheckCancel(ctx));
  const bool dequantize = Wants(spec, v1::DEQUANTIZED_SAFETENSORS);
  JobOutput out;
  core::ArtifactOptions opts = TensorOptions(spec, ctx);
  opts.source_sha256 = src->sha256;
  opts.progress = [&](const core::ExpandProgress& p) {
    rep->Layer(static_cast<int>(p.tensor_index), static_cast<int>(p.tensor_count), p.name, 0.02,
               dequantize ? 0.8 : 0.97);
  };
  rep->Phase("expanding", 0.02);
  const std::string packed = (fs::path(ctx.scratch_dir) / "packed.safetensors").string();
  FPX_ASSIGN_OR_RETURN(core::ExpandReport report,
                       core::ExpandSafetensorsFile(src->blob_path, packed, opts));
  rep->Written(report.bytes_out);
  AddTensorResults(report, &out.result);
  v1::ShardResult* sr = out.result.add_shards();
  sr->set_file(src->path);
  sr->set_tensors(static_cast<uint32_t>(report.tensors.size()));
  sr->set_copied(static_cast<uint32_t>(report.copied.size()));
  sr->set_bytes_in(report.bytes_in);
  sr->set_bytes_out(report.bytes_out);
  sr->set_wall_seconds(report.wall_seconds);
  for (const core::TermSummary& t : report.Summary()) sr->set_max_rel_fro(t.worst_rel_fro);
  out.files.push_back({kPackedArtifactKind, absl::StrCat("packed/", src->path), packed,
                       report.artifact_sha256});
  if (dequantize) {
    FPX_RETURN_IF_ERROR(CheckCancel(ctx));
    rep->Phase("dequantizing", 0.8);
    const std::string d = (fs::path(ctx.scratch_dir) / "dequantized.safetensors").string();
    FPX_ASSIGN_OR_RETURN(std::string sha, core::WriteDequantizedSafetensors(
                                              src->blob_path, packed, d, src->sha256, ctx.pool));
    out.files.push_back({kDequantizedArtifactKind, absl::StrCat("dequantized/", src->path), d, sha});
  }
  SetTotals(report.bytes_in, report.bytes_out, report.wall_seconds, &out.result);
  return out;
}

}  // namespace

absl::StatusOr<JobOutput> AssembleDirectoryJob(
    const v1::JobSpec& spec, const JobContext& ctx, const std::vector<ShardTaskOutput>& tasks,
    const std::function<std::string(const std::string& sha256)>& blob_path, double wall_seconds) {
  JobOutput out;
  const SourceFile* index_file = nullptr;
  for (const SourceFile& f : ctx.files) {
    if (f.role == "index") index_file = &f;
  }
  const bool dequantize = Wants(spec, v1::DEQUANTIZED_SAFETENSORS);
  core::HfIndex packed_index;
  packed_index.metadata.emplace_back("format", "fpxint");
  packed_index.metadata.emplace_back("fpxint.source_model", ctx.model.name());
  uint64_t bytes_in = 0, bytes_out = 0, dequantized_data = 0;
  // Adds the tensors of a stored shard output to an index's weight_map; returns its data bytes.
  auto index_shard = [&](const v1::Artifact& a, const std::string& shard,
                         core::HfIndex* index) -> absl::StatusOr<uint64_t> {
    FPX_ASSIGN_OR_RETURN(auto reader, core::SafetensorsReader::Open(blob_path(a.sha256())));
    uint64_t data = 0;
    for (const core::TensorInfo& t : reader->tensors()) {
      if (index) index->weight_map.emplace_back(t.name, shard);
      data += t.end - t.begin;
    }
    return data;
  };
  for (const ShardTaskOutput& t : tasks) {
    FPX_RETURN_IF_ERROR(CheckCancel(ctx));
    bool packed_seen = false;
    for (const v1::Artifact& a : t.artifacts) {
      if (a.kind() == kPackedArtifactKind) {
        FPX_ASSIGN_OR_RETURN(uint64_t data, index_shard(a, t.shard, &packed_index));
        packed_index.total_size = packed_index.total_size.value_or(0) + data;
        packed_seen = true;
      } else if (a.kind() == kDequantizedArtifactKind) {
        FPX_ASSIGN_OR_RETURN(uint64_t data, index_shard(a, t.shard, nullptr));
        dequantized_data += data;
      } else {
        continue;
      }
      out.files.push_back({a.kind(), a.file_name(), "", a.sha256()});
    }
    if (!packed_seen) {
      return absl::InternalError(absl::StrCat("shard task for '", t.shard, "' stored no packed "
                                              "artifact"));
    }
    for (const v1::LayerResult& l : t.result.layers()) *out.result.add_layers() = l;
    for (const v1::ShardResult& s : t.result.shards()) *out.result.add_shards() = s;
    bytes_in += t.result.bytes_in();
    bytes_out += t.result.bytes_out();
  }
  const std::string packed_index_path = (fs::path(ctx.scratch_dir) / "packed.index.json").string();
  FPX_RETURN_IF_ERROR(core::WriteFileAtomic(packed_index_path, core::HfIndexToJson(packed_index)));
  out.files.push_back({"packed_index_json", absl::StrCat("packed/", core::kFpxintIndexFile),
                       packed_index_path, ""});
  if (dequantize) {
    // The source's index with its metadata, the same weight_map, and the new total_size (FP8
    // tensors come back as BF16); or none when the source was one model.safetensors.
    if (index_file != nullptr) {
      FPX_ASSIGN_OR_RETURN(std::string text,
                           ReadSmallFile(index_file->blob_path, core::HfIndexLimits{}.max_bytes));
      FPX_ASSIGN_OR_RETURN(core::HfIndex source_index, core::ParseHfIndex(text));
      source_index.total_size = dequantized_data;
      const std::string p = (fs::path(ctx.scratch_dir) / "dequantized.index.json").string();
      FPX_RETURN_IF_ERROR(core::WriteFileAtomic(p, core::HfIndexToJson(source_index)));
      out.files.push_back({"dequantized_index_json", absl::StrCat("dequantized/", index_file->path),
                           p, ""});
    }
    for (const SourceFile& f : ctx.files) {
      if (f.role != "sidecar") continue;
      out.files.push_back({"sidecar", absl::StrCat("dequantized/", f.path), "", f.sha256});
    }
  }
  SetTotals(bytes_in, bytes_out, wall_seconds, &out.result);
  out.result.set_wall_seconds(wall_seconds);
  FPX_RETURN_IF_ERROR(AddReport(spec, ctx, &out));
  return out;
}

namespace {

absl::StatusOr<JobOutput> RunTensorJob(const v1::JobSpec& spec, const JobContext& ctx,
                                       Reporter* rep) {
  if (ctx.model.format() == v1::HF_DIRECTORY) return RunShardTask(spec, ctx, rep);
  JobOutput out;
  std::string source = ctx.source_path;
  if (ctx.model.format() == v1::TORCHSCRIPT) {
    rep->Phase("loading", 0.0);
    FPX_ASSIGN_OR_RETURN(auto net, model::Model::Load(ctx.source_path, {ctx.torch_threads}));
    source = (fs::path(ctx.scratch_dir) / "folded.safetensors").string();
    FPX_RETURN_IF_ERROR(net->SaveFoldedWeights(source));
  }
  FPX_RETURN_IF_ERROR(CheckCancel(ctx));
  {
    FPX_ASSIGN_OR_RETURN(MemoryNeed need, TensorJobNeed(
        source, source == ctx.source_path ? ctx.model.format() : v1::SAFETENSORS, WeightSpec(spec)));
    FPX_RETURN_IF_ERROR(CheckMemory(need, ctx.memory_limit));
  }
  core::ArtifactOptions opts = TensorOptions(spec, ctx);
  // An uploaded blob is named by its SHA-256, checked when it was stored.
  if (source == ctx.source_path) opts.source_sha256 = ctx.model.sha256();
  opts.progress = [&](const core::ExpandProgress& p) {
    rep->Layer(p.tensor_index, p.tensor_count, p.name, 0.05, 0.95);
  };
  rep->Phase("expanding", 0.05);
  const std::string artifact = (fs::path(ctx.scratch_dir) / "artifact.safetensors").string();
  FPX_ASSIGN_OR_RETURN(core::ExpandReport report,
                       core::ExpandSafetensorsFile(source, artifact, opts));
  rep->Written(report.bytes_out);
  AddTensorResults(report, &out.result);
  SetTotals(report.bytes_in, report.bytes_out, report.wall_seconds, &out.result);
  out.files.push_back({kPackedArtifactKind, ctx.model.name() + ".fpxint.safetensors", artifact,
                       report.artifact_sha256});
  if (Wants(spec, v1::DEQUANTIZED_SAFETENSORS)) {
    FPX_RETURN_IF_ERROR(CheckCancel(ctx));
    rep->Phase("dequantizing", 0.95);
    const std::string p = (fs::path(ctx.scratch_dir) / "dequantized.safetensors").string();
    FPX_ASSIGN_OR_RETURN(std::string sha,
                         core::WriteDequantizedSafetensors(source, artifact, p,
                                                           opts.source_sha256, ctx.pool));
    out.files.push_back({kDequantizedArtifactKind,
                         ctx.model.name() + ".dequantized.safetensors", p, sha});
  }
  return out;
}

absl::StatusOr<JobOutput> RunNetworkJob(const v1::JobSpec& spec, const JobContext& ctx,
                                        Reporter* rep) {
  JobOutput out;
  rep->Phase("loading", 0.0);
  FPX_ASSIGN_OR_RETURN(auto net, model::Model::Load(ctx.source_path, {ctx.torch_threads}));
  FPX_RETURN_IF_ERROR(CheckCancel(ctx));
  {
    FPX_ASSIGN_OR_RETURN(uint64_t file, FileSize(ctx.source_path));
    MemoryNeed need;
    need.bytes = 3 * file;
    const core::ExpansionSpec ws = WeightSpec(spec);
    for (const model::LayerInfo& li : net->layers()) need.bytes += TermsBytes(li.weight_shape, ws);
    need.largest = absl::StrCat(net->layers().size(), " layers' terms and the network in LibTorch");
    FPX_RETURN_IF_ERROR(CheckMemory(need, ctx.memory_limit));
  }
  model::Model::ExpandHooks hooks;
  hooks.cancel = ctx.cancel;
  hooks.progress = [&](const model::Model::ExpandProgress& p) {
    rep->Layer(p.done, p.total, p.name, 0.05, 0.7);
  };
  const model::ModelExpansionSpec mspec = ToModelExpansionSpec(spec);
  if (!mspec.weight_only()) mspec.Folds(out.result.mutable_wa_products());
  FPX_RETURN_IF_ERROR(net->Expand(mspec, ctx.pool, hooks));
  FPX_RETURN_IF_ERROR(CheckCancel(ctx));
  // The data-free probes: every layer's sensitivity, and an error budget's allocation.
  const bool budget = spec.target_rel_error() > 0;
  std::optional<model::HostTensor> probe_input = ProbeInput(ctx.model, *net, &out.result);
  if (budget && !probe_input) {
    return absl::FailedPreconditionError(absl::StrCat(
        "target_rel_error needs the data-free probe, and there is none: ",
        out.result.probe_note()));
  }
  if (probe_input && budget) {
    rep->Phase("allocating terms", 0.7);
    FPX_RETURN_IF_ERROR(AllocateLayerTerms(spec, *probe_input, ctx, net.get(), &out.result));
  } else if (probe_input) {
    rep->Phase("probing layers", 0.7);
    constexpr int kReportedTerms = 4;
    absl::StatusOr<std::vector<model::Model::LayerSensitivity>> sens =
        net->Sensitivity(*probe_input, std::min<int>(kReportedTerms, spec.weight_terms()),
                         ctx.cancel);
    if (sens.ok()) {
      AddSensitivity(spec, *sens, *net, &out.result);
    } else if (absl::IsCancelled(sens.status())) {
      return sens.status();
    } else {
      out.result.set_probe_note(absl::StrCat("no layer sensitivity: ", sens.status().message()));
    }
  }
  for (const model::LayerInfo& li : net->layers()) {
    if (!li.expanded) continue;
    v1::LayerResult* l = out.result.add_layers();
    l->set_name(li.name);
    l->set_op(li.op);
    for (int64_t d : li.weight_shape) l->add_shape(d);
    AddTerms(li.errors, l);
    l->set_weight_terms(static_cast<uint32_t>(li.errors.size()));
  }
  FPX_RETURN_IF_ERROR(CheckCancel(ctx));
  rep->Phase("writing", 0.72);
  const std::string artifact = (fs::path(ctx.scratch_dir) / "artifact.safetensors").string();
  FPX_ASSIGN_OR_RETURN(core::ExpandReport report, net->SaveArtifact(artifact, ctx.pool));
  rep->Written(report.bytes_out);
  out.files.push_back({kPackedArtifactKind, ctx.model.name() + ".fpxint.safetensors", artifact,
                       report.artifact_sha256});
  FPX_ASSIGN_OR_RETURN(uint64_t source_size, FileSize(ctx.source_path));
  out.result.set_bytes_in(source_size);
  out.result.set_bytes_out(report.bytes_out);
  // The expanded layers' FP32 weights against their packed terms.
  out.result.set_compression_ratio(
      report.bytes_out ? static_cast<double>(report.bytes_in) / report.bytes_out : 0);

  FPX_RETURN_IF_ERROR(CheckCancel(ctx));
  rep->Phase("probing", 0.8);
  if (probe_input) RunProbe(spec, *probe_input, net.get(), &out.result);

  const int K = static_cast<int>(spec.weight_terms());
  if (Wants(spec, v1::DEQUANTIZED_TORCHSCRIPT)) {
    FPX_RETURN_IF_ERROR(net->SetPrecision(K, 0));
    const std::string p = (fs::path(ctx.scratch_dir) / "dequantized.pt").string();
    FPX_RETURN_IF_ERROR(net->SaveDequantized(p));
    FPX_ASSIGN_OR_RETURN(uint64_t n, FileSize(p));
    rep->Written(n);
    out.files.push_back({"dequantized_torchscript", ctx.model.name() + ".dequantized.pt", p, ""});
  }
  if (spec.granularity() == v1::MODEL) {
    for (int k = 1; k <= K; ++k) {
      FPX_RETURN_IF_ERROR(CheckCancel(ctx));
      rep->Phase("writing", 0.85 + 0.1 * k / K);
      FPX_ASSIGN_OR_RETURN(model::ModelParams basis, net->BasisParams(k));
      FPX_RETURN_IF_ERROR(net->UseParams(basis));
      const std::string p = (fs::path(ctx.scratch_dir) / absl::StrCat("basis_", k, ".pt")).string();
      FPX_RETURN_IF_ERROR(net->SaveDequantized(p));
      FPX_ASSIGN_OR_RETURN(uint64_t n, FileSize(p));
      rep->Written(n);
      out.files.push_back(
          {"basis_torchscript", absl::StrCat(ctx.model.name(), ".basis", k, ".pt"), p, ""});
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<JobOutput> RunJob(const v1::JobSpec& spec, const JobContext& ctx) {
  Reporter rep(ctx);
  rep.Terms(spec.weight_terms());
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<JobOutput> out = spec.granularity() == v1::TENSOR ? RunTensorJob(spec, ctx, &rep)
                                                                   : RunNetworkJob(spec, ctx, &rep);
  if (!out.ok()) {
    if (ctx.cancel && ctx.cancel->load()) return absl::CancelledError("the job was cancelled");
    return out.status();
  }
  out->result.set_wall_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  // A shard task's report is part of its job's, written when the job is assembled.
  if (ctx.shard.empty()) FPX_RETURN_IF_ERROR(AddReport(spec, ctx, &*out));
  rep.Phase("done", 1.0);
  return out;
}

}  // namespace fpxint::server
