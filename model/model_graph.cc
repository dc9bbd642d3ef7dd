// File: model/model_graph.cc
//
// The graph rewrites of the model layer: layer discovery, the expanded networks (dense weights
// with activation expansion) and the packed networks on the fpxint ops, and adopting a saved one.
#include "model/model.h"

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include <algorithm>
#include <iterator>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/int_linear.h"
#include "core/status_macros.h"
#include "model/internal/model_impl.h"

namespace fpxint::model {

namespace internal {

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

// The finest dynamic activation scale that still factors out of the layer's integer product,
// and never coarser than one sample (so that batching does not change a sample's result).
ActGranularity ActGranularityFor(const FoundLayer& f, ModelExpansionSpec::ActScale scale) {
  if (scale == ModelExpansionSpec::ActScale::kTensor) return ActGranularity::kTensor;
  if (f.kind != OpKind::kConv) return ActGranularity::kRow;
  static const c10::Symbol kConv2d = c10::Symbol::fromQualString("aten::conv2d");
  if (f.node->kind() != kConv2d || f.weight.dim() != 4 || f.node->inputs().size() < 7) {
    return ActGranularity::kSample;
  }
  const c10::optional<c10::IValue> groups = torch::jit::toIValue(f.node->input(6));
  const int64_t g = groups && groups->isInt() ? groups->toInt() : 1;
  if (g > 1 && g == f.weight.size(0) && f.weight.size(1) == 1) return ActGranularity::kChannel;
  if (g == 1 && f.weight.size(2) == 1 && f.weight.size(3) == 1) return ActGranularity::kPixel;
  return ActGranularity::kSample;
}

torch::jit::Module CloneModule(const torch::jit::Module& m) { return m.clone(); }

bool ConstIntsAll(Value* v, int64_t value) {
  const c10::optional<c10::IValue> c = torch::jit::toIValue(v);
  if (!c || !c->isIntList()) return false;
  for (int64_t x : c->toIntVector()) {
    if (x != value) return false;
  }
  return true;
}

void ForEachNode(torch::jit::Block* block, const std::function<void(Node*)>& fn) {
  for (Node* n : block->nodes()) {
    for (torch::jit::Block* sub : n->blocks()) ForEachNode(sub, fn);
    fn(n);
  }
}

std::shared_ptr<torch::jit::Graph> ForwardGraph(torch::jit::Module& m) {
  return m.get_method("forward").graph();
}

}  // namespace internal

absl::StatusOr<Model::Impl::Clone> Model::Impl::CloneLayers() const {
  Clone c;
  c.module = CloneModule(frozen);
  c.graph = ForwardGraph(c.module);
  CollectLayers(c.graph->block(), &c.found);
  if (c.found.size() != layers.size()) {
    return absl::InternalError("layer discovery differs between the frozen model and its clone");
  }
  return c;
}

absl::StatusOr<torch::jit::Module> Model::Impl::Build(
    const std::function<at::Tensor(size_t, int)>& weight_for, int kw, int ka,
    bool truncate) const {
  FPX_ASSIGN_OR_RETURN(Clone c, CloneLayers());
  torch::jit::Module& m = c.module;
  const std::shared_ptr<torch::jit::Graph>& g = c.graph;
  const std::vector<FoundLayer>& found = c.found;
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
                               granularity, spec.unsigned_first,
                               static_cast<int64_t>(spec.act_variant)});
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
                             granularity, spec.unsigned_first,
                             static_cast<int64_t>(spec.act_variant)});
      n->replaceInput(0, xq);
    }
  }
  torch::jit::EliminateDeadCode(g);
  return m;
}

Value* Model::Impl::InsertFolded(torch::jit::Graph& g, Node* n, const FoundLayer& f,
                                 ActGranularity gran, Value* pw, const c10::IValue& packed_weight,
                                 Value* bias, Value* terms, Value* act_terms, bool is_conv2d,
                                 int64_t post) const {
  if (!spec.Folds()) return nullptr;
  const std::vector<torch::jit::NamedValue> act_args = {static_cast<int64_t>(spec.act_bits),
                                                        act_terms, post};
  if (f.kind != OpKind::kConv && gran == ActGranularity::kRow) {
    if (!TakesFoldedOps(packed_weight)) return nullptr;
    std::vector<torch::jit::NamedValue> args = {n->input(0), pw, bias, terms};
    args.insert(args.end(), act_args.begin(), act_args.end());
    return g.insert(c10::Symbol::fromQualString(kLinearFoldedOp), args);
  }
  // Per pixel: 1x1, groups 1.
  if (!is_conv2d || gran != ActGranularity::kPixel || !ConstIntsAll(n->input(4), 0) ||
      !TakesFoldedOps(packed_weight)) {
    return nullptr;
  }
  std::vector<torch::jit::NamedValue> args = {n->input(0), pw,          bias,        n->input(3),
                                              n->input(4), n->input(5), n->input(6), terms};
  args.insert(args.end(), act_args.begin(), act_args.end());
  return g.insert(c10::Symbol::fromQualString(kConv2dFoldedOp), args);
}

