// LibTorch side of the model layer. The only translation unit with TorchScript graph code.
#include "model/model.h"

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/frozen_conv_folding.h>
#include <torch/csrc/jit/passes/graph_rewrite_helper.h>
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <cstdio>
#include <map>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/name_pattern.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "model/act_expand_op.h"
#include "model/lowbit_ops.h"

namespace fpxint::model {

using torch::jit::Node;
using torch::jit::Value;

namespace {

// The line of an exception's message that says what went wrong: TorchScript interpreter errors
// carry a traceback and end in "RuntimeError: ..."; c10::Errors may append a C++ backtrace.
std::string BriefText(const std::string& msg) {
  std::vector<std::string> lines = absl::StrSplit(msg, '\n', absl::SkipWhitespace());
  for (const std::string& l : lines) {
    if (absl::StrContains(l, "Error: ")) return l;
  }
  return lines.empty() ? msg : lines.front();
}
std::string Brief(const c10::Error& e) { return BriefText(e.what_without_backtrace()); }

enum class OpKind { kConv, kLinear, kMatmul };

struct FoundLayer {
  Node* node;
  OpKind kind;
  at::Tensor weight;  // as stored in the graph
};

bool IsConv(Node* n) {
  static const c10::Symbol kinds[] = {
      c10::Symbol::fromQualString("aten::_convolution"), c10::Symbol::fromQualString("aten::conv1d"),
      c10::Symbol::fromQualString("aten::conv2d"), c10::Symbol::fromQualString("aten::conv3d")};
  for (const c10::Symbol& k : kinds) {
    if (n->kind() == k) return true;
  }
  return false;
}

std::optional<at::Tensor> ConstTensor(Value* v) {
  if (v->node()->kind() != c10::prim::Constant) return std::nullopt;
  c10::optional<c10::IValue> iv = torch::jit::toIValue(v);
  if (!iv || !iv->isTensor()) return std::nullopt;
  return iv->toTensor();
}

void CollectLayers(torch::jit::Block* block, std::vector<FoundLayer>* out) {
  static const c10::Symbol kLinear = c10::Symbol::fromQualString("aten::linear");
  static const c10::Symbol kMatmul = c10::Symbol::fromQualString("aten::matmul");
  for (Node* n : block->nodes()) {
    for (torch::jit::Block* b : n->blocks()) CollectLayers(b, out);
    std::optional<OpKind> kind;
    if (IsConv(n)) kind = OpKind::kConv;
    else if (n->kind() == kLinear) kind = OpKind::kLinear;
    else if (n->kind() == kMatmul) kind = OpKind::kMatmul;
    if (!kind || n->inputs().size() < 2) continue;
    std::optional<at::Tensor> w = ConstTensor(n->input(1));
    if (!w || w->scalar_type() != at::kFloat || w->dim() < 2) continue;
    if (*kind == OpKind::kMatmul && w->dim() != 2) continue;
    out->push_back({n, *kind, *w});
  }
}

const char* KindName(OpKind k) {
  switch (k) {
    case OpKind::kConv: return "conv";
    case OpKind::kLinear: return "linear";
    case OpKind::kMatmul: return "matmul";
  }
  return "?";
}

// The weight in expansion layout: output channel first. matmul's [in, out] is transposed.
at::Tensor ExpansionLayout(const at::Tensor& w, OpKind k) {
  at::Tensor t = k == OpKind::kMatmul ? w.t() : w;
  return t.contiguous().to(at::kFloat);
}

at::Tensor FromExpansionLayout(const std::vector<double>& v, const at::Tensor& like, OpKind k) {
  at::Tensor flat = at::empty({static_cast<int64_t>(v.size())}, at::kFloat);
  float* p = flat.data_ptr<float>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<float>(v[i]);
  if (k == OpKind::kMatmul) return flat.reshape({like.size(1), like.size(0)}).t().contiguous();
  return flat.reshape(like.sizes());
}

// The finest dynamic activation scale that still factors out of the layer's integer product.
ActGranularity ActGranularityFor(const FoundLayer& f, ModelExpansionSpec::ActScale scale) {
  if (scale == ModelExpansionSpec::ActScale::kTensor) return ActGranularity::kTensor;
  if (f.kind != OpKind::kConv) return ActGranularity::kRow;
  static const c10::Symbol kConv2d = c10::Symbol::fromQualString("aten::conv2d");
  if (f.node->kind() != kConv2d || f.weight.dim() != 4 || f.node->inputs().size() < 7) {
    return ActGranularity::kTensor;
  }
  const c10::optional<c10::IValue> groups = torch::jit::toIValue(f.node->input(6));
  const int64_t g = groups && groups->isInt() ? groups->toInt() : 1;
  if (g > 1 && g == f.weight.size(0) && f.weight.size(1) == 1) return ActGranularity::kChannel;
  if (g == 1 && f.weight.size(2) == 1 && f.weight.size(3) == 1) return ActGranularity::kPixel;
  return ActGranularity::kTensor;
}

torch::jit::Module CloneModule(const torch::jit::Module& m) { return m.clone(); }

std::shared_ptr<torch::jit::Graph> ForwardGraph(torch::jit::Module& m) {
  return m.get_method("forward").graph();
}

}  // namespace

constexpr char kReleasedMessage[] =
    "this model keeps only its packed network (ReleaseAllButPacked): FP weights and expansions "
    "are gone";

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
  int kw = 0, ka = 0;

