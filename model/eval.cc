// Evaluation of expanded models on the real evaluation sets (model/eval.h). Uses the Model API
// only; no LibTorch here.
#include "model/eval.h"

#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/expansion.h"
#include "core/json.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "model/budget.h"

namespace fpxint::model {
namespace {

constexpr char kGrammar[] =
    "accepted: fp | rtn<B> | w<B>x<K>[-opts] | w<B>a<A>x<K>[,<Ka>][-opts] with opts "
    "sym|mid|asym, digits, trunc, atensor, tensor|channel|g<G>, t<X> (an error budget: K per "
    "layer up to K, probe output error <= X) (e.g. w4x2, w2x4-mid, w4a4x2-trunc, w4x4-t0.01)";

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

bool ParseInt(absl::string_view s, int lo, int hi, int* out) {
  int v = 0;
  if (s.empty() || !absl::SimpleAtoi(s, &v) || v < lo || v > hi) return false;
  *out = v;
  return true;
}

std::string CanonicalLabel(const EvalConfig& c) {
  switch (c.kind) {
    case EvalConfig::Kind::kFp: return "fp";
    case EvalConfig::Kind::kRtn: return absl::StrCat("rtn", c.spec.weights.bits);
    case EvalConfig::Kind::kSeries: break;
  }
  const core::ExpansionSpec& w = c.spec.weights;
  std::string s = absl::StrCat("w", w.bits);
  if (!c.spec.weight_only()) absl::StrAppend(&s, "a", c.spec.act_bits);
  absl::StrAppend(&s, "x", c.kw);
  if (!c.spec.weight_only() && c.ka != c.kw) absl::StrAppend(&s, ",", c.ka);
  if (w.grid != core::Grid::kSym) absl::StrAppend(&s, "-", core::GridName(w.grid));
  if (w.variant == core::Variant::kDigits) absl::StrAppend(&s, "-digits");
  if (c.spec.act_variant == core::Variant::kDigits) absl::StrAppend(&s, "-adigits");
  if (c.target > 0) absl::StrAppend(&s, "-t", absl::StrFormat("%g", c.target));
  if (c.spec.truncate) absl::StrAppend(&s, "-trunc");
  if (!c.spec.weight_only() && c.spec.act_scale == ModelExpansionSpec::ActScale::kTensor) {
    absl::StrAppend(&s, "-atensor");
  }
  if (w.scale == core::ScaleGranularity::kTensor) absl::StrAppend(&s, "-tensor");
  if (w.scale == core::ScaleGranularity::kGroup) absl::StrAppend(&s, "-g", w.group_size);
  return s;
}

// Configs with the same key differ only in K and share one expansion.
std::string GroupKey(const EvalConfig& c) {
  EvalConfig k = c;
  if (c.target == 0) {  // a budget's expansion has exactly its K (and is cut down by it)
    k.kw = 0;
    k.ka = 0;
  }
  return CanonicalLabel(k);
}

// Codes of a UTF-8 string (invalid bytes become U+FFFD).
std::vector<uint32_t> CodePoints(absl::string_view s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) {
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    uint32_t cp = len == 1 ? c : c & (0x7F >> len);
    for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out.push_back(cp);
    i += len;
  }
  return out;
}

// Plain per-output-channel symmetric round-to-nearest (the PTQ baseline): s = max|w| / (2^(b-1)-1)
// stored as fp32 (rounded down, or up when that would be subnormal: the convention of
// core/expansion.h), q = clamp(round-half-even(w/s)).
void RoundToNearest(int bits, LayerParams* l) {
  const int64_t rows = l->shape.empty() ? 1 : l->shape[0];
  const int64_t cols = static_cast<int64_t>(l->weight.size()) / rows;
  const double qmax = (1 << (bits - 1)) - 1;
  for (int64_t r = 0; r < rows; ++r) {
    double* w = l->weight.data() + r * cols;
    double m = 0;
    for (int64_t j = 0; j < cols; ++j) m = std::max(m, std::fabs(w[j]));
    if (m == 0) continue;
    float s = static_cast<float>(m / qmax);
    if (static_cast<double>(s) > m / qmax) s = std::nextafter(s, 0.0f);
    if (s < FLT_MIN) {  // a subnormal scale is too coarse to round down: round up instead
      s = static_cast<float>(m / qmax);
      if (static_cast<double>(s) < m / qmax) s = std::nextafter(s, INFINITY);
    }
    for (int64_t j = 0; j < cols; ++j) {
      const double q = std::clamp(std::nearbyint(w[j] / s), -qmax, qmax) + 0.0;  // no -0
      w[j] = static_cast<double>(static_cast<float>(s * q));
    }
  }
}

// SHA-256 of the weights as the network uses them (fp32), layer after layer.
std::string WeightsDigest(const ModelParams& p) {
  core::Sha256 h;
  for (const LayerParams& l : p.layers) {
    std::vector<float> f(l.weight.begin(), l.weight.end());
    h.Update(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(f.data()), f.size() * 4));
  }
  return h.HexDigest();
}