namespace {

// The node that is the only use of layer `n`'s output when it is a ReLU or hardswish of that
// output alone, with its core::PostOp in `post`; nullptr (post 0) otherwise.
Node* FusablePost(Node* n, int64_t* post) {
  static const c10::Symbol kRelu = c10::Symbol::fromQualString("aten::relu");
  static const c10::Symbol kRelu_ = c10::Symbol::fromQualString("aten::relu_");
  static const c10::Symbol kHardswish = c10::Symbol::fromQualString("aten::hardswish");
  static const c10::Symbol kHardswish_ = c10::Symbol::fromQualString("aten::hardswish_");
  *post = 0;
  if (n->outputs().size() != 1 || n->output()->uses().size() != 1) return nullptr;
  Node* u = n->output()->uses()[0].user;
  if (u->inputs().size() != 1 || u->outputs().size() != 1 || u->owningBlock() != n->owningBlock()) {
    return nullptr;
  }
  if (u->kind() == kRelu || u->kind() == kRelu_) {
    *post = static_cast<int64_t>(core::PostOp::kRelu);
  } else if (u->kind() == kHardswish || u->kind() == kHardswish_) {
    *post = static_cast<int64_t>(core::PostOp::kHardswish);
  } else {
    return nullptr;
  }
  return u;
}

}  // namespace

// ---- Elementwise tails: the ops after a packed layer, in its epilogue or one fpxint::post_ ----

// A one-value operand LibTorch applies as a float32 scalar to a float32 tensor without changing
// its dtype or shape: a number, a float32 tensor of one value and at most one dimension, or a
// 0-dim float64 tensor (TensorIterator casts it to float32).
bool FloatOperand(Value* v, float* out) {
  const c10::optional<c10::IValue> c = torch::jit::toIValue(v);
  if (!c) return false;
  if (c->isDouble() || c->isInt()) {
    *out = static_cast<float>(c->isDouble() ? c->toDouble() : static_cast<double>(c->toInt()));
    return true;
  }
  if (!c->isTensor()) return false;
  const at::Tensor& t = c->toTensor();
  if (!t.defined() || t.numel() != 1 || t.is_complex() || !t.device().is_cpu()) return false;
  if (!(t.scalar_type() == at::kFloat && t.dim() <= 1) &&
      !(t.scalar_type() == at::kDouble && t.dim() == 0)) {
    return false;
  }
  *out = t.to(at::kFloat).item<float>();
  return true;
}

bool FloatEquals(Value* v, float want) {
  float x = 0;
  return FloatOperand(v, &x) && x == want;
}

// The single user of `v` in `block`, or nullptr.
Node* SoleUser(Value* v, torch::jit::Block* block) {
  if (v->uses().size() != 1) return nullptr;
  Node* u = v->uses()[0].user;
  return u->owningBlock() == block && u->outputs().size() == 1 ? u : nullptr;
}

