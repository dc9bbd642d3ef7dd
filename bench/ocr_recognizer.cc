#include "bench/ocr_recognizer.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/safetensors.h"
#include "core/status_macros.h"

namespace fpxint::bench {

std::string ModelsDir() {
  if (const char* d = std::getenv("FPXINT_MODELS_DIR"); d != nullptr && *d != '\0') return d;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/fpxint/models";
}

absl::StatusOr<std::unique_ptr<model::Model>> LoadRecognizer(const std::string& models_dir,
                                                             int terms, int act_terms,
                                                             bool folded) {
  model::Model::Options o;
  o.threads = 2;
  o.packed = true;
  auto m = model::Model::Load(models_dir + "/ocr/ocr_rec.pt", o);
  if (!m.ok()) {
    return absl::Status(m.status().code(),
                        absl::StrCat("run scripts/fetch_models.sh: ", m.status().message()));
  }
  if (terms > 0) {
    model::ModelExpansionSpec spec;
    spec.weights.bits = 4;
    spec.weights.terms = terms;
    if (act_terms > 0) {
      spec.act_bits = 4;
      spec.act_terms = act_terms;
    }
    if (folded) {
      spec.weights.grid = spec.act_grid = core::Grid::kMid;
      spec.weights.variant = spec.act_variant = core::Variant::kDigits;
    }
    FPX_RETURN_IF_ERROR((*m)->Expand(spec, nullptr));
  }
  FPX_RETURN_IF_ERROR((*m)->SetPrecision(terms, act_terms));
  if (terms > 0) (*m)->ReleaseAllButPacked().IgnoreError();  // as the server holds it
  return m;
}

absl::StatusOr<model::HostTensor> FirstRecognizerLine(const std::string& models_dir,
                                                      int64_t lines) {
  auto reader = core::SafetensorsReader::Open(models_dir + "/ocr/ocr_eval.safetensors");
  const core::TensorInfo* t = reader.ok() ? (*reader)->Find("rec_images") : nullptr;
  if (t == nullptr || t->dtype != core::DType::kF32 || t->shape.size() != 4 || t->shape[1] != 3 ||
      t->shape[2] != 48 || t->shape[3] != 320 || t->shape[0] < lines) {
    return absl::FailedPreconditionError(
        "ocr_eval.safetensors has no F32 rec_images [N, 3, 48, 320] (run scripts/fetch_models.sh)");
  }
  const auto bytes = (*reader)->Data(*t);
  std::vector<float> v(static_cast<size_t>(lines * 3 * 48 * 320));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
  return model::HostTensor::Float({lines, 3, 48, 320}, std::move(v));
}

}  // namespace fpxint::bench
