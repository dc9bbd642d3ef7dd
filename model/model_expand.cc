// File: model/model_expand.cc
//
// Expansion: the weight expansion of the selected layers (computed, or taken from an artifact),
// the artifacts and folded weights written from it, and the Abelian parameters of ALGORITHM §4.
#include "model/model.h"

#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include <cstdio>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/name_pattern.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "model/internal/model_impl.h"

namespace fpxint::model {

void Model::Impl::DropNetworks() {
  built.clear();
  packed.reset();
  packed_wa.reset();
  packed_wa_error = absl::OkStatus();
  current_packed = current_wa = false;
}

absl::Status Model::Impl::ResetExpansion(const ModelExpansionSpec& s) {
  if (released) {
    return absl::FailedPreconditionError("this model keeps only its packed network (released)");
  }
  spec = s;
  DropNetworks();  // those of the previous expansion
  for (LayerInfo& l : layers) l.errors.clear();
  for (auto& e : expansions) e.reset();
  return absl::OkStatus();
}

at::Tensor Model::Impl::PartialSum(size_t i, int k) const {
  return FromExpansionLayout(core::Reconstruct(*expansions[i], k), original_weights[i], kinds[i]);
}

LayerParams Model::Impl::FpLayer(size_t i) const {
  LayerParams l;
  l.name = layers[i].name;
  const at::Tensor w = ExpansionLayout(original_weights[i], kinds[i]);
  l.shape = w.sizes().vec();
  l.weight.assign(w.data_ptr<float>(), w.data_ptr<float>() + w.numel());
  if (original_biases[i].defined()) {
    const at::Tensor b = original_biases[i].contiguous().to(at::kFloat);
    l.bias.assign(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
  }
  return l;
}


absl::Status Model::Expand(const ModelExpansionSpec& spec, core::ThreadPool* pool,
                           const ExpandHooks& hooks) {
  FPX_RETURN_IF_ERROR(spec.Validate());
  std::optional<core::NamePattern> include, exclude;
  if (!spec.include.empty()) {
    FPX_ASSIGN_OR_RETURN(include, core::NamePattern::Compile(spec.include, "include"));
  }
  if (!spec.exclude.empty()) {
    FPX_ASSIGN_OR_RETURN(exclude, core::NamePattern::Compile(spec.exclude, "exclude"));
  }
  Impl& im = *impl_;
  FPX_RETURN_IF_ERROR(im.ResetExpansion(spec));
  core::ExpandOptions opts;
  opts.pool = pool;
  opts.cancel = hooks.cancel;
  int selected = 0;
  for (LayerInfo& l : im.layers) {
    l.expanded = (!include || include->Matches(l.name)) && !(exclude && exclude->Matches(l.name));
    selected += l.expanded ? 1 : 0;
  }
  int done = 0;
  for (size_t i = 0; i < im.layers.size(); ++i) {
    LayerInfo& l = im.layers[i];
    if (!l.expanded) continue;
    if (hooks.progress) hooks.progress({done++, selected, l.name});
    const at::Tensor w = ExpansionLayout(im.original_weights[i], im.kinds[i]);
    const auto bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(w.data_ptr<float>()),
                                           static_cast<size_t>(w.numel()) * 4);
    absl::StatusOr<core::TensorExpansion> e =
        core::ExpandTensor(core::DType::kF32, w.sizes().vec(), bytes, spec.weights, opts);
    if (!e.ok()) {
      return absl::Status(e.status().code(),
                          absl::StrCat("layer '", l.name, "': ", e.status().message()));
    }
    l.errors = e->errors;
    im.expansions[i] = *std::move(e);
  }
  if (selected == 0) {
    return absl::InvalidArgumentError(absl::StrCat("include/exclude select none of the ",
                                                   im.layers.size(), " layers"));
  }
  if (hooks.progress) hooks.progress({selected, selected, ""});
  im.kw = im.ka = 0;
  im.current = im.frozen;
  return absl::OkStatus();
}


absl::Status Model::UseArtifact(const ModelExpansionSpec& spec,
                               const core::ArtifactView& artifact) {
  Impl& im = *impl_;
  ModelExpansionSpec s = spec;
  s.weights = artifact.spec();
  s.include.clear();
  s.exclude.clear();
  FPX_RETURN_IF_ERROR(s.Validate());
  FPX_RETURN_IF_ERROR(im.ResetExpansion(s));
  std::map<std::string, size_t> by_name;
  for (size_t i = 0; i < im.layers.size(); ++i) {
    im.layers[i].expanded = false;
    by_name.emplace(im.layers[i].name, i);
  }
  for (const core::ArtifactView::Entry& e : artifact.tensors()) {
    auto it = by_name.find(e.name);
    if (it == by_name.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "artifact tensor '", e.name, "' is no layer of this model (it has ", im.layers.size(),
          " layers, such as '", im.layers.front().name, "'): the artifact is of another model"));
    }
    const size_t i = it->second;
    const std::vector<int64_t> want = ExpansionLayout(im.original_weights[i], im.kinds[i]).sizes().vec();
    if (e.layout.shape != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          "artifact tensor '", e.name, "' has shape [", absl::StrJoin(e.layout.shape, ", "),
          "]; the model's layer needs [", absl::StrJoin(want, ", "), "]"));
    }
    FPX_ASSIGN_OR_RETURN(core::TensorExpansion x, artifact.Load(e.name));
    im.layers[i].expanded = true;
    im.expansions[i] = std::move(x);
  }
  if (artifact.tensors().empty()) {
    return absl::InvalidArgumentError("the artifact holds no expanded tensor");
  }
  im.kw = im.ka = 0;
  im.current = im.frozen;
  return absl::OkStatus();
}