// `v`'s decomposed hardswish, v · clamp(v + 3, 0, 6) / 6 (how ONNX exports and their TorchScript
// conversions write it): its last node, or nullptr.
Node* DecomposedHardswish(Value* v, torch::jit::Block* block) {
  static const c10::Symbol kAdd = c10::Symbol::fromQualString("aten::add");
  static const c10::Symbol kMul = c10::Symbol::fromQualString("aten::mul");
  static const c10::Symbol kDiv = c10::Symbol::fromQualString("aten::div");
  static const c10::Symbol kClamp = c10::Symbol::fromQualString("aten::clamp");
  static const c10::Symbol kHardtanh = c10::Symbol::fromQualString("aten::hardtanh");
  if (v->uses().size() != 2) return nullptr;
  Node* add = nullptr;
  Node* mul = nullptr;
  for (const torch::jit::Use& u : v->uses()) {
    if (u.user->owningBlock() != block) return nullptr;
    if (u.user->kind() == kAdd) add = u.user;
    if (u.user->kind() == kMul) mul = u.user;
  }
  if (add == nullptr || mul == nullptr || add->inputs().size() != 3 ||
      !FloatEquals(add->input(2), 1.0f) ||
      !FloatEquals(add->input(add->input(0) == v ? 1 : 0), 3.0f)) {
    return nullptr;
  }
  Node* clamp = SoleUser(add->output(), block);
  if (clamp == nullptr || (clamp->kind() != kClamp && clamp->kind() != kHardtanh) ||
      clamp->inputs().size() != 3 || clamp->input(0) != add->output() ||
      !FloatEquals(clamp->input(1), 0.0f) || !FloatEquals(clamp->input(2), 6.0f)) {
    return nullptr;
  }
  if (mul->inputs().size() != 2 || !((mul->input(0) == v && mul->input(1) == clamp->output()) ||
                                     (mul->input(1) == v && mul->input(0) == clamp->output()))) {
    return nullptr;
  }
  Node* div = SoleUser(mul->output(), block);
  if (div == nullptr || div->kind() != kDiv || div->inputs().size() != 2 ||
      div->input(0) != mul->output() || !FloatEquals(div->input(1), 6.0f)) {
    return nullptr;
  }
  return div;
}

// The elementwise ops that alone consume `v` one after another (mul, add or sub by a constant,
// div by one, relu, hardswish, and the decomposed hardswish), as post steps; the last node
// of the chain in *last (nullptr when there is none).
std::vector<core::PostStep> TailOf(Value* v, torch::jit::Block* block, Node** last) {
  static const c10::Symbol kAdd = c10::Symbol::fromQualString("aten::add");
  static const c10::Symbol kSub = c10::Symbol::fromQualString("aten::sub");
  static const c10::Symbol kMul = c10::Symbol::fromQualString("aten::mul");
  static const c10::Symbol kDiv = c10::Symbol::fromQualString("aten::div");
  static const c10::Symbol kRelu = c10::Symbol::fromQualString("aten::relu");
  static const c10::Symbol kHardswish = c10::Symbol::fromQualString("aten::hardswish");
  std::vector<core::PostStep> steps;
  *last = nullptr;
  while (steps.size() < static_cast<size_t>(core::kMaxPostSteps)) {
    core::PostStep st;
    Node* end = DecomposedHardswish(v, block);
    if (end != nullptr) {
      st.op = core::PostOp::kHardswish;
    } else if (Node* u = SoleUser(v, block); u != nullptr) {
      const auto other = [&](size_t i) { return u->input(u->input(i) == v ? 1 - i : i); };
      const size_t n_in = u->inputs().size();
      if ((u->kind() == kRelu || u->kind() == kHardswish) && n_in == 1) {
        st.op = u->kind() == kRelu ? core::PostOp::kRelu : core::PostOp::kHardswish;
      } else if (u->kind() == kMul && n_in == 2 && FloatOperand(other(0), &st.value)) {
        st.op = core::PostOp::kMul;
      } else if (u->kind() == kAdd && n_in == 3 && FloatEquals(u->input(2), 1.0f) &&
                 FloatOperand(other(0), &st.value)) {
        st.op = core::PostOp::kAdd;
      } else if (u->kind() == kSub && n_in == 3 && u->input(0) == v &&
                 FloatEquals(u->input(2), 1.0f) && FloatOperand(u->input(1), &st.value)) {
        st.op = core::PostOp::kAdd;  // y − c is y + (−c), bit for bit
        st.value = -st.value;
      } else if (u->kind() == kDiv && n_in == 2 && u->input(0) == v &&
                 FloatOperand(u->input(1), &st.value)) {
        st.op = core::PostOp::kDiv;
      } else {
        break;
      }
      end = u;
    } else {
      break;
    }
    steps.push_back(st);
    *last = end;
    v = end->output();
  }
  return steps;
}