  // Clones the frozen module and rewrites every expanded layer with `weight_for(i, n)` (layer i's
  // weight from its first n terms; n = kw) and, when ka > 0, an activation expansion of its input:
  // one product with Σ_j X_j, or, order-truncated, Σ_j (Σ_{i <= min(kw, K+1-j)} W_i) X_j with
  // K = max(kw, ka), the bias added once (in the j = 1 product).
  absl::StatusOr<torch::jit::Module> Build(
      const std::function<at::Tensor(size_t, int)>& weight_for, int kw, int ka,
      bool truncate) const {
    torch::jit::Module m = CloneModule(frozen);
    std::shared_ptr<torch::jit::Graph> g = ForwardGraph(m);
    std::vector<FoundLayer> found;
    CollectLayers(g->block(), &found);
    if (found.size() != layers.size()) {
      return absl::InternalError("layer discovery differs between the frozen model and its clone");
    }
    static const c10::Symbol kAdd = c10::Symbol::fromQualString("aten::add");
    for (size_t i = 0; i < found.size(); ++i) {
      if (!layers[i].expanded) continue;
      Node* n = found[i].node;
      torch::jit::WithInsertPoint guard(n);
      const auto granularity = static_cast<int64_t>(ActGranularityFor(found[i], spec.act_scale));
      if (ka > 0 && truncate) {
        Value* list = g->insert(c10::Symbol::fromQualString(kActExpandTermsOp),
                                {n->input(0), static_cast<int64_t>(spec.act_bits),
                                 static_cast<int64_t>(ka), static_cast<int64_t>(spec.act_grid),
                                 granularity, spec.unsigned_first});
        Node* unpack = g->insertNode(g->createListUnpack(list, static_cast<size_t>(ka)));
        const int k_max = std::max(kw, ka);
        Value* sum = nullptr;
        for (int j = 1; j <= ka; ++j) {
          const int nw = std::min(kw, k_max + 1 - j);
          // Operands first: nodes are inserted in order just before n.
          Value* w = g->insertConstant(weight_for(i, nw));
          Value* no_bias = j > 1 && found[i].kind != OpKind::kMatmul && n->inputs().size() > 2
                               ? g->insertConstant(c10::IValue())
                               : nullptr;
          Node* c = g->createClone(n, [](Value* v) { return v; });
          c->replaceInput(0, unpack->output(static_cast<size_t>(j - 1)));
          c->replaceInput(1, w);
          if (no_bias != nullptr) c->replaceInput(2, no_bias);
          g->insertNode(c);
          if (sum == nullptr) {
            sum = c->output();
          } else {  // aten::add.Tensor(self, other, alpha=1), created explicitly (no overload search)
            Node* add = g->create(kAdd, {sum, c->output(), g->insertConstant(1)});
            add->output()->setType(c->output()->type());
            sum = g->insertNode(add)->output();
          }
        }
        n->output()->replaceAllUsesWith(sum);
        continue;
      }
      n->replaceInput(1, g->insertConstant(weight_for(i, kw)));
      if (ka > 0) {
        Value* xq = g->insert(c10::Symbol::fromQualString(kActExpandOp),
                              {n->input(0), static_cast<int64_t>(spec.act_bits),
                               static_cast<int64_t>(ka), static_cast<int64_t>(spec.act_grid),
                               granularity, spec.unsigned_first});
        n->replaceInput(0, xq);
      }
    }
    torch::jit::EliminateDeadCode(g);
    return m;
  }