absl::Status Model::SaveFoldedWeights(const std::string& path) const {
  if (impl_->released) return absl::FailedPreconditionError(kReleasedMessage);
  const Impl& im = *impl_;
  core::SafetensorsWriter w;
  w.SetMetadata("format", "fpxint-folded-weights");
  int n = 0;
  bool any_expanded = false;
  for (const auto& layer : im.layers) any_expanded = any_expanded || layer.expanded;
  for (size_t i = 0; i < im.layers.size(); ++i) {
    if (any_expanded && !im.layers[i].expanded) continue;
    ++n;
    const LayerParams l = im.FpLayer(i);
    std::vector<float> wf(l.weight.begin(), l.weight.end());
    std::vector<uint8_t> bytes(wf.size() * 4);
    std::memcpy(bytes.data(), wf.data(), bytes.size());
    FPX_RETURN_IF_ERROR(w.AddOwned(l.name, core::DType::kF32, l.shape, std::move(bytes)));
    if (!l.bias.empty()) {
      std::vector<float> bf(l.bias.begin(), l.bias.end());
      std::vector<uint8_t> bb(bf.size() * 4);
      std::memcpy(bb.data(), bf.data(), bb.size());
      FPX_RETURN_IF_ERROR(w.AddOwned(l.name + ".bias", core::DType::kF32,
                                     {static_cast<int64_t>(bf.size())}, std::move(bb)));
    }
  }
  if (n == 0) {
    return absl::FailedPreconditionError(
        "the model has no linear or convolution layer with a weight to expand");
  }
  return w.WriteFile(path);
}


absl::StatusOr<core::ExpandReport> Model::SaveArtifact(const std::string& path,
                                                       core::ThreadPool* pool) const {
  const std::string folded = path + ".folded.tmp";
  FPX_RETURN_IF_ERROR(SaveFoldedWeights(folded));
  core::ArtifactOptions o;
  o.spec = impl_->spec.weights;
  o.expand.pool = pool;
  // An error-budgeted expansion keeps fewer terms in some layers (KeepTerms).
  for (size_t i = 0; i < impl_->layers.size(); ++i) {
    const auto& e = impl_->expansions[i];
    if (e && static_cast<int>(e->terms.size()) < o.spec.terms) {
      o.terms_for[impl_->layers[i].name] = static_cast<int>(e->terms.size());
    }
  }
  absl::StatusOr<core::ExpandReport> r = core::ExpandSafetensorsFile(folded, path, o);
  std::remove(folded.c_str());
  return r;
}