double RelFro(const ModelParams& fp, const ModelParams& q) {
  double num = 0, den = 0;
  for (size_t i = 0; i < fp.layers.size(); ++i) {
    for (size_t j = 0; j < fp.layers[i].weight.size(); ++j) {
      const double a = fp.layers[i].weight[j];
      const double d = a - static_cast<double>(static_cast<float>(q.layers[i].weight[j]));
      num += d * d;
      den += a * a;
    }
  }
  return den == 0 ? 0 : std::sqrt(num / den);
}

absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open '", path, "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

template <typename T>
absl::StatusOr<std::vector<T>> TensorValues(const core::SafetensorsReader& r, const std::string& path,
                                            absl::string_view name, core::DType dtype, int rank,
                                            std::vector<int64_t>* shape) {
  const core::TensorInfo* t = r.Find(name);
  if (t == nullptr || t->dtype != dtype || static_cast<int>(t->shape.size()) != rank) {
    return absl::InvalidArgumentError(absl::StrCat("'", path, "': expected tensor '", name,
                                                   "' of rank ", rank, " and dtype ",
                                                   core::DTypeName(dtype)));
  }
  *shape = t->shape;
  absl::Span<const uint8_t> bytes = r.Data(*t);
  std::vector<T> out(bytes.size() / sizeof(T));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

}  // namespace

absl::StatusOr<EvalTask> ParseEvalTask(absl::string_view name) {
  if (name == "ocr_rec") return EvalTask::kOcrRec;
  if (name == "ocr_cls") return EvalTask::kOcrCls;
  if (name == "fmnist") return EvalTask::kFmnist;
  if (name == "charlm") return EvalTask::kCharLm;
  return absl::InvalidArgumentError(
      absl::StrCat("task '", name, "'; accepted: ocr_rec, ocr_cls, fmnist, charlm"));
}

const char* EvalTaskName(EvalTask task) {
  switch (task) {
    case EvalTask::kOcrRec: return "ocr_rec";
    case EvalTask::kOcrCls: return "ocr_cls";
    case EvalTask::kFmnist: return "fmnist";
    case EvalTask::kCharLm: return "charlm";
  }
  return "?";
}

double EvalConfig::weight_bits() const {
  switch (kind) {
    case Kind::kFp: return 32;
    case Kind::kRtn: return spec.weights.bits;
    case Kind::kSeries: return static_cast<double>(kw) * spec.weights.bits;
  }
  return 32;
}

double EvalConfig::act_bits() const {
  if (kind != Kind::kSeries || spec.weight_only()) return 32;
  return static_cast<double>(ka) * spec.act_bits;
}

