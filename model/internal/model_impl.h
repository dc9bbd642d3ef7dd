// File: model/internal/model_impl.h
//
// The model layer's private state (Model::Impl) and the TorchScript graph helpers its .cc files
// share. Only model/*.cc include it: LibTorch stays out of every public header.
#ifndef FPXINT_MODEL_INTERNAL_MODEL_IMPL_H_
#define FPXINT_MODEL_INTERNAL_MODEL_IMPL_H_

#include <torch/csrc/jit/ir/ir.h>
#include <torch/script.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/act_expand_op.h"
#include "model/lowbit_ops.h"
#include "model/model.h"

namespace fpxint::model {
namespace internal {

using torch::jit::Node;
using torch::jit::Value;

// The line of an exception's message that says what went wrong: TorchScript interpreter errors
// carry a traceback and end in "RuntimeError: ..."; c10::Errors may append a C++ backtrace.
std::string BriefText(const std::string& msg);
std::string Brief(const c10::Error& e);

enum class OpKind { kConv, kLinear, kMatmul };

struct FoundLayer {
  Node* node;
  OpKind kind;
  at::Tensor weight;  // as stored in the graph
};

// The layers with a constant float weight (rank >= 2; matmul: exactly 2), in graph order.
void CollectLayers(torch::jit::Block* block, std::vector<FoundLayer>* out);
std::optional<at::Tensor> ConstTensor(Value* v);
const char* KindName(OpKind k);
// The weight in expansion layout: output channel first. matmul's [in, out] is transposed.
at::Tensor ExpansionLayout(const at::Tensor& w, OpKind k);
at::Tensor FromExpansionLayout(const std::vector<double>& v, const at::Tensor& like, OpKind k);
// The finest dynamic activation scale that still factors out of the layer's integer product.
ActGranularity ActGranularityFor(const FoundLayer& f, ModelExpansionSpec::ActScale scale);
torch::jit::Module CloneModule(const torch::jit::Module& m);
std::shared_ptr<torch::jit::Graph> ForwardGraph(torch::jit::Module& m);
// Whether `v` is a constant int list whose every element is `value` (a convolution's stride or
// padding).
bool ConstIntsAll(Value* v, int64_t value);
// Every node of `block` and of the blocks nested in it, inner blocks first. `fn` may not remove
// nodes (collect them and remove afterwards).
void ForEachNode(torch::jit::Block* block, const std::function<void(Node*)>& fn);

inline constexpr char kReleasedMessage[] =
    "this model keeps only its packed network (ReleaseAllButPacked): FP weights and expansions "
    "are gone";

}  // namespace internal

// The model layer's .cc files use the helpers unqualified.
using internal::ActGranularityFor;
using internal::Brief;
using internal::BriefText;
using internal::CloneModule;
using internal::CollectLayers;
using internal::ConstIntsAll;
using internal::ConstTensor;
using internal::ExpansionLayout;
using internal::ForEachNode;
using internal::ForwardGraph;
using internal::FoundLayer;
using internal::FromExpansionLayout;
using internal::KindName;
using internal::kReleasedMessage;
using internal::OpKind;
using torch::jit::Node;
using torch::jit::Value;

struct Model::Impl {
  torch::jit::Module frozen;   // frozen, BatchNorm folded; never modified after Load
  torch::jit::Module current;  // what Forward runs
  // Networks already built by SetPrecision, by (kw, ka). Building clones the module, and every
  // clone adds class types to the shared TorchScript compilation unit that are never freed, so
  // switching precision per request (any-precision serving) must reuse them, not rebuild. At
  // most K_w × (K_a + 1) entries; cleared when the expansion changes.
  std::map<std::pair<int, int>, torch::jit::Module> built;
  Options opts;
  // The packed networks (built once per expansion): weight-only, forward(x, terms), and W×A,
  // forward(x, terms, act_terms); which one is current.
  std::optional<torch::jit::Module> packed, packed_wa;
  absl::Status packed_wa_error;  // why the W×A network cannot be built (then: dense)
  bool current_packed = false, current_wa = false;
  bool released = false;  // ReleaseAllButPacked: only the packed network is left
  std::vector<OpKind> kinds;
  std::vector<LayerInfo> layers;
  ModelExpansionSpec spec;
  std::vector<std::optional<core::TensorExpansion>> expansions;
  std::vector<at::Tensor> original_weights;
  std::vector<at::Tensor> original_biases;  // undefined when the layer has none
  int kw = 0, ka = 0;
  // The dtype of the archive's floating parameters when it was not float32 ("Half",
  // "BFloat16"): such a model is converted to float32 at load, expanded and run in it.
  std::string source_dtype;
  int64_t token_vocabulary = 0;  // Model::token_vocabulary

