// File: model/model.cc
//
// Serving: precision switching (K_w', K_a'), the forward pass, the packed networks and what they
// hold, and the TorchScript exports.
#include "model/model.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "model/internal/model_impl.h"

namespace fpxint::model {

absl::Status Model::Impl::EnsurePacked(bool wa) {
  std::optional<torch::jit::Module>& slot = wa ? packed_wa : packed;
  if (slot) return absl::OkStatus();
  if (wa && !packed_wa_error.ok()) return packed_wa_error;
  try {
    absl::StatusOr<torch::jit::Module> m = BuildPacked(wa);
    if (!m.ok()) {
      if (wa) packed_wa_error = m.status();
      return m.status();
    }
    slot = *std::move(m);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("cannot build the packed network: ", Brief(e)));
  }
  return absl::OkStatus();
}


absl::Status Model::SetPrecision(int kw, int ka) {
  Impl& im = *impl_;
  const int max_kw = im.spec.weights.terms;
  const int max_ka = im.spec.act_terms;
  if (kw < 0 || kw > max_kw) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight terms: ", kw, "; this expansion has 0..", max_kw));
  }
  if (im.spec.weight_only()) ka = 0;
  if (ka < 0 || ka > max_ka) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation terms: ", ka, "; this expansion has 0..", max_ka));
  }
  const bool wa = ka > 0;
  bool use_packed = false;
  if (im.released) {
    if (kw == 0 || wa != im.current_wa) {
      return absl::FailedPreconditionError(absl::StrCat(
          "this model keeps only its packed network: weight terms 1..", max_kw,
          im.current_wa ? absl::StrCat(" with activation terms 1..", max_ka)
                        : std::string(" without expanded activations"),
          " are served"));
    }
    use_packed = true;
  } else if (im.opts.packed && kw > 0) {
    const absl::Status s = im.EnsurePacked(wa);
    if (s.ok()) {
      use_packed = true;
    } else if (!(wa && absl::IsUnimplemented(s))) {  // else: the dense network serves it
      return s;
    }
  }
  if (use_packed) {
    im.current = wa ? *im.packed_wa : *im.packed;
  } else if (kw == 0 && ka == 0) {
    im.current = im.frozen;
  } else if (auto it = im.built.find({kw, ka}); it != im.built.end()) {
    im.current = it->second;
  } else if (im.opts.max_built_networks > 0 &&
             static_cast<int>(im.built.size()) >= im.opts.max_built_networks) {
    std::vector<std::string> have;
    for (const auto& [k, m] : im.built) have.push_back(absl::StrCat("(", k.first, ",", k.second, ")"));
    return absl::ResourceExhaustedError(absl::StrCat(
        "this model already holds ", im.built.size(), " precisions (K_w', K_a') = ",
        absl::StrJoin(have, " "), ", its limit (--max-precisions); ask for one of them"));
  } else {
    auto weight_for = [&](size_t i, int n) {
      const int k = std::min<int>(n, im.expansions[i]->terms.size());
      return k == 0 ? im.original_weights[i] : im.PartialSum(i, k);
    };
    try {
      FPX_ASSIGN_OR_RETURN(im.current, im.Build(weight_for, kw, ka, im.spec.truncate));
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("cannot build the expanded network: ", Brief(e)));
    }
    im.built.emplace(std::make_pair(kw, ka), im.current);
  }
  im.current_packed = use_packed;
  im.current_wa = use_packed && wa;
  im.kw = kw;
  im.ka = ka;
  return absl::OkStatus();
}


absl::StatusOr<HostTensor> Model::Forward(const HostTensor& in) {
  if (in.numel() != static_cast<int64_t>(in.type == HostTensor::Type::kFloat32 ? in.f32.size()
                                                                               : in.i64.size())) {
    return absl::InvalidArgumentError("input: shape does not match the number of values");
  }
  HostTensor r;
  FPX_RETURN_IF_ERROR(Forward(HostTensorRef::Of(in), [&](absl::Span<const int64_t> shape,
                                                          absl::Span<const float> values) {
    r.shape.assign(shape.begin(), shape.end());
    r.f32.assign(values.begin(), values.end());
    return absl::OkStatus();
  }));
  return r;
}

absl::Status Model::Forward(const HostTensorRef& in, OutputSink sink) {
  const std::vector<int64_t> shape(in.shape.begin(), in.shape.end());
  at::Tensor y;
  try {
    // from_blob borrows the caller's bytes (a graph that works in place on its input writes
    // into them; no caller reads them again).
    at::Tensor x = at::from_blob(const_cast<void*>(in.data), shape,
                                 in.type == HostTensor::Type::kFloat32 ? at::kFloat : at::kLong);
    torch::NoGradGuard no_grad;
    std::vector<c10::IValue> args = {x};
    if (impl_->current_packed) args.emplace_back(static_cast<int64_t>(impl_->kw));
    if (impl_->current_wa) args.emplace_back(static_cast<int64_t>(impl_->ka));
    c10::IValue out = impl_->current.forward(std::move(args));
    if (out.isTuple()) out = out.toTupleRef().elements()[0];
    if (!out.isTensor()) return absl::InternalError("model output is not a tensor");
    y = out.toTensor().contiguous().to(at::kFloat);
  } catch (const std::exception& e) {  // c10::Error and the interpreter's own errors
    const c10::Error* ce = dynamic_cast<const c10::Error*>(&e);
    return absl::InvalidArgumentError(absl::StrCat(
        "input of shape [", absl::StrJoin(shape, ","), "] was rejected by the model (a traced "
        "model keeps the input size it was traced with where it reshapes): ",
        ce ? Brief(*ce) : BriefText(e.what())));
  }
  return sink(y.sizes().vec(),
              absl::Span<const float>(y.data_ptr<float>(), static_cast<size_t>(y.numel())));
}