absl::StatusOr<EvalConfig> ParseEvalConfig(absl::string_view text_in) {
  const std::string text = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text_in));
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("config '", text_in, "': ", why, "; ", kGrammar));
  };
  EvalConfig c;
  if (text == "fp") {
    c.label = "fp";
    return c;
  }
  if (absl::StartsWith(text, "rtn")) {
    c.kind = EvalConfig::Kind::kRtn;
    if (!ParseInt(absl::string_view(text).substr(3), 2, 8, &c.spec.weights.bits)) {
      return bad("rtn bits must be 2..8");
    }
    c.spec.weights.terms = 1;
    c.kw = 1;
    c.label = CanonicalLabel(c);
    return c;
  }
  std::vector<std::string> parts = absl::StrSplit(text, '-');
  absl::string_view head = parts[0];
  if (!absl::ConsumePrefix(&head, "w")) return bad("expected fp, rtn<B> or w<B>...");
  const size_t x = head.find('x');
  if (x == absl::string_view::npos) return bad("missing x<K> (the number of terms)");
  absl::string_view bits_part = head.substr(0, x);
  absl::string_view terms_part = head.substr(x + 1);
  c.kind = EvalConfig::Kind::kSeries;
  core::ExpansionSpec& w = c.spec.weights;
  const size_t a = bits_part.find('a');
  if (!ParseInt(bits_part.substr(0, a), 1, 8, &w.bits)) return bad("weight bits must be 1..8");
  if (a != absl::string_view::npos && !ParseInt(bits_part.substr(a + 1), 1, 8, &c.spec.act_bits)) {
    return bad("activation bits must be 1..8");
  }
  std::vector<absl::string_view> ks = absl::StrSplit(terms_part, ',');
  if (ks.size() > 2 || !ParseInt(ks[0], 1, core::kMaxTerms, &c.kw)) return bad("bad term count");
  c.ka = 0;
  if (a != absl::string_view::npos) {
    c.ka = c.kw;
    if (ks.size() == 2 && !ParseInt(ks[1], 1, core::kMaxTerms, &c.ka)) return bad("bad K_a");
  } else if (ks.size() == 2) {
    return bad("K_a given without activation bits (w<B>a<A>x<K>,<Ka>)");
  }
  c.spec.act_terms = c.ka;
  w.terms = c.kw;
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& o = parts[i];
    if (std::optional<core::Grid> g = core::ParseGrid(o)) {
      w.grid = *g;
    } else if (o == "digits") {
      w.variant = core::Variant::kDigits;
    } else if (o == "adigits") {
      c.spec.act_variant = core::Variant::kDigits;
    } else if (o == "trunc") {
      c.spec.truncate = true;
    } else if (o.size() > 1 && o[0] == 't') {
      if (!absl::SimpleAtod(absl::string_view(o).substr(1), &c.target) || !(c.target > 0) ||
          c.target > 1e6) {
        return bad("bad error budget (t<X>, X > 0)");
      }
    } else if (o == "atensor") {
      c.spec.act_scale = ModelExpansionSpec::ActScale::kTensor;
    } else if (o == "tensor") {
      w.scale = core::ScaleGranularity::kTensor;
    } else if (o == "channel") {
      w.scale = core::ScaleGranularity::kChannel;
    } else if (o.size() > 1 && o[0] == 'g') {
      int g = 0;
      if (!ParseInt(absl::string_view(o).substr(1), 1, 1 << 20, &g)) return bad("bad group size");
      w.scale = core::ScaleGranularity::kGroup;
      w.group_size = g;
    } else {
      return bad(absl::StrCat("unknown option '", o, "'"));
    }
  }
  // Activations on the weights' grid (asym activations use sym: the first term is unsigned).
  c.spec.act_grid = w.grid == core::Grid::kMid ? core::Grid::kMid : core::Grid::kSym;
  if (c.spec.weight_only() && c.spec.act_scale != ModelExpansionSpec::ActScale::kAuto) {
    return bad("atensor needs activation bits (w<B>a<A>x<K>)");
  }
  if (c.spec.act_variant == core::Variant::kDigits && c.spec.weight_only()) {
    return bad("adigits needs activation bits (w<B>a<A>x<K>)");
  }
  if (c.target > 0 && c.spec.truncate) {
    return bad("an error budget (t<X>) does not take order truncation (trunc)");
  }
  if (absl::Status s = c.spec.Validate(); !s.ok()) return bad(s.message());
  c.label = CanonicalLabel(c);
  return c;
}