ModelParams Model::FpParams() const {
  ModelParams p;
  if (impl_->released) return p;
  for (size_t i = 0; i < impl_->layers.size(); ++i) {
    if (impl_->layers[i].expanded) p.layers.push_back(impl_->FpLayer(i));
  }
  return p;
}


absl::StatusOr<ModelParams> Model::BasisParams(int k) const {
  if (impl_->released) return absl::FailedPreconditionError(kReleasedMessage);
  const Impl& im = *impl_;
  if (k < 1 || k > im.spec.weights.terms) {
    return absl::InvalidArgumentError(
        absl::StrCat("basis model ", k, "; accepted 1..", im.spec.weights.terms));
  }
  ModelParams p;
  for (size_t i = 0; i < im.layers.size(); ++i) {
    if (!im.layers[i].expanded) continue;
    LayerParams l = im.FpLayer(i);
    const core::TensorExpansion& e = *im.expansions[i];
    std::fill(l.weight.begin(), l.weight.end(), 0.0);
    if (k <= static_cast<int>(e.terms.size())) {
      core::AccumulateTerm(e.spec, e.layout, e.terms[k - 1], k, l.weight.data());
    }
    if (k > 1) std::fill(l.bias.begin(), l.bias.end(), 0.0);
    p.layers.push_back(std::move(l));
  }
  return p;
}


ModelParams Model::ResidualParams() const {
  const Impl& im = *impl_;
  ModelParams p;
  if (im.released) return p;
  for (size_t i = 0; i < im.layers.size(); ++i) {
    if (!im.layers[i].expanded) continue;
    LayerParams l = im.FpLayer(i);
    const core::TensorExpansion& e = *im.expansions[i];
    const std::vector<double> sum = core::Reconstruct(e, static_cast<int>(e.terms.size()));
    for (size_t j = 0; j < l.weight.size(); ++j) l.weight[j] -= sum[j];
    std::fill(l.bias.begin(), l.bias.end(), 0.0);
    p.layers.push_back(std::move(l));
  }
  return p;
}


struct Model::Prober::State {
  Impl* im = nullptr;
  torch::jit::Module net;
  std::vector<at::Tensor> slots;  // the expanded layers' weight constants, in layer order
  std::vector<int> in_slot;       // terms each slot holds now (0: FP)
  at::Tensor x;
  at::Tensor ref;  // the FP output, double
  double ref_norm = 0;

  at::Tensor Run() { return RunOn(net); }
  at::Tensor RunOn(torch::jit::Module& m) {
    torch::NoGradGuard no_grad;
    c10::IValue y = m.forward({x.clone()});
    if (y.isTuple()) y = y.toTupleRef().elements()[0];
    return y.toTensor().contiguous().to(at::kDouble);
  }
  void Set(size_t i, int k) {
    if (in_slot[i] == k) return;
    torch::NoGradGuard no_grad;
    slots[i].copy_(k == 0 ? im->original_weights[i] : im->PartialSum(i, k));
    in_slot[i] = k;
  }
  double ErrorNow() {
    const double d = (Run() - ref).norm().item<double>();
    return ref_norm > 0 ? d / ref_norm : d;
  }
};

Model::Prober::Prober(std::unique_ptr<State> s) : s_(std::move(s)) {}
Model::Prober::~Prober() = default;

