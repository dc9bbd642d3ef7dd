// File: model/model_load.cc
//
// Loading: a TorchScript archive frozen, BatchNorm folded into its convolutions, and the layers
// to expand found.
#include "model/model.h"

#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/frozen_conv_folding.h>
#include <torch/csrc/jit/passes/graph_rewrite_helper.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "model/internal/model_impl.h"

namespace fpxint::model {
namespace {

// The rows of the smallest constant aten::embedding table in `block` (and its sub-blocks); 0
// when there is none.
int64_t SmallestEmbeddingTable(torch::jit::Block* block) {
  static const c10::Symbol kEmbedding = c10::Symbol::fromQualString("aten::embedding");
  int64_t rows = 0;
  for (Node* n : block->nodes()) {
    for (torch::jit::Block* b : n->blocks()) {
      const int64_t r = SmallestEmbeddingTable(b);
      if (r > 0) rows = rows == 0 ? r : std::min(rows, r);
    }
    if (n->kind() != kEmbedding || n->inputs().empty()) continue;
    const std::optional<at::Tensor> w = ConstTensor(n->input(0));
    if (!w || w->dim() != 2 || w->size(0) <= 0) continue;
    rows = rows == 0 ? w->size(0) : std::min(rows, w->size(0));
  }
  return rows;
}

}  // namespace

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
    // An FP16 or BF16 model is expanded from its weights in fp32, and runs in fp32 (LibTorch's
    // CPU kernels do not cover half precision, and fp32 only adds precision to the layers that
    // are not expanded).
    for (const at::Tensor& p : m.parameters()) {
      if (p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16) {
        impl->source_dtype = std::string(c10::toString(p.scalar_type()));
        break;
      }
    }
    if (impl->source_dtype.empty()) {
      for (const at::Tensor& b : m.buffers()) {
        if (b.scalar_type() == at::kHalf || b.scalar_type() == at::kBFloat16) {
          impl->source_dtype = std::string(c10::toString(b.scalar_type()));
          break;
        }
      }
    }
    if (!impl->source_dtype.empty()) m.to(at::kFloat);
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
  impl->token_vocabulary = SmallestEmbeddingTable(g->block());
  return std::unique_ptr<Model>(new Model(std::move(impl)));
}


const std::vector<LayerInfo>& Model::layers() const { return impl_->layers; }
const std::string& Model::source_dtype() const { return impl_->source_dtype; }
int64_t Model::token_vocabulary() const { return impl_->token_vocabulary; }
const ModelExpansionSpec& Model::spec() const { return impl_->spec; }

absl::Status Model::Expand(const ModelExpansionSpec& spec, core::ThreadPool* pool) {
  return Expand(spec, pool, ExpandHooks());
}

}  // namespace fpxint::model