std::vector<EvalConfig> FullSweep() {
  std::vector<std::string> labels = {"fp", "rtn8", "rtn4", "rtn3", "rtn2"};
  for (const char* grid : {"", "-mid"}) {
    for (int b : {2, 3, 4}) {
      for (int k = 1; k <= 4; ++k) {
        labels.push_back(absl::StrCat("w", b, "x", k, grid));
        labels.push_back(absl::StrCat("w", b, "a", b, "x", k, grid));
      }
    }
  }
  for (int k = 1; k <= 4; ++k) labels.push_back(absl::StrCat("w4a4x", k, "-trunc"));
  std::vector<EvalConfig> out;
  for (const std::string& l : labels) out.push_back(*ParseEvalConfig(l));
  return out;
}

int EditDistance(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
  std::vector<int> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = static_cast<int>(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

struct Evaluator::Impl {
  EvalTask task;
  Options options;
  std::string model_path;
  std::unique_ptr<Model> model;
  ModelParams fp_params;

  // Inputs, one HostTensor per forward batch, and what each task scores them against.
  std::vector<HostTensor> batches;
  std::vector<std::vector<uint32_t>> texts;      // ocr_rec: per line
  std::vector<std::vector<uint32_t>> keys;       // ocr_rec: CTC class i → keys[i-1]
  std::vector<int64_t> labels;                   // ocr_cls, fmnist: per sample
  std::vector<std::vector<int64_t>> targets;     // charlm: per batch, [B*T]
  int samples = 0;

  std::vector<std::vector<float>> fp_outputs;    // per batch, for output_rel_err

  // An error budget (c.target): allocates each layer's K on the data-free probe (one sample of
  // the task's input shape, N(0,1), or token ids below the embedding table's size; no data is
  // read) and keeps those terms.
  absl::Status Budget(const EvalConfig& c, EvalResult* r) {
    if (batches.empty()) return absl::InvalidArgumentError("no evaluation data");
    const bool tokens = batches[0].type == HostTensor::Type::kInt64;
    if (tokens && model->token_vocabulary() <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          c.label, ": an error budget on token ids needs the model's embedding table for its "
          "data-free probe, and it has none"));
    }
    std::vector<int64_t> shape = batches[0].shape;
    shape[0] = 1;
    BudgetSpec b;
    b.target = c.target;
    b.min_terms = 1;
    b.max_terms = c.kw;
    const HostTensor probe =
        tokens ? TokenProbeInput(shape, model->token_vocabulary()) : ProbeInput(shape);
    FPX_ASSIGN_OR_RETURN(BudgetOutcome o, AllocateModelTerms(model.get(), probe, b));
    FPX_RETURN_IF_ERROR(model->KeepTerms(o.terms));
    double bits = 0, weights = 0;
    for (size_t i = 0; i < o.terms.size(); ++i) {
      if (o.terms[i] == 0) continue;
      double n = 1;
      for (int64_t d : model->layers()[i].weight_shape) n *= static_cast<double>(d);
      bits += n * o.terms[i] * c.spec.weights.bits;
      weights += n;
      ++r->budget_layers_per_k[o.terms[i]];
    }
    r->budget_weight_bits = weights > 0 ? bits / weights : 0;
    r->budget_probe_error = o.measured_error;
    return absl::OkStatus();
  }

  // Runs the whole set with the model's current configuration.
  absl::Status Score(EvalResult* r, bool record_fp) {
    const auto t0 = std::chrono::steady_clock::now();
    double err_num = 0, err_den = 0;
    int64_t correct = 0, edits = 0, chars = 0, lines_ok = 0;
    double nll = 0;
    int64_t tokens = 0;
    int64_t sample = 0;
    if (record_fp) fp_outputs.clear();
    for (size_t bi = 0; bi < batches.size(); ++bi) {
      FPX_ASSIGN_OR_RETURN(HostTensor y, model->Forward(batches[bi]));
      if (record_fp) fp_outputs.push_back(y.f32);
      const std::vector<float>& ref = fp_outputs[bi];
      if (ref.size() != y.f32.size()) return absl::InternalError("output size changed");
      for (size_t j = 0; j < ref.size(); ++j) {
        const double d = static_cast<double>(y.f32[j]) - ref[j];
        err_num += d * d;
        err_den += static_cast<double>(ref[j]) * ref[j];
      }
      const int64_t classes = y.shape.back();
      const int64_t rows = static_cast<int64_t>(y.f32.size()) / classes;
      auto argmax = [&](int64_t row) {
        const float* p = y.f32.data() + row * classes;
        return static_cast<int64_t>(std::max_element(p, p + classes) - p);
      };
      switch (task) {
        case EvalTask::kOcrRec: {  // one line per batch: [1, T, classes]
          std::vector<uint32_t> decoded;
          int64_t last = -1;
          for (int64_t t = 0; t < rows; ++t) {
            const int64_t c = argmax(t);
            if (c != last && c != 0 && c <= static_cast<int64_t>(keys.size())) {
              const std::vector<uint32_t>& k = keys[static_cast<size_t>(c - 1)];
              decoded.insert(decoded.end(), k.begin(), k.end());
            }
            last = c;
          }
          const std::vector<uint32_t>& truth = texts[static_cast<size_t>(sample)];
          const int e = EditDistance(decoded, truth);
          edits += e;
          chars += static_cast<int64_t>(truth.size());
          lines_ok += e == 0;
          ++sample;
          break;
        }
        case EvalTask::kOcrCls:
        case EvalTask::kFmnist:
          for (int64_t i = 0; i < rows; ++i, ++sample) {
            correct += argmax(i) == labels[static_cast<size_t>(sample)];
          }
          break;
        case EvalTask::kCharLm: {
          const std::vector<int64_t>& tgt = targets[bi];
          for (int64_t i = 0; i < rows; ++i) {
            const float* p = y.f32.data() + i * classes;
            const float mx = *std::max_element(p, p + classes);
            double z = 0;
            for (int64_t c = 0; c < classes; ++c) z += std::exp(static_cast<double>(p[c]) - mx);
            nll += std::log(z) + mx - p[tgt[static_cast<size_t>(i)]];
            ++tokens;
          }
          sample += rows / 64;
          break;
        }
      }
    }
    r->samples = samples;
    r->output_rel_err = err_den == 0 ? 0 : std::sqrt(err_num / err_den);
    switch (task) {
      case EvalTask::kOcrRec:
        r->metric_name = "char_acc";
        r->metric = 100.0 * (1.0 - static_cast<double>(edits) / std::max<int64_t>(1, chars));
        r->line_acc = 100.0 * static_cast<double>(lines_ok) / std::max(1, samples);
        break;
      case EvalTask::kOcrCls:
      case EvalTask::kFmnist:
        r->metric_name = "accuracy";
        r->metric = 100.0 * static_cast<double>(correct) / std::max(1, samples);
        break;
      case EvalTask::kCharLm:
        r->metric_name = "perplexity";
        r->metric = std::exp(nll / std::max<int64_t>(1, tokens));
        break;
    }
    r->eval_seconds = Seconds(t0);
    return absl::OkStatus();
  }

  absl::Status LoadData(const std::string& dir);
};