  // Clones the frozen module and swaps every expanded layer for the fpxint ops on its packed
  // terms. Weight-only (wa = false): linear and matmul -> fpxint::linear, conv2d ->
  // fpxint::conv2d, other convolutions take their weight from fpxint::dequantize; forward(x,
  // terms: int = 0). With expanded activations (wa): linear and matmul -> fpxint::linear_wa,
  // ungrouped conv2d with per-pixel (1x1) or per-tensor (stride 1) activation scales ->
  // fpxint::conv2d_wa (integer kernels), other layers fpxint::dequantize + fpxint::act_expand;
  // forward(x, terms: int = 0, act_terms: int = K_a). Unimplemented when an order-truncated
  // spec has a layer the integer ops do not take (the dequantized network then serves it).
  absl::StatusOr<torch::jit::Module> BuildPacked(bool wa) const {
    static const c10::Symbol kConv2d = c10::Symbol::fromQualString("aten::conv2d");
    torch::jit::Module m = CloneModule(frozen);
    std::shared_ptr<torch::jit::Graph> g = ForwardGraph(m);
    std::vector<FoundLayer> found;
    CollectLayers(g->block(), &found);
    if (found.size() != layers.size()) {
      return absl::InternalError("layer discovery differs between the frozen model and its clone");
    }
    Value* terms = g->addInput("terms");
    terms->setType(c10::IntType::get());
    Value* act_terms = nullptr;
    if (wa) {
      act_terms = g->addInput("act_terms");
      act_terms->setType(c10::IntType::get());
    }
    for (size_t i = 0; i < found.size(); ++i) {
      if (!layers[i].expanded) continue;
      Node* n = found[i].node;
      FPX_ASSIGN_OR_RETURN(core::LowbitLinear lw, core::LowbitLinear::FromExpansion(*expansions[i]));
      const at::Tensor& w = found[i].weight;
      std::vector<int64_t> shape = w.sizes().vec();
      if (found[i].kind == OpKind::kMatmul) shape = {w.size(1), w.size(0)};
      torch::jit::WithInsertPoint guard(n);
      const c10::IValue packed_weight = MakePackedWeight(std::move(lw), shape);
      Value* pw = g->insertConstant(packed_weight);
      const bool is_conv2d = n->kind() == kConv2d && n->inputs().size() == 7 &&
                             n->input(4)->type()->kind() == c10::TypeKind::ListType;
      Value* bias = found[i].kind == OpKind::kLinear && n->inputs().size() > 2
                        ? n->input(2)
                        : found[i].kind == OpKind::kConv ? n->input(2)
                                                         : g->insertConstant(c10::IValue());
      Value* y = nullptr;
      if (!wa) {
        if (found[i].kind != OpKind::kConv) {
          y = g->insert(c10::Symbol::fromQualString(kLinearOp), {n->input(0), pw, bias, terms});
        } else if (is_conv2d) {
          y = g->insert(c10::Symbol::fromQualString(kConv2dOp),
                        {n->input(0), pw, bias, n->input(3), n->input(4), n->input(5),
                         n->input(6), terms});
        } else {
          n->replaceInput(1, g->insert(c10::Symbol::fromQualString(kDequantizeOp), {pw, terms}));
          continue;
        }
      } else {
        const ActGranularity gran = ActGranularityFor(found[i], spec.act_scale);
        const bool int_weights = spec.act_grid == core::Grid::kSym && TakesIntegerOps(packed_weight);
        bool int_conv = false;
        if (is_conv2d && int_weights) {
          const c10::optional<c10::IValue> groups = torch::jit::toIValue(n->input(6));
          const c10::optional<c10::IValue> stride = torch::jit::toIValue(n->input(3));
          const c10::optional<c10::IValue> padding = torch::jit::toIValue(n->input(4));
          bool stride1 = stride && stride->isIntList(), pad0 = padding && padding->isIntList();
          if (stride1) {
            for (int64_t v : stride->toIntVector()) stride1 = stride1 && v == 1;
          }
          if (pad0) {
            for (int64_t v : padding->toIntVector()) pad0 = pad0 && v == 0;
          }
          // k×k kernels: im2col repeats every input value k² times, so expanding the patches
          // costs k² times expanding x once; they take the integer op only when truncation
          // needs it, else fpxint::act_expand on x and the packed weight-only convolution.
          const bool pointwise = found[i].weight.size(2) == 1 && found[i].weight.size(3) == 1;
          int_conv = groups && groups->isInt() && groups->toInt() == 1 &&
                     ((gran == ActGranularity::kPixel && pad0) ||
                      (gran == ActGranularity::kTensor && stride1 && (pointwise || spec.truncate)));
        }
        const std::vector<torch::jit::NamedValue> act_args = {
            static_cast<int64_t>(spec.act_bits), act_terms, spec.unsigned_first, spec.truncate,
            static_cast<int64_t>(gran)};
        if (found[i].kind != OpKind::kConv && int_weights) {
          std::vector<torch::jit::NamedValue> args = {n->input(0), pw, bias, terms};
          args.insert(args.end(), act_args.begin(), act_args.end());
          y = g->insert(c10::Symbol::fromQualString(kLinearWaOp), args);
        } else if (int_conv) {
          std::vector<torch::jit::NamedValue> args = {n->input(0), pw, bias, n->input(3),
                                                      n->input(4), n->input(5), n->input(6), terms};
          args.insert(args.end(), act_args.begin(), act_args.end());
          y = g->insert(c10::Symbol::fromQualString(kConv2dWaOp), args);
        } else if (!spec.truncate) {
          // Σ_i W_i ⊛ Σ_j X_j: the weight-only packed op (or the dequantized weight sum) on the
          // activation's expansion.
          Value* xq = g->insert(c10::Symbol::fromQualString(kActExpandOp),
                                {n->input(0), static_cast<int64_t>(spec.act_bits), act_terms,
                                 static_cast<int64_t>(spec.act_grid), static_cast<int64_t>(gran),
                                 spec.unsigned_first});
          if (found[i].kind != OpKind::kConv) {
            y = g->insert(c10::Symbol::fromQualString(kLinearOp), {xq, pw, bias, terms});
          } else if (is_conv2d) {
            y = g->insert(c10::Symbol::fromQualString(kConv2dOp),
                          {xq, pw, bias, n->input(3), n->input(4), n->input(5), n->input(6), terms});
          } else {
            n->replaceInput(1, g->insert(c10::Symbol::fromQualString(kDequantizeOp), {pw, terms}));
            n->replaceInput(0, xq);
            continue;
          }
        } else {
          return absl::UnimplementedError(absl::StrCat(
              "layer '", layers[i].name, "': order-truncated W×A products run on the integer "
              "ops only (sym weights with one scale per row; ungrouped conv2d with per-pixel or "
              "stride-1 per-tensor activation scales)"));
        }
      }
      y->setType(n->output()->type());
      n->output()->replaceAllUsesWith(y);
    }
    torch::jit::EliminateDeadCode(g);
    auto& fn = torch::jit::toGraphFunction(m.get_method("forward").function());
    std::vector<c10::Argument> args = fn.getSchema().arguments();
    args.emplace_back("terms", c10::IntType::get(), c10::nullopt, c10::IValue(int64_t{0}));
    if (wa) {
      args.emplace_back("act_terms", c10::IntType::get(), c10::nullopt,
                        c10::IValue(static_cast<int64_t>(spec.act_terms)));
    }
    fn.setSchema(fn.getSchema().cloneWithArguments(std::move(args)));
    return m;
  }