absl::Status Model::SavePacked(const std::string& path) {
  Impl& im = *impl_;

  bool any = false;
  for (const auto& e : im.expansions) any = any || e.has_value();
  if (!any && !im.packed && !im.packed_wa) {
    return absl::FailedPreconditionError("nothing is expanded yet");
  }
  const bool wa = im.released ? im.current_wa : !im.spec.weight_only();
  if (absl::Status s = im.EnsurePacked(wa); !s.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("this expansion has no packed network: ", s.message()));
  }
  try {
    (wa ? im.packed_wa : im.packed)->save(path);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("cannot save '", path, "': ", Brief(e)));
  }
  return absl::OkStatus();
}


Model::WeightMemory Model::weight_memory() const {
  const Impl& im = *impl_;
  WeightMemory m;
  for (const LayerInfo& l : im.layers) {
    int64_t n = 1;
    for (int64_t d : l.weight_shape) n *= d;
    m.fp32_bytes += static_cast<size_t>(n) * sizeof(float);
    // FP32 unless the layer runs packed (added from the graph below).
    if (!im.current_packed || !l.expanded) m.resident_bytes += static_cast<size_t>(n) * sizeof(float);
  }
  Impl::Routes routes;
  for (const PackedWeightInfo& pw : im.CurrentPackedWeights(&routes)) {
    m.resident_bytes += pw.bytes;
    ++m.packed_layers;
  }
  m.folded_layers = routes.folded;
  m.integer_layers = routes.integer;
  m.fused_post_ops = routes.fused_post;
  m.fused_tail_steps = routes.tail_steps;
  return m;
}


std::string Model::packed_terms_sha256() const {
  if (!impl_->current_packed) return "";
  // The current network's graph constants own the PackedWeight objects the pointers name.
  const std::vector<PackedWeightInfo> weights = impl_->CurrentPackedWeights();
  std::vector<const core::LowbitLinear*> layers;
  for (const PackedWeightInfo& pw : weights) layers.push_back(pw.linear);
  return core::PackedTermsSha256(layers);
}


absl::Status Model::ReleaseAllButPacked() {
  Impl& im = *impl_;
  if (!im.current_packed) {
    return absl::FailedPreconditionError("the packed network is not the current one");
  }
  im.released = true;
  im.frozen = im.current;  // keeps a valid module; SetPrecision only switches the terms now
  (im.current_wa ? im.packed : im.packed_wa).reset();
  im.built.clear();
  for (auto& e : im.expansions) e.reset();
  for (auto& w : im.original_weights) w = at::Tensor();
  for (auto& b : im.original_biases) b = at::Tensor();
  return absl::OkStatus();
}


namespace {

// A copy of `m` whose float32 tensors (the frozen graph's constants, and any parameter or buffer
// left) are in `dtype` ("Half" or "BFloat16", c10's names): an FP16 or BF16 model's export in the
// dtype it came in. The dequantized weights Σ_{k<=K} Ŵ_k are rounded to it once, here.
torch::jit::Module InSourceDtype(const torch::jit::Module& m, const std::string& dtype) {
  const at::ScalarType st = dtype == "Half" ? at::kHalf : at::kBFloat16;
  torch::jit::Module out = m.clone();
  out.to(st);
  std::shared_ptr<torch::jit::Graph> g = ForwardGraph(out);
  std::vector<Node*> constants;
  ForEachNode(g->block(), [&](Node* n) {
    if (n->kind() == c10::prim::Constant && n->outputs().size() == 1 &&
        n->output()->type()->kind() == c10::TypeKind::TensorType) {
      constants.push_back(n);
    }
  });
  for (Node* n : constants) {
    const c10::optional<c10::IValue> v = torch::jit::toIValue(n->output());
    if (!v || !v->isTensor() || v->toTensor().scalar_type() != at::kFloat) continue;
    torch::jit::WithInsertPoint guard(n);
    Value* c = g->insertConstant(v->toTensor().to(st));
    n->output()->replaceAllUsesWith(c);
    n->destroy();
  }
  return out;
}

}  // namespace

absl::Status Model::SaveDequantized(const std::string& path) const {
  if (impl_->released) return absl::FailedPreconditionError(kReleasedMessage);
  if (impl_->ka > 0) {
    return absl::FailedPreconditionError(
        "activations are expanded: the network needs the fpxint op library; save a weight-only "
        "precision (SetPrecision(kw, 0)) for plain LibTorch");
  }
  try {
    if (impl_->source_dtype.empty()) {
      impl_->current.save(path);
    } else {
      InSourceDtype(impl_->current, impl_->source_dtype).save(path);
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("cannot save '", path, "': ", Brief(e)));
  }
  return absl::OkStatus();
}

}  // namespace fpxint::model