absl::Status Evaluator::Impl::LoadData(const std::string& dir) {
  const int limit = options.limit;
  auto cap = [&](int64_t n) { return static_cast<int>(limit > 0 ? std::min<int64_t>(n, limit) : n); };
  std::vector<int64_t> shape;
  switch (task) {
    case EvalTask::kOcrRec:
    case EvalTask::kOcrCls: {
      const std::string path = dir + "/ocr_eval.safetensors";
      FPX_ASSIGN_OR_RETURN(auto reader, core::SafetensorsReader::Open(path));
      const bool rec = task == EvalTask::kOcrRec;
      FPX_ASSIGN_OR_RETURN(std::vector<float> images,
                           TensorValues<float>(*reader, path, rec ? "rec_images" : "cls_images",
                                               core::DType::kF32, 4, &shape));
      samples = cap(shape[0]);
      const int64_t per = shape[1] * shape[2] * shape[3];
      for (int i = 0; i < samples; ++i) {
        batches.push_back(HostTensor::Float({1, shape[1], shape[2], shape[3]},
                                            std::vector<float>(images.begin() + i * per,
                                                               images.begin() + (i + 1) * per)));
      }
      if (!rec) {
        FPX_ASSIGN_OR_RETURN(labels, TensorValues<int64_t>(*reader, path, "cls_labels",
                                                           core::DType::kI64, 1, &shape));
        break;
      }
      FPX_ASSIGN_OR_RETURN(std::string json, ReadText(dir + "/ocr_eval_labels.json"));
      FPX_ASSIGN_OR_RETURN(core::JsonValue v, core::ParseJson(json));
      const core::JsonValue* t = v.Find("texts");
      if (t == nullptr || !t->is_array() || static_cast<int>(t->array().size()) < samples) {
        return absl::InvalidArgumentError("ocr_eval_labels.json: 'texts' must list every line");
      }
      for (int i = 0; i < samples; ++i) texts.push_back(CodePoints(t->array()[i].str()));
      FPX_ASSIGN_OR_RETURN(std::string key_text, ReadText(dir + "/ppocr_keys_v1.txt"));
      for (absl::string_view line : absl::StrSplit(key_text, '\n', absl::SkipEmpty())) {
        absl::ConsumeSuffix(&line, "\r");
        keys.push_back(CodePoints(line));
      }
      keys.push_back({' '});  // the last class is the space
      break;
    }
    case EvalTask::kFmnist: {
      const std::string path = dir + "/fmnist_test.safetensors";
      FPX_ASSIGN_OR_RETURN(auto reader, core::SafetensorsReader::Open(path));
      FPX_ASSIGN_OR_RETURN(std::vector<float> images,
                           TensorValues<float>(*reader, path, "images", core::DType::kF32, 4, &shape));
      samples = cap(shape[0]);
      FPX_ASSIGN_OR_RETURN(labels, TensorValues<int64_t>(*reader, path, "labels",
                                                         core::DType::kI64, 1, &shape));
      const int64_t per = 28 * 28;
      for (int i = 0; i < samples; i += 500) {
        const int n = std::min(500, samples - i);
        batches.push_back(HostTensor::Float(
            {n, 1, 28, 28},
            std::vector<float>(images.begin() + i * per, images.begin() + (i + n) * per)));
      }
      break;
    }
    case EvalTask::kCharLm: {
      const std::string path = dir + "/char_lm_eval.safetensors";
      FPX_ASSIGN_OR_RETURN(auto reader, core::SafetensorsReader::Open(path));
      FPX_ASSIGN_OR_RETURN(std::vector<int64_t> tok,
                           TensorValues<int64_t>(*reader, path, "tokens", core::DType::kI64, 2, &shape));
      if (shape[1] != 65) return absl::InvalidArgumentError(path + ": tokens must be [N, 65]");
      samples = cap(shape[0]);
      for (int i = 0; i < samples; i += 32) {
        const int n = std::min(32, samples - i);
        std::vector<int64_t> in, tgt;
        for (int r = i; r < i + n; ++r) {
          in.insert(in.end(), tok.begin() + r * 65, tok.begin() + r * 65 + 64);
          tgt.insert(tgt.end(), tok.begin() + r * 65 + 1, tok.begin() + r * 65 + 65);
        }
        batches.push_back(HostTensor::Int64({n, 64}, std::move(in)));
        targets.push_back(std::move(tgt));
      }
      break;
    }
  }
  if (samples == 0) return absl::InvalidArgumentError("the evaluation set is empty");
  return absl::OkStatus();
}

