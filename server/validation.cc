#include "server/validation.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/hf_checkpoint.h"
#include "core/name_pattern.h"
#include "core/status_macros.h"
#include "server/store.h"

namespace fpxint::server {
namespace {

constexpr int kMaxSignatureRank = 8;

absl::Status Bad(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("spec.", field, ": ", what));
}

core::Grid ToCore(v1::Grid g) {
  switch (g) {
    case v1::ASYM:
      return core::Grid::kAsym;
    case v1::MID:
      return core::Grid::kMid;
    default:
      return core::Grid::kSym;
  }
}

}  // namespace

namespace {

// 1-128 of [A-Za-z0-9._-] (and ':' when `colon`), starting with a letter or digit. A plain loop,
// not std::regex: names arrive from the network and may be megabytes long.
absl::Status CheckNameChars(const std::string& name, absl::string_view field, bool colon) {
  auto alnum = [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
  };
  bool ok = !name.empty() && name.size() <= 128 && alnum(name[0]);
  for (size_t i = 1; ok && i < name.size(); ++i) {
    ok = alnum(name[i]) || name[i] == '.' || name[i] == '_' || name[i] == '-' ||
         (colon && name[i] == ':');
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": '", name.substr(0, 64), "'; accepted: 1-128 characters of ",
                     colon ? "A-Z a-z 0-9 . _ - :" : "A-Z a-z 0-9 . _ -",
                     ", starting with a letter or digit"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckName(const std::string& name, absl::string_view field) {
  return CheckNameChars(name, field, /*colon=*/false);
}

absl::Status CheckReplicaId(const std::string& id, absl::string_view field) {
  return CheckNameChars(id, field, /*colon=*/true);
}

absl::Status CheckVersion(const std::string& version, absl::string_view field) {
  const bool ok = !version.empty() && version.size() <= 9 && version[0] != '0' &&
                  version.find_first_not_of("0123456789") == std::string::npos;
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": '", version.substr(0, 32), "'; accepted: a positive integer of 1-9 digits"));
  }
  return absl::OkStatus();
}

