// File: model/model.h
//
// FP=xINT layer and model expansion of TorchScript networks (docs/ALGORITHM.md §3–§5). LibTorch
// stays in the .cc files of this directory; this header has none of it.
//
// Loading freezes the module (parameters become graph constants), folds every BatchNorm into the
// convolution before it, and finds the layers to expand: aten::_convolution / conv1d/2d/3d and
// aten::linear with a constant weight, and aten::matmul whose second operand is a constant 2-D
// weight. The weights are expanded offline with the core library (output channel = dim 0 of
// conv and linear weights, dim 1 of a matmul weight). At run time the network runs with the first
// K_w' <= K_w weight terms of every layer and, when activations are expanded, each layer's input
// is itself expanded into K_a' terms from the actual input (dynamic scales: per tensor for
// convolutions, per row/token for linear and matmul; an unsigned first term when the input is
// non-negative), so that y = Σ_i Σ_j W_i ⊛ X_j + β. Because every layer is linear, running the K
// basis models in lock-step and summing before each nonlinearity is the same as running one layer
// with the summed weights; biases are added once and nonlinearities run once on the sum.
//
// Example:
//   FPX_ASSIGN_OR_RETURN(auto m, Model::Load("rec.pt", {}));
//   FPX_RETURN_IF_ERROR(m->Expand(spec, &pool));
//   FPX_RETURN_IF_ERROR(m->SetPrecision(2, 2));
//   FPX_ASSIGN_OR_RETURN(HostTensor y, m->Forward(x));
//
// Thread-compatible: one thread at a time per Model.
#ifndef FPXINT_MODEL_MODEL_H_
#define FPXINT_MODEL_MODEL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/artifact.h"
#include "core/expansion.h"
#include "core/thread_pool.h"
#include "model/abelian.h"

namespace fpxint::model {

// A dense host tensor crossing the API (no LibTorch types in headers).
struct HostTensor {
  enum class Type { kFloat32, kInt64 };
  Type type = Type::kFloat32;
  std::vector<int64_t> shape;
  std::vector<float> f32;
  std::vector<int64_t> i64;

  int64_t numel() const;
  static HostTensor Float(std::vector<int64_t> shape, std::vector<float> data);
  static HostTensor Int64(std::vector<int64_t> shape, std::vector<int64_t> data);
};

// A tensor borrowed from its owner (a HostTensor, or a request's raw bytes): Forward reads it in
// place. `data` holds numel() values of `type`, aligned for it, and outlives the call.
struct HostTensorRef {
  HostTensor::Type type = HostTensor::Type::kFloat32;
  absl::Span<const int64_t> shape;
  const void* data = nullptr;

  int64_t numel() const;
  static HostTensorRef Of(const HostTensor& t);
};

// Receives a forward pass's FP32 output while the network still holds it (no copy in between):
// the server writes it straight into the response.
using OutputSink =
    absl::FunctionRef<absl::Status(absl::Span<const int64_t> shape, absl::Span<const float> values)>;

struct LayerInfo {
  std::string name;  // the weight's name in the frozen graph, e.g. "self.c1.weight_fused_bn"
  std::string op;    // "conv", "linear" or "matmul"
  std::vector<int64_t> weight_shape;  // as stored in the graph
  bool has_bias = false;
  bool expanded = false;              // selected by include/exclude and expanded
  std::vector<core::TermError> errors;  // weight expansion error per term (when expanded)
};

struct ModelExpansionSpec {
  core::ExpansionSpec weights;  // b, K_w, grid, scale granularity, variant of the weight terms
  int act_bits = 0;             // activation bits; 0 = weight-only
  int act_terms = 0;            // K_a
  core::Grid act_grid = core::Grid::kSym;
  core::Variant act_variant = core::Variant::kRescaled;  // kDigits: grid mid (the fold's half)
  bool unsigned_first = true;   // first activation term unsigned when the input is >= 0
  bool truncate = false;        // order truncation: only products W_i X_j with i + j <= K + 1
  // Dynamic activation scales. kAuto: the finest grouping that still factors out of the layer's
  // integer product (docs/ALGORITHM.md §3): per row (token) for linear and matmul, per pixel
  // (over channels) for 1x1 convolutions, per channel (over H x W) for depthwise convolutions, per
  // tensor for other convolutions. kTensor: per tensor everywhere.
  enum class ActScale { kAuto, kTensor };
  ActScale act_scale = ActScale::kAuto;
  std::string include;          // regex on layer names; empty selects all
  std::string exclude;