  // A network saved by SavePacked: its PackedWeight constants become the layers, the network
  // runs as it is (forward(x, terms[, act_terms])), and nothing can be re-expanded. False when
  // the graph holds no PackedWeight.
  bool AdoptPackedNetwork() {
    std::shared_ptr<torch::jit::Graph> g = ForwardGraph(frozen);
    const size_t inputs = g->inputs().size();  // self, x, terms[, act_terms]
    if (inputs != 3 && inputs != 4) return false;
    int max_terms = 0;
    for (Node* n : g->nodes()) {
      if (n->kind() != c10::prim::Constant || n->outputs().size() != 1) continue;
      const c10::optional<c10::IValue> v = torch::jit::toIValue(n->output());
      if (!v) continue;
      const PackedWeightInfo pw = InspectPackedWeight(*v);
      if (pw.terms == 0) continue;
      LayerInfo info;
      info.name = n->output()->debugName();
      info.op = "packed";
      info.weight_shape = pw.shape;
      info.expanded = true;
      layers.push_back(std::move(info));
      kinds.push_back(OpKind::kLinear);
      max_terms = std::max(max_terms, pw.terms);
    }
    if (layers.empty()) return false;
    if (inputs == 4) {  // K_a is act_terms' default
      const c10::FunctionSchema& schema = frozen.get_method("forward").function().getSchema();
      const c10::Argument& a = schema.arguments().back();
      if (a.name() != "act_terms" || !a.default_value() || !a.default_value()->isInt()) {
        return false;
      }
      spec.act_terms = static_cast<int>(a.default_value()->toInt());
      spec.act_bits = 1;  // unknown here; marks the spec as W×A
      current_wa = true;
      ka = spec.act_terms;
    }
    expansions.resize(layers.size());
    original_weights.resize(layers.size());
    original_biases.resize(layers.size());
    spec.weights.terms = max_terms;
    (current_wa ? packed_wa : packed) = frozen;
    current = frozen;
    current_packed = true;
    released = true;
    kw = max_terms;
    return true;
  }