// Fuses the elementwise tail after each packed layer: the integer and folded ops take it into
// their float epilogue (tail_ops / tail_values, applied while the accumulators are in cache),
// and so does fpxint::conv2d (per channel on the depthwise schedule, one pass otherwise);
// after fpxint::linear a tail of two steps or more becomes one fpxint::post_ on its output.
void FuseTails(torch::jit::Graph& g) {
  static const c10::Symbol kEpilogueOps[] = {
      c10::Symbol::fromQualString(kLinearWaOp),     c10::Symbol::fromQualString(kConv2dWaOp),
      c10::Symbol::fromQualString(kLinearFoldedOp), c10::Symbol::fromQualString(kConv2dFoldedOp),
      c10::Symbol::fromQualString(kConv2dOp)};
  static const c10::Symbol kOtherOps[] = {c10::Symbol::fromQualString(kLinearOp)};
  const auto is = [](Node* n, const auto& kinds) {
    return std::find(std::begin(kinds), std::end(kinds), n->kind()) != std::end(kinds);
  };
  std::vector<Node*> layers;
  internal::ForEachNode(g.block(), [&](Node* n) {
    if (is(n, kEpilogueOps) || is(n, kOtherOps)) layers.push_back(n);
  });
  for (Node* n : layers) {
    Node* last = nullptr;
    const std::vector<core::PostStep> steps = TailOf(n->output(), n->owningBlock(), &last);
    const bool epilogue = is(n, kEpilogueOps);
    if (steps.empty() || (!epilogue && steps.size() < 2)) continue;
    std::vector<int64_t> ops;
    std::vector<double> values;
    for (const core::PostStep& st : steps) {
      ops.push_back(static_cast<int64_t>(st.op));
      values.push_back(st.value);
    }
    if (epilogue) {
      // The op's own tail_ops / tail_values arguments (their defaults are empty lists).
      torch::jit::WithInsertPoint guard(n);
      const c10::FunctionSchema& schema = n->schema();
      n->replaceInput(*schema.argumentIndexWithName("tail_ops"), g.insertConstant(ops));
      n->replaceInput(*schema.argumentIndexWithName("tail_values"), g.insertConstant(values));
      last->output()->replaceAllUsesWith(n->output());  // the tail itself is dead code now
    } else {
      torch::jit::WithInsertPoint guard(last->next());
      Value* y = g.insert(c10::Symbol::fromQualString(kPostOp), {n->output(), ops, values});
      y->setType(last->output()->type());
      last->output()->replaceAllUsesWith(y);
    }
  }
}