  bool weight_only() const { return act_terms == 0; }
  absl::Status Validate() const;
  // Whether the W×A term products fold (core::FoldedIntLinear: one u8 × s8 product per layer
  // for all K_w·K_a of them): variant D weights and activations (grid mid), tensor or channel
  // weight scales, K·b <= 8 on each side, no truncation. `how` (may be null) gets a sentence
  // for reports: what folds, or the first condition that fails.
  bool Folds(std::string* how = nullptr) const;
};

class Model {
 public:
  struct Options {
    int threads = 2;  // LibTorch intra-op threads (it defaults to 1 on this machine)
    // Weight-only precisions run on the packed low-bit ops (model/lowbit_ops.h): one module whose
    // expanded layers hold their K packed terms, K' chosen per call. Otherwise (and whenever
    // activations are expanded) the expanded layers run with dequantized fp32 weights.
    bool packed = false;
    // Dense networks SetPrecision keeps built, one per (K_w', K_a') asked for (each holds the
    // model's weights in fp32). Beyond it, a new pair is ResourceExhausted naming the built
    // ones: they are not evicted and rebuilt, because every build adds TorchScript class types
    // that LibTorch never frees. 0: no bound (at most K_w x (K_a + 1) anyway).
    int max_built_networks = 0;
  };

  // InvalidArgument when the file is not a TorchScript archive (or cannot be frozen);
  // FailedPrecondition when it has no linear or convolution layer with a constant weight.
  // A model whose parameters are FP16 or BF16 is converted to float32 as it loads: it is
  // expanded from its weights in fp32 and runs in fp32 (source_dtype() names it); its
  // dequantized exports are in its own dtype again.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& path, const Options& o);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const std::vector<LayerInfo>& layers() const;
  // "Half" or "BFloat16" for a model loaded from FP16 or BF16 weights; empty for float32.
  const std::string& source_dtype() const;
  // The rows of the smallest constant table the network looks token ids up in
  // (aten::embedding): every id below it is valid input. 0 when it has none.
  int64_t token_vocabulary() const;

  // Called before each selected layer (done = layers finished so far) and once at the end
  // (done == total, name empty).
  struct ExpandProgress {
    int done = 0;
    int total = 0;
    std::string name;
  };
  struct ExpandHooks {
    std::function<void(const ExpandProgress&)> progress;
    const std::atomic<bool>* cancel = nullptr;  // polled between rows: returns Cancelled
  };

  // Expands the selected layers' weights (offline; reads no data). Replaces an earlier expansion.
  absl::Status Expand(const ModelExpansionSpec& spec, core::ThreadPool* pool,
                      const ExpandHooks& hooks);
  absl::Status Expand(const ModelExpansionSpec& spec, core::ThreadPool* pool);
  // Takes the weight expansion from a packed artifact of this model (SaveArtifact, or a LAYER or
  // MODEL job) instead of computing it: the layers the artifact holds are the expanded ones, each
  // with exactly the artifact's terms, so the network runs the artifact's bytes. The weight part
  // of the result's spec is the artifact's; the activation part comes from `spec` (its weight
  // part, include and exclude are not used). Replaces an earlier expansion. InvalidArgument
  // naming the tensor when the artifact has a tensor the model has no layer for, or a layer's
  // terms of another shape; InvalidArgument when it holds none of the layers.
  absl::Status UseArtifact(const ModelExpansionSpec& spec, const core::ArtifactView& artifact);
  const ModelExpansionSpec& spec() const;

  // Runs with the first kw weight terms and ka activation terms (any precision). kw = 0 runs the
  // FP model. With spec().truncate, only the products W_i X_j with i + j <= max(kw, ka) + 1 run. ka is ignored for weight-only specs. InvalidArgument beyond the expanded K.
  absl::Status SetPrecision(int kw, int ka);

  // Runs the current network. InvalidArgument for a wrong dtype or rank, with the expected shape
  // when the graph was traced at a fixed size.
  absl::StatusOr<HostTensor> Forward(const HostTensor& input);
  // The same on a borrowed input; the output goes to `sink` (its status is returned).
  absl::Status Forward(const HostTensorRef& input, OutputSink sink);

  // The data-free sensitivity of the expanded layers (docs/ALGORITHM.md §6a): for each, the
  // relative Frobenius error of the output for `input` when only that layer runs with its first
  // K weight terms (K = 1 .. min(max_terms, its terms)) and every other layer is FP. One network
  // is built for all of it and the layers' weights are swapped into it in place, so it costs one
  // forward pass per (layer, K) and no network per layer. The current precision is kept.
  // Cancelled when *cancel turns true (polled between passes).
  struct LayerSensitivity {
    size_t layer = 0;  // index into layers()
    std::string name;
    std::vector<double> rel_fro;  // rel_fro[K - 1]
  };
  absl::StatusOr<std::vector<LayerSensitivity>> Sensitivity(
      const HostTensor& input, int max_terms, const std::atomic<bool>* cancel = nullptr);

  // The probes behind Sensitivity, on one network built once for `input`: each expanded layer's
  // weight is a constant of its own that takes any of the layer's partial sums in place. The
  // model must outlive it and keep its expansion meanwhile. With act_terms > 0 (a W×A
  // expansion, without truncation) every expanded layer also expands its input into act_terms
  // terms, as the served network does; errors are still against the FP output.
  class Prober {
   public:
    ~Prober();
    // Relative Frobenius error of the output against FP when layer i (indexed as layers())
    // runs its first terms[i] terms (0, or a layer not expanded: FP weights).
    absl::StatusOr<double> OutputError(const std::vector<int>& terms);
    absl::StatusOr<std::vector<LayerSensitivity>> Sensitivity(int max_terms,
                                                              const std::atomic<bool>* cancel);