Evaluator::Evaluator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Evaluator::~Evaluator() = default;
EvalTask Evaluator::task() const { return impl_->task; }
const std::vector<LayerInfo>& Evaluator::layers() const { return impl_->model->layers(); }

absl::StatusOr<std::unique_ptr<Evaluator>> Evaluator::Load(EvalTask task,
                                                           const std::string& models_dir,
                                                           const Options& options) {
  auto impl = std::make_unique<Impl>();
  impl->task = task;
  impl->options = options;
  std::string dir, model_file;
  switch (task) {
    case EvalTask::kOcrRec: dir = "ocr"; model_file = "ocr_rec.pt"; break;
    case EvalTask::kOcrCls: dir = "ocr"; model_file = "ocr_cls.pt"; break;
    case EvalTask::kFmnist: dir = "fmnist"; model_file = "fmnist_cnn.pt"; break;
    case EvalTask::kCharLm: dir = "charlm"; model_file = "char_lm.pt"; break;
  }
  dir = absl::StrCat(models_dir, "/", dir);
  impl->model_path = absl::StrCat(dir, "/", model_file);
  if (!std::ifstream(impl->model_path)) {
    return absl::NotFoundError(absl::StrCat("'", impl->model_path,
                                            "' is missing; run scripts/fetch_models.sh first"));
  }
  Model::Options mo;
  mo.threads = options.threads;
  mo.packed = options.packed;
  FPX_ASSIGN_OR_RETURN(impl->model, Model::Load(impl->model_path, mo));
  FPX_RETURN_IF_ERROR(impl->LoadData(dir));
  return std::unique_ptr<Evaluator>(new Evaluator(std::move(impl)));
}