absl::StatusOr<torch::jit::Module> Model::Impl::BuildPacked(bool wa) const {
  static const c10::Symbol kConv2d = c10::Symbol::fromQualString("aten::conv2d");
  FPX_ASSIGN_OR_RETURN(Clone c, CloneLayers());
  torch::jit::Module& m = c.module;
  const std::shared_ptr<torch::jit::Graph>& g = c.graph;
  const std::vector<FoundLayer>& found = c.found;
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
      // A following ReLU / hardswish of this layer alone runs in the integer ops' epilogue.
      int64_t post = 0;
      Node* follower = FusablePost(n, &post);
      const auto fuse = [&](Value* y_fused) {
        y_fused->setType(n->output()->type());
        if (follower != nullptr) {
          follower->output()->replaceAllUsesWith(y_fused);
          follower->destroy();
        }
        n->output()->replaceAllUsesWith(y_fused);
      };
      if (Value* folded = InsertFolded(*g, n, found[i], gran, pw, packed_weight, bias, terms,
                                       act_terms, is_conv2d, post)) {
        fuse(folded);
        continue;
      }
      const bool int_weights = spec.act_grid == core::Grid::kSym &&
                               spec.act_variant == core::Variant::kRescaled &&
                               TakesIntegerOps(packed_weight);
      bool int_conv = false;
      if (is_conv2d && int_weights) {
        const c10::optional<c10::IValue> groups = torch::jit::toIValue(n->input(6));
        const bool stride1 = ConstIntsAll(n->input(3), 1), pad0 = ConstIntsAll(n->input(4), 0);
        // k×k kernels: im2col repeats every input value k² times, so expanding the patches
        // costs k² times expanding x once; they take the integer op only when truncation
        // needs it, else fpxint::act_expand on x and the packed weight-only convolution.
        const bool pointwise = found[i].weight.size(2) == 1 && found[i].weight.size(3) == 1;
        int_conv = groups && groups->isInt() && groups->toInt() == 1 &&
                   ((gran == ActGranularity::kPixel && pad0) ||
                    ((gran == ActGranularity::kTensor || gran == ActGranularity::kSample) &&
                     stride1 && (pointwise || spec.truncate)));
      }
      const std::vector<torch::jit::NamedValue> act_args = {
          static_cast<int64_t>(spec.act_bits), act_terms, spec.unsigned_first, spec.truncate,
          static_cast<int64_t>(gran), post};
      if (found[i].kind != OpKind::kConv && int_weights) {
        std::vector<torch::jit::NamedValue> args = {n->input(0), pw, bias, terms};
        args.insert(args.end(), act_args.begin(), act_args.end());
        fuse(g->insert(c10::Symbol::fromQualString(kLinearWaOp), args));
        continue;
      } else if (int_conv) {
        std::vector<torch::jit::NamedValue> args = {n->input(0), pw, bias, n->input(3),
                                                    n->input(4), n->input(5), n->input(6), terms};
        args.insert(args.end(), act_args.begin(), act_args.end());
        fuse(g->insert(c10::Symbol::fromQualString(kConv2dWaOp), args));
        continue;
      } else if (!spec.truncate && is_conv2d && gran == ActGranularity::kChannel &&
                 spec.act_grid == core::Grid::kMid &&
                 spec.act_variant == core::Variant::kDigits) {
        // Depthwise with variant D activations: the packed op expands each (image, channel)
        // itself while it is in cache (the bits of fpxint::act_expand, which the mid grid runs
        // without an unsigned first term).
        y = g->insert(c10::Symbol::fromQualString(kConv2dOp),
                      {n->input(0), pw, bias, n->input(3), n->input(4), n->input(5), n->input(6),
                       terms, static_cast<int64_t>(spec.act_bits), act_terms,
                       static_cast<int64_t>(spec.act_grid), static_cast<int64_t>(gran),
                       static_cast<int64_t>(spec.act_variant)});
      } else if (!spec.truncate) {
        // Σ_i W_i ⊛ Σ_j X_j: the weight-only packed op (or the dequantized weight sum) on the
        // activation's expansion.
        Value* xq = g->insert(c10::Symbol::fromQualString(kActExpandOp),
                              {n->input(0), static_cast<int64_t>(spec.act_bits), act_terms,
                               static_cast<int64_t>(spec.act_grid), static_cast<int64_t>(gran),
                               spec.unsigned_first, static_cast<int64_t>(spec.act_variant)});
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
  FuseTails(*g);
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

bool Model::Impl::AdoptPackedNetwork() {
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

std::vector<PackedWeightInfo> Model::Impl::CurrentPackedWeights(Routes* routes) const {
  static const c10::Symbol kFolded[] = {c10::Symbol::fromQualString(kLinearFoldedOp),
                                        c10::Symbol::fromQualString(kConv2dFoldedOp)};
  static const c10::Symbol kInteger[] = {c10::Symbol::fromQualString(kLinearWaOp),
                                         c10::Symbol::fromQualString(kConv2dWaOp)};
  static const c10::Symbol kPost = c10::Symbol::fromQualString(kPostOp);
  static const c10::Symbol kConv2d = c10::Symbol::fromQualString(kConv2dOp);
  std::vector<PackedWeightInfo> out;
  if (!current_packed) return out;
  torch::jit::Module cur = current;
  ForEachNode(ForwardGraph(cur)->block(), [&](Node* n) {
    // The steps a post_ node or an epilogue's tail_ops list holds.
    const auto steps = [](Value* ops_list) {
      const c10::optional<c10::IValue> ops = torch::jit::toIValue(ops_list);
      return ops && ops->isIntList() ? static_cast<int>(ops->toIntList().size()) : 0;
    };
    if (routes != nullptr && n->kind() == kPost) routes->tail_steps += steps(n->input(1));
    if (routes != nullptr && n->kind() == kConv2d) {
      routes->tail_steps += steps(n->namedInput("tail_ops"));
    }
    if (routes != nullptr) {
      const bool folded = n->kind() == kFolded[0] || n->kind() == kFolded[1];
      const bool integer = n->kind() == kInteger[0] || n->kind() == kInteger[1];
      routes->folded += folded;
      routes->integer += integer;
      if (folded || integer) {
        const c10::optional<c10::IValue> post = torch::jit::toIValue(n->namedInput("post"));
        routes->fused_post += post && post->isInt() && post->toInt() != 0;
        // Saved networks from before tail_ops load with its default, an empty list.
        routes->tail_steps += steps(n->namedInput("tail_ops"));
      }
    }
    if (n->kind() != c10::prim::Constant || n->outputs().size() != 1) return;
    const c10::optional<c10::IValue> v = torch::jit::toIValue(n->output());
    if (!v) return;
    if (PackedWeightInfo pw = InspectPackedWeight(*v); pw.terms > 0) out.push_back(pw);
  });
  return out;
}

}  // namespace fpxint::model