   private:
    friend class Model;
    struct State;
    explicit Prober(std::unique_ptr<State> s);
    std::unique_ptr<State> s_;
  };
  absl::StatusOr<std::unique_ptr<Prober>> NewProber(const HostTensor& input, int act_terms = 0);

  // Keeps the first terms[i] terms of expanded layer i (indexed as layers(); 1 .. its terms):
  // an error-budgeted expansion with its own K per layer. Networks built for the old expansion
  // are dropped; the model runs FP until SetPrecision. SaveArtifact then writes each layer's
  // terms (its `.terms`), and SetPrecision(k) runs min(k, K_i) terms of layer i.
  absl::Status KeepTerms(const std::vector<int>& terms);

  // Saves the packed network (every expanded layer as fpxint ops on its packed terms; forward(x,
  // terms: int = 0), 0 meaning all K terms). Loading it needs the fpxint op library: linked into
  // fpxint_model, or libfpxint_ops.so for Python (torch.ops.load_library). FailedPrecondition
  // before Expand.
  absl::Status SavePacked(const std::string& path);

  // Weight memory of the network the model runs: fp32_bytes is what its layers' weights take in
  // FP32; resident_bytes what the current network holds for them (packed terms, codes + scales,
  // for the expanded layers when packed; FP32 otherwise). packed_layers counts layers on the ops;
  // of those, folded_layers run their W×A term products as one folded u8 × s8 product and
  // integer_layers as separate integer term products (the rest: fp32 on dequantized terms);
  // fused_post_ops of those apply the following ReLU / hardswish in their epilogue.
  // fused_tail_steps counts the elementwise ops after packed layers (mul, add or div by a
  // constant, ReLU, hardswish, decomposed or not) that run as one pass per layer.
  struct WeightMemory {
    size_t fp32_bytes = 0;
    size_t resident_bytes = 0;
    int packed_layers = 0;
    int folded_layers = 0;
    int integer_layers = 0;
    int fused_post_ops = 0;
    int fused_tail_steps = 0;
  };
  WeightMemory weight_memory() const;
  // core::PackedTermsSha256 of the packed terms the current network runs, in layer order; empty
  // when it is not a packed network (dense FP32 weights).
  std::string packed_terms_sha256() const;

  // For serving a packed weight-only precision: frees everything but the packed network (FP
  // weights, expansions, other precisions). Afterwards only SetPrecision(kw >= 1, 0) and Forward
  // work; the rest returns FailedPrecondition. FailedPrecondition unless the packed network is
  // current.
  absl::Status ReleaseAllButPacked();

  // Saves the current network (FP weights replaced by Σ_{k<=kw} terms) as TorchScript that
  // loads in plain LibTorch or Python. An FP16 or BF16 model is saved in its own dtype (every
  // float tensor of the network, the dequantized weights rounded to it; inputs in that dtype).
  // FailedPrecondition when activations are expanded (that network needs the fpxint op library).
  absl::Status SaveDequantized(const std::string& path) const;

  // Writes the expanded layers' FP weights (BatchNorm folded, expansion layout [out, ...], F32,
  // named as in layers()) and their biases (<name>.bias) as safetensors. Before Expand (nothing
  // expanded yet) it writes every supported layer: the input of a TENSOR job on a TorchScript model.
  absl::Status SaveFoldedWeights(const std::string& path) const;
  // Writes the packed artifact of the current weight expansion: exactly what `fpxint expand`
  // writes for SaveFoldedWeights' file with the same spec (docs/FORMAT.md), and its report.
  absl::StatusOr<core::ExpandReport> SaveArtifact(const std::string& path,
                                                  core::ThreadPool* pool) const;

  // Linear parameters of the expanded layers (docs/ALGORITHM.md §4): the FP model, basis model k
  // (term k of every weight; the bias in basis model 1 only), and the residual model
  // R_K = W − Σ_k D_k (no bias), so that FP = basis_1 ⊕ … ⊕ basis_K ⊕ residual.
  ModelParams FpParams() const;
  absl::StatusOr<ModelParams> BasisParams(int k) const;
  ModelParams ResidualParams() const;
  // Makes the network run with `params` in place of the expanded layers' weights and biases
  // (activations stay FP). InvalidArgument when `params` is of another architecture. With
  // BasisParams(k) and SaveDequantized this writes basis model k as plain TorchScript.
  absl::Status UseParams(const ModelParams& params);

  // The weight expansion of layer i (for artifacts and tests).
  const core::TensorExpansion* expansion(size_t layer) const;
  // The layer's FP weight as fp32 in the layout the expansion uses ([out, ...]).
  std::vector<float> fp_weight(size_t layer) const;

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_MODEL_H_