  // Forgets the current expansion and the networks built from it; `spec` becomes the model's.
  absl::Status ResetExpansion(const ModelExpansionSpec& s) {
    if (released) {
      return absl::FailedPreconditionError("this model keeps only its packed network (released)");
    }
    spec = s;
    built.clear();  // networks of the previous expansion
    packed.reset();
    packed_wa.reset();
    packed_wa_error = absl::OkStatus();
    current_packed = current_wa = false;
    for (LayerInfo& l : layers) l.errors.clear();
    for (auto& e : expansions) e.reset();
    return absl::OkStatus();
  }

  // The PackedWeight constants of the current network, in graph order (= layer order: each is
  // inserted just before its layer).
  std::vector<PackedWeightInfo> CurrentPackedWeights() const {
    std::vector<PackedWeightInfo> out;
    if (!current_packed) return out;
    torch::jit::Module cur = current;
    std::function<void(torch::jit::Block*)> walk = [&](torch::jit::Block* b) {
      for (Node* n : b->nodes()) {
        for (torch::jit::Block* sub : n->blocks()) walk(sub);
        if (n->kind() != c10::prim::Constant || n->outputs().size() != 1) continue;
        const c10::optional<c10::IValue> v = torch::jit::toIValue(n->output());
        if (!v) continue;
        if (PackedWeightInfo pw = InspectPackedWeight(*v); pw.terms > 0) out.push_back(pw);
      }
    };
    walk(ForwardGraph(cur)->block());
    return out;
  }