absl::StatusOr<std::vector<EvalResult>> Evaluator::Run(
    const std::vector<EvalConfig>& configs, core::ThreadPool* pool,
    const std::function<void(const EvalResult&)>& on_result) {
  Impl& im = *impl_;
  std::vector<EvalResult> out;
  // FP first: the reference outputs.
  FPX_RETURN_IF_ERROR(im.model->SetPrecision(0, 0));
  EvalResult fp;
  fp.config = *ParseEvalConfig("fp");
  FPX_RETURN_IF_ERROR(im.Score(&fp, /*record_fp=*/true));
  const bool fp_asked = std::any_of(configs.begin(), configs.end(), [](const EvalConfig& c) {
    return c.kind == EvalConfig::Kind::kFp;
  });
  // The FP parameters of every layer (a full expansion selects all layers).
  ModelExpansionSpec all;
  all.weights.terms = 1;
  FPX_RETURN_IF_ERROR(im.model->Expand(all, pool));
  im.fp_params = im.model->FpParams();
  fp.layers = static_cast<int>(im.fp_params.layers.size());
  fp.weights_sha256 = WeightsDigest(im.fp_params);

  // Group the series configs by their expansion (all but K), expanding each group once.
  std::map<std::string, ModelExpansionSpec> groups;
  for (const EvalConfig& c : configs) {
    if (c.kind != EvalConfig::Kind::kSeries) continue;
    ModelExpansionSpec& g = groups.try_emplace(GroupKey(c), c.spec).first->second;
    g.weights.terms = std::max(g.weights.terms, c.kw);
    g.act_terms = std::max(g.act_terms, c.ka);
  }
  if (!fp_asked) {  // the reference row comes first, asked for or not
    if (on_result) on_result(fp);
    out.push_back(fp);
  }
  // Expand a group when its first config comes (at the group's largest K).
  std::string current_group;
  double current_expand_seconds = 0;
  for (size_t i = 0; i < configs.size(); ++i) {
    const EvalConfig& c = configs[i];
    EvalResult r;
    r.config = c;
    switch (c.kind) {
      case EvalConfig::Kind::kFp:
        r = fp;
        break;
      case EvalConfig::Kind::kRtn: {
        ModelParams q = im.fp_params;
        for (LayerParams& l : q.layers) RoundToNearest(c.spec.weights.bits, &l);
        FPX_RETURN_IF_ERROR(im.model->UseParams(q));
        FPX_RETURN_IF_ERROR(im.Score(&r, false));
        r.layers = static_cast<int>(q.layers.size());
        r.weight_rel_fro = RelFro(im.fp_params, q);
        r.weights_sha256 = WeightsDigest(q);
        break;
      }
      case EvalConfig::Kind::kSeries: {
        const std::string key = GroupKey(c);
        if (key != current_group) {
          const auto t0 = std::chrono::steady_clock::now();
          FPX_RETURN_IF_ERROR(im.model->Expand(groups.at(key), pool));
          current_expand_seconds = Seconds(t0);
          current_group = key;
        }
        if (c.target > 0) {
          FPX_RETURN_IF_ERROR(im.Budget(c, &r));
          current_group.clear();  // the expansion was cut to the budget's terms
        }
        FPX_RETURN_IF_ERROR(im.model->SetPrecision(c.kw, c.ka));
        FPX_RETURN_IF_ERROR(im.Score(&r, false));
        r.expand_seconds = current_expand_seconds;
        // Effective weights: Σ_{k<=kw} terms of every layer, as fp32.
        ModelParams q = im.fp_params;
        for (size_t li = 0; li < im.model->layers().size(); ++li) {  // fp_params: every layer
          const core::TensorExpansion* e = im.model->expansion(li);
          if (e == nullptr) continue;  // not selected: stays FP
          q.layers[li].weight =
              core::Reconstruct(*e, std::min<int>(c.kw, static_cast<int>(e->terms.size())));
        }
        r.layers = 0;
        for (const LayerInfo& l : im.model->layers()) r.layers += l.expanded;
        r.weight_rel_fro = RelFro(im.fp_params, q);
        r.weights_sha256 = WeightsDigest(q);
        break;
      }
    }
    r.config = c;
    if (on_result) on_result(r);
    out.push_back(std::move(r));
  }
  FPX_RETURN_IF_ERROR(im.model->SetPrecision(0, 0));
  return out;
}