  // A clone of the frozen module, its forward graph and its layers (the same as `layers`, in
  // order; Internal when discovery differs), for the rewrites below to change.
  struct Clone {
    torch::jit::Module module;
    std::shared_ptr<torch::jit::Graph> graph;
    std::vector<FoundLayer> found;
  };
  absl::StatusOr<Clone> CloneLayers() const;

  // Clones the frozen module and rewrites every expanded layer with `weight_for(i, n)` (layer i's
  // weight from its first n terms; n = kw) and, when ka > 0, an activation expansion of its input:
  // one product with Σ_j X_j, or, order-truncated, Σ_j (Σ_{i <= min(kw, K+1-j)} W_i) X_j with
  // K = max(kw, ka), the bias added once (in the j = 1 product).
  absl::StatusOr<torch::jit::Module> Build(
      const std::function<at::Tensor(size_t, int)>& weight_for, int kw, int ka,
      bool truncate) const;

  // Clones the frozen module and swaps every expanded layer for the fpxint ops on its packed
  // terms. Weight-only (wa = false): linear and matmul -> fpxint::linear, conv2d ->
  // fpxint::conv2d, other convolutions take their weight from fpxint::dequantize; forward(x,
  // terms: int = 0). With expanded activations (wa): linear and matmul -> fpxint::linear_wa,
  // ungrouped conv2d with per-pixel (1x1) or per-tensor (stride 1) activation scales ->
  // fpxint::conv2d_wa (integer kernels), other layers fpxint::dequantize + fpxint::act_expand;
  // a ReLU or hardswish that alone uses such an integer or folded layer runs in its epilogue
  // (the ops' `post` argument); when the spec folds (ModelExpansionSpec::Folds), linear, matmul and 1x1 convolutions whose codes fold ->
  // fpxint::linear_folded / conv2d_folded;
  // forward(x, terms: int = 0, act_terms: int = K_a). Unimplemented when an order-truncated
  // spec has a layer the integer ops do not take (the dequantized network then serves it).
  absl::StatusOr<torch::jit::Module> BuildPacked(bool wa) const;
  // The folded op for layer `n` (BuildPacked), inserted before it; nullptr when the spec, the
  // layer's kind and activation scales, or its codes do not fold.
  torch::jit::Value* InsertFolded(torch::jit::Graph& g, torch::jit::Node* n, const FoundLayer& f,
                                  ActGranularity gran, torch::jit::Value* pw,
                                  const c10::IValue& packed_weight, torch::jit::Value* bias,
                                  torch::jit::Value* terms, torch::jit::Value* act_terms,
                                  bool is_conv2d, int64_t post) const;

  // A network saved by SavePacked: its PackedWeight constants become the layers, the network
  // runs as it is (forward(x, terms[, act_terms])), and nothing can be re-expanded. False when
  // the graph holds no PackedWeight.
  bool AdoptPackedNetwork();

  // Forgets the current expansion and the networks built from it; `spec` becomes the model's.
  absl::Status ResetExpansion(const ModelExpansionSpec& s);
  // Drops the networks built from the expansion (dense precisions, packed networks).
  void DropNetworks();

  // The PackedWeight constants of the current network, in graph order (= layer order: each is
  // inserted just before its layer).
  // With `routes`, also counts the current network's W×A op calls: folded (linear_folded,
  // conv2d_folded), separate integer term products (linear_wa, conv2d_wa), and of those the
  // ones that apply the layer's following ReLU / hardswish in their epilogue (post != 0), and
  // the elementwise tail steps after packed layers (in those epilogues or in fpxint::post_).
  struct Routes {
    int folded = 0, integer = 0, fused_post = 0, tail_steps = 0;
  };
  std::vector<PackedWeightInfo> CurrentPackedWeights(Routes* routes = nullptr) const;

  // The packed network of this kind, built on first use.
  absl::Status EnsurePacked(bool wa);

  // Layer i's weight from its first k terms, in the graph's layout.
  at::Tensor PartialSum(size_t i, int k) const;
  // Layer i's FP weight (expansion layout) and bias.
  LayerParams FpLayer(size_t i) const;
};

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_INTERNAL_MODEL_IMPL_H_