absl::StatusOr<std::unique_ptr<Model::Prober>> Model::NewProber(const HostTensor& input,
                                                                int act_terms) {
  if (impl_->released) return absl::FailedPreconditionError(kReleasedMessage);
  Impl& im = *impl_;
  if (act_terms < 0 || (act_terms > 0 && (im.spec.weight_only() || im.spec.truncate))) {
    return absl::InvalidArgumentError(
        "probe: act_terms needs a W×A expansion without order truncation");
  }
  const bool f32 = input.type == HostTensor::Type::kFloat32;
  if (input.numel() != static_cast<int64_t>(f32 ? input.f32.size() : input.i64.size())) {
    return absl::InvalidArgumentError("input: values matching its shape (FP32, or INT64 ids)");
  }
  auto st = std::make_unique<Prober::State>();
  st->im = &im;
  st->slots.resize(im.layers.size());
  st->in_slot.assign(im.layers.size(), 0);
  try {
    auto weight_for = [&](size_t i, int) {
      st->slots[i] = im.original_weights[i].clone();
      return st->slots[i];
    };
    FPX_ASSIGN_OR_RETURN(st->net, im.Build(weight_for, 1, act_terms, /*truncate=*/false));
    st->x = f32 ? at::from_blob(const_cast<float*>(input.f32.data()), input.shape, at::kFloat)
                      .clone()
                : at::from_blob(const_cast<int64_t*>(input.i64.data()), input.shape, at::kLong)
                      .clone();
    // The reference is the FP model (with expanded activations, the probe network is not).
    torch::jit::Module fp = im.frozen;
    st->ref = act_terms > 0 ? st->RunOn(fp) : st->Run();
    st->ref_norm = st->ref.norm().item<double>();
  } catch (const std::exception& e) {
    const c10::Error* ce = dynamic_cast<const c10::Error*>(&e);
    return absl::InvalidArgumentError(absl::StrCat(
        "probe: the model rejected the probe input: ", ce ? Brief(*ce) : BriefText(e.what())));
  }
  return std::unique_ptr<Prober>(new Prober(std::move(st)));
}

absl::StatusOr<double> Model::Prober::OutputError(const std::vector<int>& terms) {
  Impl& im = *s_->im;
  if (terms.size() != im.layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat("terms for ", terms.size(), " layers; the "
                                                   "model has ", im.layers.size()));
  }
  try {
    for (size_t i = 0; i < terms.size(); ++i) {
      if (!s_->slots[i].defined() || !im.expansions[i]) continue;
      const int have = static_cast<int>(im.expansions[i]->terms.size());
      if (terms[i] < 0 || terms[i] > have) {
        return absl::InvalidArgumentError(absl::StrCat("layer '", im.layers[i].name, "': ",
                                                       terms[i], " terms; it has ", have));
      }
      s_->Set(i, terms[i]);
    }
    return s_->ErrorNow();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("probe: ", BriefText(e.what())));
  }
}

absl::StatusOr<std::vector<Model::LayerSensitivity>> Model::Prober::Sensitivity(
    int max_terms, const std::atomic<bool>* cancel) {
  Impl& im = *s_->im;
  std::vector<LayerSensitivity> out;
  try {
    for (size_t i = 0; i < im.layers.size(); ++i) s_->Set(i, 0);
    for (size_t i = 0; i < im.layers.size(); ++i) {
      if (!im.layers[i].expanded || !im.expansions[i] || !s_->slots[i].defined()) continue;
      LayerSensitivity ls;
      ls.layer = i;
      ls.name = im.layers[i].name;
      const int k_max = std::min<int>(max_terms, static_cast<int>(im.expansions[i]->terms.size()));
      for (int k = 1; k <= k_max; ++k) {
        if (cancel != nullptr && cancel->load()) return absl::CancelledError("cancelled");
        s_->Set(i, k);
        ls.rel_fro.push_back(s_->ErrorNow());
      }
      s_->Set(i, 0);
      out.push_back(std::move(ls));
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("sensitivity: ", BriefText(e.what())));
  }
  return out;
}