  // The packed network of this kind, built on first use.
  absl::Status EnsurePacked(bool wa) {
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

  at::Tensor PartialSum(size_t i, int k) const {
    return FromExpansionLayout(core::Reconstruct(*expansions[i], k), original_weights[i], kinds[i]);
  }

  std::vector<at::Tensor> original_weights;
  std::vector<at::Tensor> original_biases;  // undefined when the layer has none

  LayerParams FpLayer(size_t i) const {
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
};

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& path, const Options& o) {
  EnsureActExpandOpRegistered();
  EnsureLowbitOpsRegistered();
  at::set_num_threads(std::max(1, o.threads));
  auto impl = std::make_unique<Impl>();
  impl->opts = o;
  try {
    torch::jit::Module m = torch::jit::load(path);
    m.eval();
    impl->frozen = torch::jit::freeze(m);
  } catch (const c10::Error& e) {
    std::string msg = Brief(e);
    if (absl::StrContains(msg, "classes.fpxint") || absl::StrContains(msg, "fpxint::")) {
      return absl::FailedPreconditionError(absl::StrCat(
          "'", path, "' uses fpxint's packed-weight ops, which are not registered in this "
          "process: load the fpxint op library first (link fpxint_model, or in Python "
          "torch.ops.load_library('libfpxint_ops.so')): ", msg));
    }
    if (msg.find("open file failed") != std::string::npos ||
        msg.find("No such file") != std::string::npos) {
      return absl::NotFoundError(absl::StrCat("cannot open model '", path, "': ", msg));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "' is not a loadable TorchScript model: ", msg));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "' is not a loadable TorchScript model: ", e.what()));
  }
  std::shared_ptr<torch::jit::Graph> g = ForwardGraph(impl->frozen);
  // freeze() already folds conv+BN for aten::conv2d; traced graphs use aten::_convolution, so
  // rewrite those first and fold again.
  torch::jit::graph_rewrite_helper::replaceConvolutionWithAtenConv(g);
  torch::jit::FoldFrozenConvBatchnorm(g);
  torch::jit::EliminateDeadCode(g);
  std::vector<FoundLayer> found;
  CollectLayers(g->block(), &found);
  if (found.empty() && impl->AdoptPackedNetwork()) return std::unique_ptr<Model>(new Model(std::move(impl)));
  if (found.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "'", path, "' has no layer to expand: expected aten::linear, a convolution or "
        "aten::matmul with a constant float weight of rank >= 2"));
  }
  for (const FoundLayer& f : found) {
    LayerInfo info;
    info.name = f.node->input(1)->debugName();
    info.op = KindName(f.kind);
    info.weight_shape = f.weight.sizes().vec();
    info.has_bias = f.kind != OpKind::kMatmul && f.node->inputs().size() > 2 &&
                    ConstTensor(f.node->input(2)).has_value();
    impl->layers.push_back(std::move(info));
    impl->kinds.push_back(f.kind);
    impl->original_weights.push_back(f.weight.clone());
    std::optional<at::Tensor> b;
    if (f.kind != OpKind::kMatmul && f.node->inputs().size() > 2) b = ConstTensor(f.node->input(2));
    impl->original_biases.push_back(b ? b->clone() : at::Tensor());
  }
  impl->expansions.resize(found.size());
  impl->current = impl->frozen;
  return std::unique_ptr<Model>(new Model(std::move(impl)));
}

const std::vector<LayerInfo>& Model::layers() const { return impl_->layers; }
const ModelExpansionSpec& Model::spec() const { return impl_->spec; }

absl::Status Model::Expand(const ModelExpansionSpec& spec, core::ThreadPool* pool) {
  return Expand(spec, pool, ExpandHooks());
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
  try {
    at::Tensor x = in.type == HostTensor::Type::kFloat32
                       ? at::from_blob(const_cast<float*>(in.f32.data()), in.shape, at::kFloat)
                       : at::from_blob(const_cast<int64_t*>(in.i64.data()), in.shape, at::kLong);
    torch::NoGradGuard no_grad;
    std::vector<c10::IValue> args = {x};
    if (impl_->current_packed) args.emplace_back(static_cast<int64_t>(impl_->kw));
    if (impl_->current_wa) args.emplace_back(static_cast<int64_t>(impl_->ka));
    c10::IValue out = impl_->current.forward(std::move(args));
    if (out.isTuple()) out = out.toTupleRef().elements()[0];
    if (!out.isTensor()) return absl::InternalError("model output is not a tensor");
    at::Tensor y = out.toTensor().contiguous().to(at::kFloat);
    HostTensor r;
    r.shape = y.sizes().vec();
    r.f32.assign(y.data_ptr<float>(), y.data_ptr<float>() + y.numel());
    return r;
  } catch (const std::exception& e) {  // c10::Error and the interpreter's own errors
    const c10::Error* ce = dynamic_cast<const c10::Error*>(&e);
    return absl::InvalidArgumentError(absl::StrCat(
        "input of shape [", absl::StrJoin(in.shape, ","), "] was rejected by the model (a traced "
        "model keeps the input size it was traced with where it reshapes): ",
        ce ? Brief(*ce) : BriefText(e.what())));
  }
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
  for (const PackedWeightInfo& pw : im.CurrentPackedWeights()) {
    m.resident_bytes += pw.bytes;
    ++m.packed_layers;
  }
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

absl::Status Model::SaveDequantized(const std::string& path) const {
  if (impl_->released) return absl::FailedPreconditionError(kReleasedMessage);
  if (impl_->ka > 0) {
    return absl::FailedPreconditionError(
        "activations are expanded: the network needs the fpxint op library; save a weight-only "
        "precision (SetPrecision(kw, 0)) for plain LibTorch");
  }
  try {
    impl_->current.save(path);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("cannot save '", path, "': ", Brief(e)));
  }
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