std::string EvalResultsJson(EvalTask task, const std::vector<EvalResult>& results) {
  core::JsonWriter w;
  w.BeginObject();
  w.Key("task").String(EvalTaskName(task));
  w.Key("calibration_data").String("none");
  w.Key("results").BeginArray();
  for (const EvalResult& r : results) {
    const EvalConfig& c = r.config;
    const core::ExpansionSpec& s = c.spec.weights;
    w.BeginObject();
    w.Key("config").String(c.label);
    w.Key("kind").String(c.kind == EvalConfig::Kind::kFp    ? "fp"
                         : c.kind == EvalConfig::Kind::kRtn ? "rtn"
                                                            : "series");
    if (c.kind != EvalConfig::Kind::kFp) {
      w.Key("bits").Int(s.bits);
      w.Key("weight_terms").Int(c.kw);
      w.Key("grid").String(core::GridName(s.grid));
      w.Key("variant").String(core::VariantName(s.variant));
      w.Key("scale").String(core::ScaleName(s.scale));
      if (s.scale == core::ScaleGranularity::kGroup) w.Key("group_size").Int(s.group_size);
      w.Key("act_bits").Int(c.spec.weight_only() ? 0 : c.spec.act_bits);
      w.Key("act_terms").Int(c.ka);
      w.Key("truncate").Bool(c.spec.truncate);
      if (!c.spec.weight_only()) {
        w.Key("act_scale").String(c.spec.act_scale == ModelExpansionSpec::ActScale::kTensor
                                      ? "tensor"
                                      : "auto");
      }
    }
    w.Key("weight_bits_effective").Double(c.target > 0 ? r.budget_weight_bits : c.weight_bits());
    if (c.target > 0) {
      w.Key("target_rel_error").Double(c.target);
      w.Key("probe_rel_error").Double(r.budget_probe_error);
      w.Key("layers_per_weight_terms").BeginObject();
      for (const auto& [k, n] : r.budget_layers_per_k) w.Key(absl::StrCat(k)).Int(n);
      w.EndObject();
    }
    w.Key("act_bits_effective").Double(c.act_bits());
    w.Key(r.metric_name).Double(r.metric);
    if (r.line_acc >= 0) w.Key("line_acc").Double(r.line_acc);
    w.Key("output_rel_err").Double(r.output_rel_err);
    w.Key("weight_rel_fro").Double(r.weight_rel_fro);
    w.Key("weights_sha256").String(r.weights_sha256);
    w.Key("layers").Int(r.layers);
    w.Key("samples").Int(r.samples);
    w.Key("expand_seconds").Double(r.expand_seconds);
    w.Key("eval_seconds").Double(r.eval_seconds);
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  return w.str();
}

}  // namespace fpxint::model