absl::StatusOr<std::vector<Model::LayerSensitivity>> Model::Sensitivity(
    const HostTensor& input, int max_terms, const std::atomic<bool>* cancel) {
  FPX_ASSIGN_OR_RETURN(std::unique_ptr<Prober> p, NewProber(input));
  return p->Sensitivity(max_terms, cancel);
}

absl::Status Model::KeepTerms(const std::vector<int>& terms) {
  Impl& im = *impl_;
  if (im.released) return absl::FailedPreconditionError(kReleasedMessage);
  if (terms.size() != im.layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat("terms for ", terms.size(), " layers; the "
                                                   "model has ", im.layers.size()));
  }
  for (size_t i = 0; i < terms.size(); ++i) {
    if (!im.expansions[i]) continue;
    const int have = static_cast<int>(im.expansions[i]->terms.size());
    if (terms[i] < 1 || terms[i] > have) {
      return absl::InvalidArgumentError(absl::StrCat("layer '", im.layers[i].name, "': keep ",
                                                     terms[i], " terms; accepted 1..", have));
    }
  }
  for (size_t i = 0; i < terms.size(); ++i) {
    if (!im.expansions[i]) continue;
    core::TensorExpansion& e = *im.expansions[i];
    const size_t k = static_cast<size_t>(terms[i]);
    e.terms.resize(k);
    if (e.errors.size() > k) e.errors.resize(k);
    if (im.layers[i].errors.size() > k) im.layers[i].errors.resize(k);
  }
  im.DropNetworks();
  im.current = im.frozen;
  im.kw = im.ka = 0;
  return absl::OkStatus();
}

absl::Status Model::UseParams(const ModelParams& params) {
  if (impl_->released) return absl::FailedPreconditionError(kReleasedMessage);
  Impl& im = *impl_;
  const ModelParams shape = FpParams();
  FPX_RETURN_IF_ERROR(MaxAbsDiff(shape, params).status());
  std::vector<const LayerParams*> by_layer(im.layers.size(), nullptr);
  for (size_t i = 0, j = 0; i < im.layers.size(); ++i) {
    if (im.layers[i].expanded) by_layer[i] = &params.layers[j++];
  }
  auto weight_for = [&](size_t i, int) {
    return FromExpansionLayout(by_layer[i]->weight, im.original_weights[i], im.kinds[i]);
  };
  try {
    FPX_ASSIGN_OR_RETURN(torch::jit::Module m, im.Build(weight_for, 0, 0, /*truncate=*/false));
    // Biases: rewrite the expanded layers' bias constants too.
    std::shared_ptr<torch::jit::Graph> g = ForwardGraph(m);
    std::vector<FoundLayer> found;
    CollectLayers(g->block(), &found);
    for (size_t i = 0; i < found.size(); ++i) {
      if (by_layer[i] == nullptr || by_layer[i]->bias.empty()) continue;
      at::Tensor b = at::empty({static_cast<int64_t>(by_layer[i]->bias.size())}, at::kFloat);
      for (size_t j = 0; j < by_layer[i]->bias.size(); ++j) {
        b.data_ptr<float>()[j] = static_cast<float>(by_layer[i]->bias[j]);
      }
      torch::jit::WithInsertPoint guard(found[i].node);
      found[i].node->replaceInput(2, g->insertConstant(b));
    }
    torch::jit::EliminateDeadCode(g);
    im.current = m;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("cannot build the network: ", Brief(e)));
  }
  im.kw = im.ka = 0;
  return absl::OkStatus();
}


const core::TensorExpansion* Model::expansion(size_t layer) const {
  if (layer >= impl_->expansions.size() || !impl_->expansions[layer]) return nullptr;
  return &*impl_->expansions[layer];
}


std::vector<float> Model::fp_weight(size_t layer) const {
  if (impl_->released || layer >= impl_->original_weights.size()) return {};
  const at::Tensor w = ExpansionLayout(impl_->original_weights[layer], impl_->kinds[layer]);
  return std::vector<float>(w.data_ptr<float>(), w.data_ptr<float>() + w.numel());
}

}  // namespace fpxint::model