absl::Status CheckUploadHeader(const v1::UploadHeader& h, const UploadPolicy& policy,
                               bool is_admin) {
  FPX_RETURN_IF_ERROR(CheckName(h.name(), "header.name"));
  switch (h.format()) {
    case v1::SAFETENSORS:
    case v1::TORCH_STATE_DICT:  // read without running pickle code (core/torch_state_dict.h)
      break;
    case v1::TORCHSCRIPT:
      if (policy.torchscript == TorchScriptUploads::kNone ||
          (policy.torchscript == TorchScriptUploads::kAdmin && !is_admin)) {
        return absl::PermissionDeniedError(absl::StrCat(
            "header.format: this server refuses TORCHSCRIPT uploads from this caller "
            "(--allow-torchscript-uploads ",
            policy.torchscript == TorchScriptUploads::kNone
                ? "none"
                : "admin: admin tokens only, and a server without --token-file has none",
            "); SAFETENSORS and TORCH_STATE_DICT uploads are accepted"));
      }
      break;
    case v1::HF_DIRECTORY:
      if (!core::IsSafeRelativePath(h.file_path())) {
        return absl::InvalidArgumentError(absl::StrCat(
            "header.file_path: '", h.file_path(), "'; HF_DIRECTORY uploads name the file's path "
            "in the model directory: at most 4 '/'-separated segments of [A-Za-z0-9_][A-Za-z0-9._-]*"));
      }
      if (h.inputs_size() > 0) {
        return absl::InvalidArgumentError("header.inputs: not used for HF_DIRECTORY files");
      }
      break;
    default:
      return absl::InvalidArgumentError(
          "header.format: required; accepted: TORCHSCRIPT, SAFETENSORS, TORCH_STATE_DICT, "
          "HF_DIRECTORY (with header.file_path)");
  }
  if (h.format() != v1::HF_DIRECTORY && !h.file_path().empty()) {
    return absl::InvalidArgumentError(
        "header.file_path: only for HF_DIRECTORY uploads (one file of a model directory)");
  }
  if (!IsSha256Hex(h.sha256())) {
    return absl::InvalidArgumentError(
        "header.sha256: required; 64 lower-case hex digits of the file's SHA-256");
  }
  if (h.size_bytes() > policy.max_upload_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("header.size_bytes: ", h.size_bytes(), " exceeds the server's limit of ",
                     policy.max_upload_bytes, " bytes (--max-upload-bytes)"));
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

core::ExpansionSpec WeightSpec(const v1::JobSpec& s) {
  core::ExpansionSpec e;
  e.bits = static_cast<int>(s.weight_bits());
  e.terms = static_cast<int>(s.weight_terms());
  e.grid = ToCore(s.grid());
  e.variant = s.variant() == v1::DIGITS ? core::Variant::kDigits : core::Variant::kRescaled;
  e.scale = s.scale() == v1::PER_TENSOR  ? core::ScaleGranularity::kTensor
            : s.scale() == v1::PER_GROUP ? core::ScaleGranularity::kGroup
                                         : core::ScaleGranularity::kChannel;
  e.group_size = s.group_size();
  e.eps = s.eps();
  return e;
}

model::ModelExpansionSpec ToModelExpansionSpec(const v1::JobSpec& s) {
  model::ModelExpansionSpec m;
  m.weights = WeightSpec(s);
  m.act_bits = static_cast<int>(s.act_bits());
  m.act_terms = static_cast<int>(s.act_terms());
  m.act_grid = ToCore(s.act_grid());
  m.act_variant = s.act_variant() == v1::DIGITS ? core::Variant::kDigits : core::Variant::kRescaled;
  m.truncate = s.truncate();
  m.include = s.include();
  m.exclude = s.exclude();
  return m;
}

namespace {

// The error-budget fields (target_rel_error, min_terms, max_terms, weight_terms_for).
absl::Status NormalizeBudget(v1::JobSpec* s) {
  if (s->target_rel_error() == 0) {
    if (s->min_terms() || s->max_terms() || s->weight_terms_for_size()) {
      return Bad(s->min_terms() ? "min_terms" : s->max_terms() ? "max_terms" : "weight_terms_for",
                 "only with target_rel_error (an error-budgeted job); otherwise weight_terms "
                 "applies to every layer");
    }
    return absl::OkStatus();
  }
  if (!(s->target_rel_error() > 0 && s->target_rel_error() <= 1e6)) {  // also refuses NaN
    return Bad("target_rel_error", absl::StrCat(s->target_rel_error(), "; accepted 0 (one K for "
                                                "every layer) or a positive value up to 1e6"));
  }
  if (s->granularity() == v1::TENSOR) {
    return Bad("target_rel_error", "needs a LAYER or MODEL job (the budget is on the model's "
                                   "output); TENSOR jobs take one K");
  }
  if (s->truncate()) {
    return Bad("target_rel_error", "not with truncate: a budget measures every weight-term "
                                   "count against all activation terms");
  }
  if (s->eps() != 0) return Bad("eps", "not with target_rel_error (it chooses the terms itself)");
  if (s->min_terms() == 0) s->set_min_terms(1);
  if (s->max_terms() == 0) s->set_max_terms(4);
  if (s->min_terms() > s->max_terms() || s->max_terms() > 16) {
    return Bad("max_terms", absl::StrCat("min_terms ", s->min_terms(), ", max_terms ",
                                         s->max_terms(), "; accepted 1 <= min_terms <= "
                                         "max_terms <= 16"));
  }
  if (s->weight_terms() != 0 && s->weight_terms() != s->max_terms()) {
    return Bad("weight_terms", "with target_rel_error the expansion has max_terms terms; set "
                               "max_terms (and min_terms) instead");
  }
  s->set_weight_terms(s->max_terms());
  if (s->weight_terms_for_size() > 64) return Bad("weight_terms_for", "at most 64 entries");
  return WeightTermPins(*s).status();
}

}  // namespace

absl::StatusOr<std::vector<std::pair<std::string, int>>> WeightTermPins(const v1::JobSpec& s) {
  std::vector<std::pair<std::string, int>> pins;
  for (const std::string& e : s.weight_terms_for()) {
    const size_t eq = e.rfind('=');
    int k = 0;
    if (eq == std::string::npos || eq == 0 || !absl::SimpleAtoi(e.substr(eq + 1), &k) || k < 1 ||
        k > static_cast<int>(s.max_terms())) {
      return Bad("weight_terms_for",
                 absl::StrCat("'", e, "'; accepted PATTERN=K with K in 1..max_terms (",
                              s.max_terms(), ")"));
    }
    FPX_RETURN_IF_ERROR(
        core::NamePattern::Compile(e.substr(0, eq), "spec.weight_terms_for").status());
    pins.emplace_back(e.substr(0, eq), k);
  }
  return pins;
}

namespace {

absl::Status CheckBatching(const v1::DynamicBatching& b, const v1::Model& model) {
  constexpr uint32_t kMaxBatch = 1024;
  constexpr uint64_t kMaxDelayUs = 10000000;
  if (b.max_batch_size() == 0) {
    if (b.preferred_batch_size_size() > 0 || b.max_queue_delay_microseconds() > 0) {
      return Bad("deploy.batching.max_batch_size",
                 "0 (batching off) with preferred sizes or a queue delay; set 1..1024");
    }
    return absl::OkStatus();
  }
  if (b.max_batch_size() > kMaxBatch) {
    return Bad("deploy.batching.max_batch_size",
               absl::StrCat(b.max_batch_size(), "; accepted 0 (off) or 1..", kMaxBatch));
  }
  if (b.preferred_batch_size_size() > 16) {
    return Bad("deploy.batching.preferred_batch_size",
               absl::StrCat(b.preferred_batch_size_size(), " sizes; at most 16"));
  }
  for (uint32_t p : b.preferred_batch_size()) {
    if (p < 1 || p > b.max_batch_size()) {
      return Bad("deploy.batching.preferred_batch_size",
                 absl::StrCat(p, "; accepted 1..max_batch_size (", b.max_batch_size(), ")"));
    }
  }
  if (b.max_queue_delay_microseconds() > kMaxDelayUs) {
    return Bad("deploy.batching.max_queue_delay_microseconds",
               absl::StrCat(b.max_queue_delay_microseconds(), "; accepted 0..", kMaxDelayUs,
                            " (ten seconds)"));
  }
  // Requests are concatenated along the first dimension: it must be free in the signature.
  if (model.inputs_size() == 1 && model.inputs(0).shape_size() > 0 &&
      model.inputs(0).shape(0) != -1) {
    const v1::TensorSignature& in = model.inputs(0);
    return Bad("deploy.batching.max_batch_size",
               absl::StrCat("model '", model.name(), "' declares input '", in.name(),
                            "' with a fixed first dimension (", in.shape(0),
                            "); batching needs it variable: upload it with -1 there, e.g. --input ",
                            in.name().empty() ? "x" : in.name(), ":", in.datatype(), ":-1",
                            in.shape_size() > 1 ? "," : "",
                            absl::StrJoin(in.shape().begin() + 1, in.shape().end(), ",")));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status NormalizeJobSpec(const v1::Model& model, v1::JobSpec* s) {
  if (s->granularity() == v1::GRANULARITY_UNSPECIFIED) {
    return Bad("granularity", "required; one of TENSOR, LAYER, MODEL");
  }
  if (!(s->max_rel_error() >= 0 && s->max_rel_error() <= 1e6)) {  // also refuses NaN
    return Bad("max_rel_error",
               absl::StrCat(s->max_rel_error(), "; accepted 0 (no gate) or a positive value up "
                                                "to 1e6 (the largest relative error the job may "
                                                "reach)"));
  }
  const bool network = s->granularity() != v1::TENSOR;
  if (network && model.format() != v1::TORCHSCRIPT) {
    return Bad("granularity",
               absl::StrCat(v1::Granularity_Name(s->granularity()), " needs a TORCHSCRIPT model; '",
                            model.name(), "' is ", v1::ModelFormat_Name(model.format()),
                            " (use TENSOR for weights files)"));
  }
  FPX_RETURN_IF_ERROR(NormalizeBudget(s));
  if (s->weight_bits() == 0) s->set_weight_bits(4);
  if (s->weight_terms() == 0) s->set_weight_terms(2);
  if (s->grid() == v1::GRID_UNSPECIFIED) s->set_grid(v1::SYM);
  if (s->variant() == v1::VARIANT_UNSPECIFIED) s->set_variant(v1::RESCALED);
  if (s->scale() == v1::SCALE_GRANULARITY_UNSPECIFIED) s->set_scale(v1::PER_CHANNEL);
  if (s->act_grid() == v1::GRID_UNSPECIFIED) s->set_act_grid(v1::SYM);
  if (s->act_variant() == v1::VARIANT_UNSPECIFIED) s->set_act_variant(v1::RESCALED);
  if (s->weight_bits() > 8)
    return Bad("weight_bits", absl::StrCat(s->weight_bits(), "; accepted 1..8"));
  if (s->weight_terms() > 16) {
    return Bad("weight_terms", absl::StrCat(s->weight_terms(), "; accepted 1..16"));
  }
  if (s->scale() == v1::PER_GROUP && s->group_size() == 0) {
    return Bad("group_size", "required (> 0) with scale PER_GROUP");
  }
  if (s->scale() != v1::PER_GROUP && s->group_size() != 0) {
    return Bad("group_size", "only allowed with scale PER_GROUP");
  }
  if (!(s->eps() >= 0 && s->eps() < 1)) return Bad("eps", "accepted 0 (off) or 0 < eps < 1");
  if (absl::Status st = WeightSpec(*s).Validate(); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("spec: ", st.message()));
  }
  if (!network && (s->act_bits() || s->act_terms())) {
    return Bad("act_bits", "activations are expanded by LAYER and MODEL jobs only; TENSOR takes 0");
  }
  if ((s->act_bits() == 0) != (s->act_terms() == 0)) {
    return Bad("act_terms", "act_bits and act_terms are both 0 (weight-only) or both set");
  }
  if (s->act_bits() > 8) return Bad("act_bits", absl::StrCat(s->act_bits(), "; accepted 0..8"));
  if (s->act_terms() > 16)
    return Bad("act_terms", absl::StrCat(s->act_terms(), "; accepted 0..16"));
  if (s->act_variant() == v1::DIGITS && s->act_bits() == 0) {
    return Bad("act_variant", "DIGITS applies to expanded activations (act_bits > 0)");
  }
  if (s->act_variant() == v1::DIGITS && s->act_grid() != v1::MID) {
    return Bad("act_variant", absl::StrCat("DIGITS needs act_grid MID; got ",
                                           v1::Grid_Name(s->act_grid())));
  }
  if (network) {
    if (absl::Status st = ToModelExpansionSpec(*s).Validate(); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("spec: ", st.message()));
    }
  }
  for (int f : s->outputs()) {
    if (!v1::OutputFormat_IsValid(f) || f == v1::OUTPUT_FORMAT_UNSPECIFIED) {
      return Bad("outputs", absl::StrCat(f, " is not an output format"));
    }
    if (f == v1::DEQUANTIZED_TORCHSCRIPT && (!network || s->act_terms() > 0)) {
      return Bad("outputs", "DEQUANTIZED_TORCHSCRIPT needs a weight-only LAYER or MODEL job");
    }
    if (f == v1::DEQUANTIZED_SAFETENSORS && s->granularity() != v1::TENSOR) {
      return Bad("outputs", "DEQUANTIZED_SAFETENSORS needs a TENSOR job (LAYER and MODEL jobs "
                            "write DEQUANTIZED_TORCHSCRIPT)");
    }
    if (f == v1::BASIS_TORCHSCRIPT && s->granularity() != v1::MODEL) {
      return Bad("outputs", "BASIS_TORCHSCRIPT needs a MODEL job");
    }
  }
  if (!s->preset().empty()) {
    if (s->preset() != "transformer") {
      return Bad("preset", absl::StrCat("'", s->preset(), "'; accepted: transformer (or empty)"));
    }
    if (network) {
      return Bad("preset", "transformer is a TENSOR-job selection of checkpoint tensors; LAYER "
                           "and MODEL jobs select layers with include/exclude");
    }
  }
  if (s->deploy().enabled() && !network) {
    return Bad("deploy", "only LAYER and MODEL jobs produce a servable model");
  }
  // The deployment becomes <repository>/<name>/<version>/: both must be plain names.
  if (!s->deploy().name().empty()) {
    FPX_RETURN_IF_ERROR(CheckName(s->deploy().name(), "spec.deploy.name"));
  }
  if (!s->deploy().version().empty()) {
    FPX_RETURN_IF_ERROR(CheckVersion(s->deploy().version(), "spec.deploy.version"));
  }
  if (s->deploy().has_batching()) {
    if (!s->deploy().enabled()) {
      return Bad("deploy.batching", "needs deploy.enabled (batching is a served version's setting)");
    }
    FPX_RETURN_IF_ERROR(CheckBatching(s->deploy().batching(), model));
  }
  for (const auto& [field, pattern] :
       {std::pair<const char*, const std::string*>{"include", &s->include()},
        {"exclude", &s->exclude()}}) {
    if (absl::Status st = core::NamePattern::Compile(*pattern, absl::StrCat("spec.", field)).status();
        !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

}  // namespace fpxint::server
