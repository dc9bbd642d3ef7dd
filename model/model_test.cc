// Layer and model expansion on TorchScript networks: loading, BatchNorm folding, K=1 == RTN,
// any precision, activation expansion, exports, and the Abelian group axioms (docs/ALGORITHM.md §7, C9).
#include "model/model.h"

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include <torch/script.h>

#include "absl/strings/match.h"
#include "core/artifact.h"
#include "core/safetensors.h"
#include "model/budget.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::model {
namespace {

using ::fpxint::testing::ScratchDir;
using ::fpxint::testing::TinyModelFile;


struct TinyIo {
  HostTensor input;
  std::vector<float> output;
};

TinyIo LoadIo() {
  auto r = core::SafetensorsReader::Open(TinyModelFile("tiny_io.safetensors"));
  EXPECT_TRUE(r.ok()) << r.status();
  TinyIo io;
  auto floats = [&](const char* name, std::vector<int64_t>* shape) {
    const core::TensorInfo* t = (*r)->Find(name);
    auto d = (*r)->Data(*t);
    if (shape) *shape = t->shape;
    std::vector<float> v(d.size() / 4);
    std::memcpy(v.data(), d.data(), d.size());
    return v;
  };
  std::vector<int64_t> shape;
  io.input = HostTensor::Float({}, floats("input", &shape));
  io.input.shape = shape;
  io.output = floats("output", nullptr);
  return io;
}

std::unique_ptr<Model> MustLoad(const std::string& path) {
  auto m = Model::Load(path, {});
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

double RelErr(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (double{a[i]} - ref[i]) * (double{a[i]} - ref[i]);
    den += double{ref[i]} * ref[i];
  }
  return std::sqrt(num / den);
}

ModelExpansionSpec Spec(int bits, int terms, int act_bits = 0, int act_terms = 0) {
  ModelExpansionSpec s;
  s.weights.bits = bits;
  s.weights.terms = terms;
  s.act_bits = act_bits;
  s.act_terms = act_terms;
  return s;
}

TEST(ModelLoad, ClearStructuralErrors) {
  auto missing = Model::Load("/nonexistent/model.pt", {});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  ScratchDir dir;
  ::fpxint::testing::WriteFileOrDie(dir.File("junk.pt"), "this is not a zip archive");
  auto junk = Model::Load(dir.File("junk.pt"), {});
  EXPECT_EQ(junk.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(junk.status().message(), "not a loadable TorchScript")) << junk.status();
  auto none = Model::Load(TinyModelFile("no_layers.pt"), {});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(none.status().message(), "no layer to expand")) << none.status();
}

TEST(ModelLoad, FindsLayersFoldsBatchNormAndRunsFp) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("tiny_cnn.pt"));
  ASSERT_NE(m, nullptr);
  ASSERT_EQ(m->layers().size(), 3u);
  EXPECT_EQ(m->layers()[0].op, "conv");
  EXPECT_TRUE(absl::StrContains(m->layers()[0].name, "fused_bn")) << m->layers()[0].name;
  EXPECT_EQ(m->layers()[1].op, "linear");
  EXPECT_EQ(m->layers()[2].op, "matmul");
  EXPECT_EQ(m->layers()[2].weight_shape, (std::vector<int64_t>{10, 6}));
  TinyIo io = LoadIo();
  auto y = m->Forward(io.input);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(y->shape, (std::vector<int64_t>{2, 6}));
  EXPECT_LT(RelErr(y->f32, io.output), 1e-5);  // folding changes only the rounding
  // Wrong input: a clear error, not a crash.
  auto bad = m->Forward(HostTensor::Float({1, 5}, std::vector<float>(5, 0)));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "[1,5]")) << bad.status();
}

// FP16 and BF16 models load in fp32: the same layers, outputs within the half weights' rounding
// of the fp32 model's, and an expansion of them converges as the fp32 one does.
TEST(ModelLoad, HalfPrecisionModelsRunAndExpandInFp32) {
  TinyIo io = LoadIo();
  for (const auto& [file, dtype, tol] : {std::tuple{"tiny_cnn_fp16.pt", "Half", 5e-3},
                                         std::tuple{"tiny_cnn_bf16.pt", "BFloat16", 4e-2}}) {
    std::unique_ptr<Model> m = MustLoad(TinyModelFile(file));
    ASSERT_NE(m, nullptr) << file;
    EXPECT_EQ(m->source_dtype(), dtype);
    ASSERT_EQ(m->layers().size(), 3u) << file;
    auto y = m->Forward(io.input);
    ASSERT_TRUE(y.ok()) << y.status();
    const double fp = RelErr(y->f32, io.output);
    EXPECT_GT(fp, 0) << file << ": the half weights should round";
    EXPECT_LT(fp, tol) << file;
    ASSERT_TRUE(m->Expand(Spec(4, 3), nullptr).ok()) << file;
    double last = 1e9;
    for (int k = 1; k <= 3; ++k) {
      ASSERT_TRUE(m->SetPrecision(k, 0).ok());
      auto yk = m->Forward(io.input);
      ASSERT_TRUE(yk.ok()) << yk.status();
      const double e = RelErr(yk->f32, y->f32);
      EXPECT_LT(e, last) << file << " K=" << k;
      last = e;
    }
    EXPECT_LT(last, 1e-2) << file;
    // The dequantized export is in the model's own dtype: every float tensor of its graph (no
    // float32 left), and BF16 runs on this CPU near the fp32 network's output.
    ScratchDir dir;
    ASSERT_TRUE(m->SetPrecision(3, 0).ok());
    auto y3 = m->Forward(io.input);
    ASSERT_TRUE(m->SaveDequantized(dir.File("half.pt")).ok());
    torch::jit::Module back = torch::jit::load(dir.File("half.pt"));
    int half = 0, f32 = 0;
    for (torch::jit::Node* n : back.get_method("forward").graph()->nodes()) {
      if (n->kind() != c10::prim::Constant) continue;
      const c10::optional<c10::IValue> v = torch::jit::toIValue(n->output());
      if (!v || !v->isTensor()) continue;
      const at::ScalarType st = v->toTensor().scalar_type();
      half += st == (std::string(dtype) == "Half" ? at::kHalf : at::kBFloat16);
      f32 += st == at::kFloat;
    }
    EXPECT_GE(half, 3) << file << ": at least the 3 layers' weights";
    EXPECT_EQ(f32, 0) << file;
    if (std::string(dtype) == "BFloat16") {
      const at::Tensor x = at::from_blob(const_cast<float*>(io.input.f32.data()), io.input.shape,
                                         at::kFloat).to(at::kBFloat16);
      const at::Tensor yb = back.forward({x}).toTensor().to(at::kFloat).contiguous();
      std::vector<float> got(yb.data_ptr<float>(), yb.data_ptr<float>() + yb.numel());
      EXPECT_LT(RelErr(got, y3->f32), 5e-2) << file;
    }
  }
  std::unique_ptr<Model> fp32 = MustLoad(TinyModelFile("tiny_cnn.pt"));
  EXPECT_EQ(fp32->source_dtype(), "");
}

// K=1 is plain round-to-nearest: an independent implementation of the sym per-channel grid
// (scale m/7 rounded down to a float, as core/expansion.h documents) gives the same bits.
TEST(ModelExpansion, OneTermIsRoundToNearest) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("tiny_cnn.pt"));
  ASSERT_TRUE(m->Expand(Spec(4, 3), nullptr).ok());
  for (size_t i = 0; i < m->layers().size(); ++i) {
    const std::vector<float> w = m->fp_weight(i);
    const core::TensorExpansion* e = m->expansion(i);
    ASSERT_NE(e, nullptr);
    const std::vector<double> k1 = core::Reconstruct(*e, 1);
    const int64_t rows = e->layout.rows, cols = e->layout.row_len;
    for (int64_t r = 0; r < rows; ++r) {
      double mx = 0;
      for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, std::fabs(double{w[r * cols + c]}));
      float s = static_cast<float>(mx / 7);
      if (double{s} > mx / 7) s = std::nextafter(s, 0.0f);
      for (int64_t c = 0; c < cols; ++c) {
        const double q = std::min(7.0, std::max(-7.0, std::nearbyint(w[r * cols + c] / double{s})));
        ASSERT_EQ(k1[r * cols + c], q * s) << m->layers()[i].name << " row " << r;
      }
    }
  }
}

TEST(ModelExpansion, AnyPrecisionConvergesAndActivationsExpand) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("tiny_cnn.pt"));
  TinyIo io = LoadIo();
  ASSERT_TRUE(m->Expand(Spec(4, 4, 4, 3), nullptr).ok());
  ASSERT_TRUE(m->SetPrecision(0, 0).ok());
  auto fp = m->Forward(io.input);
  ASSERT_TRUE(fp.ok());
  double prev_w = INFINITY, prev_wa = INFINITY;
  for (int k = 1; k <= 3; ++k) {
    ASSERT_TRUE(m->SetPrecision(k, 0).ok());
    const double ew = RelErr(m->Forward(io.input)->f32, fp->f32);
    ASSERT_TRUE(m->SetPrecision(k, k).ok());
    auto ywa = m->Forward(io.input);
    ASSERT_TRUE(ywa.ok()) << ywa.status();
    const double ewa = RelErr(ywa->f32, fp->f32);
    EXPECT_LT(ew, prev_w * 0.25) << "k=" << k;  // about 1/14 per term
    EXPECT_LT(ewa, prev_wa * 0.25) << "k=" << k;
    EXPECT_GE(ewa, ew * 0.5) << "activations add error";
    prev_w = ew;
    prev_wa = ewa;
  }
  EXPECT_LT(prev_w, 1e-3);
  EXPECT_EQ(m->SetPrecision(5, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m->SetPrecision(2, 4).code(), absl::StatusCode::kInvalidArgument);
}

TEST(ModelExport, DequantizedTorchScriptReloadsWithTheSameOutput) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("tiny_cnn.pt"));
  TinyIo io = LoadIo();
  ASSERT_TRUE(m->Expand(Spec(4, 2, 4, 2), nullptr).ok());
  ASSERT_TRUE(m->SetPrecision(2, 0).ok());
  auto y = m->Forward(io.input);
  ScratchDir dir;
  ASSERT_TRUE(m->SaveDequantized(dir.File("q.pt")).ok());
  std::unique_ptr<Model> back = MustLoad(dir.File("q.pt"));
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(back->Forward(io.input)->f32, y->f32);
  ASSERT_TRUE(m->SetPrecision(2, 2).ok());
  EXPECT_EQ(m->SaveDequantized(dir.File("qa.pt")).code(), absl::StatusCode::kFailedPrecondition);
}

// A layer's sensitivity at K is the output error of the network whose only quantized layer is
// that one, at K terms: the same as building that network from the basis models' weights. It
// falls with K, and computing it leaves the current precision as it was.
// A token model's probe: ids below its embedding table's size (the smallest such table). The
// table is not a layer to expand; the linear layers after it are probed like any other.
TEST(ModelSensitivity, TokenModelsAreProbedWithIdsBelowTheirVocabulary) {
  std::unique_ptr<Model> lm = MustLoad(TinyModelFile("tiny_lm.pt"));
  EXPECT_EQ(lm->token_vocabulary(), 20);
  EXPECT_EQ(MustLoad(TinyModelFile("tiny_cnn.pt"))->token_vocabulary(), 0);
  const HostTensor probe = TokenProbeInput({1, 8}, lm->token_vocabulary());
  EXPECT_EQ(probe.type, HostTensor::Type::kInt64);
  ASSERT_EQ(probe.i64.size(), 8u);
  for (int64_t id : probe.i64) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, 20);
  }
  EXPECT_EQ(TokenProbeInput({1, 8}, 20).i64, probe.i64) << "deterministic";
  ASSERT_TRUE(lm->Expand(Spec(4, 3), nullptr).ok());
  ASSERT_EQ(lm->layers().size(), 2u);
  auto sens = lm->Sensitivity(probe, 3);
  ASSERT_TRUE(sens.ok()) << sens.status();
  ASSERT_EQ(sens->size(), 2u);
  for (const Model::LayerSensitivity& s : *sens) {
    ASSERT_EQ(s.rel_fro.size(), 3u);
    EXPECT_GT(s.rel_fro[0], s.rel_fro[2]) << s.name;
    EXPECT_GT(s.rel_fro[2], 0) << s.name;
  }
}

TEST(ModelSensitivity, OneLayerAtATimeMatchesTheBuiltNetwork) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("tiny_cnn.pt"));
  ASSERT_TRUE(m->Expand(Spec(4, 3), nullptr).ok());
  TinyIo io = LoadIo();
  ASSERT_TRUE(m->SetPrecision(2, 0).ok());
  const std::vector<float> before = m->Forward(io.input)->f32;
  auto sens = m->Sensitivity(io.input, 4);
  ASSERT_TRUE(sens.ok()) << sens.status();
  ASSERT_EQ(sens->size(), 3u);
  EXPECT_EQ(m->Forward(io.input)->f32, before);
  ASSERT_TRUE(m->SetPrecision(0, 0).ok());
  const std::vector<float> fp = m->Forward(io.input)->f32;
  const ModelParams fp_params = m->FpParams();
  std::vector<ModelParams> basis;
  for (int k = 1; k <= 3; ++k) basis.push_back(*m->BasisParams(k));
  for (size_t j = 0; j < sens->size(); ++j) {
    const Model::LayerSensitivity& s = (*sens)[j];
    EXPECT_EQ(s.name, m->layers()[s.layer].name);
    ASSERT_EQ(s.rel_fro.size(), 3u) << "capped at the layer's 3 terms";
    for (int k = 1; k <= 3; ++k) {
      ModelParams p = fp_params;
      std::vector<double>& w = p.layers[j].weight;
      for (size_t e = 0; e < w.size(); ++e) {
        double sum = 0;
        for (int t = 0; t < k; ++t) sum += basis[t].layers[j].weight[e];
        w[e] = sum;
      }
      ASSERT_TRUE(m->UseParams(p).ok());
      const double want = RelErr(m->Forward(io.input)->f32, fp);
      EXPECT_NEAR(s.rel_fro[k - 1], want, 1e-4 * want + 1e-7) << s.name << " K=" << k;
      if (k > 1) {
        EXPECT_LT(s.rel_fro[k - 1], s.rel_fro[k - 2]) << s.name;
      }
    }
    EXPECT_GT(s.rel_fro[0], 0);
  }
  std::atomic<bool> cancel{true};
  EXPECT_EQ(m->Sensitivity(io.input, 2, &cancel).status().code(), absl::StatusCode::kCancelled);
}

TEST(ModelAbelian, GroupAxiomsAndSeriesIdentity) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("tiny_cnn.pt"));
  ASSERT_TRUE(m->Expand(Spec(4, 3), nullptr).ok());
  const ModelParams fp = m->FpParams();
  const ModelParams b1 = *m->BasisParams(1), b2 = *m->BasisParams(2), b3 = *m->BasisParams(3);
  const ModelParams res = m->ResidualParams();
  // Commutative (bit for bit), identity, inverse.
  auto ab = *AbelianAdd(b1, b2), ba = *AbelianAdd(b2, b1);
  EXPECT_EQ(MaxAbsDiff(ab, ba)->first, 0.0);
  EXPECT_EQ(MaxAbsDiff(*AbelianAdd(b1, ZeroModel(b1)), b1)->first, 0.0);
  EXPECT_EQ(MaxAbsDiff(*AbelianAdd(b2, Neg(b2)), ZeroModel(b2))->first, 0.0);
  // Associative up to fp64 rounding.
  auto l = *AbelianAdd(*AbelianAdd(b1, b2), b3), r = *AbelianAdd(b1, *AbelianAdd(b2, b3));
  EXPECT_LE(MaxAbsDiff(l, r)->first, 1e-15 * MaxAbsDiff(l, r)->second);
  // Scale action: 2·b = b ⊕ b exactly; per-channel scales compose with the sum.
  EXPECT_EQ(MaxAbsDiff(AbelianScale(2, b1), *AbelianAdd(b1, b1))->first, 0.0);
  // FP = basis_1 ⊕ basis_2 ⊕ basis_3 ⊕ residual, in parameter space.
  auto sum = *AbelianAdd(*AbelianAdd(l, res), ZeroModel(l));
  auto [diff, mag] = *MaxAbsDiff(sum, fp);
  EXPECT_LE(diff, 1e-15 * mag) << "diff " << diff;
  // The sum of the basis models alone is the K=3 network.
  TinyIo io = LoadIo();
  ASSERT_TRUE(m->SetPrecision(3, 0).ok());
  auto y3 = m->Forward(io.input);
  ASSERT_TRUE(m->UseParams(l).ok());
  EXPECT_LT(RelErr(m->Forward(io.input)->f32, y3->f32), 1e-6);
  // A basis model saves as a plain TorchScript network.
  ScratchDir dir;
  ASSERT_TRUE(m->UseParams(b2).ok());
  ASSERT_TRUE(m->SaveDequantized(dir.File("basis2.pt")).ok());
  std::unique_ptr<Model> basis = MustLoad(dir.File("basis2.pt"));
  ASSERT_NE(basis, nullptr);
  EXPECT_EQ(basis->layers().size(), 3u);
  // Architecture mismatch is an error.
  ModelParams other = b1;
  other.layers.pop_back();
  EXPECT_EQ(AbelianAdd(b1, other).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m->UseParams(other).code(), absl::StatusCode::kInvalidArgument);
}


HostTensor LoadInput(const std::string& file) {
  auto r = core::SafetensorsReader::Open(TinyModelFile(file));
  EXPECT_TRUE(r.ok()) << r.status();
  const core::TensorInfo* t = (*r)->Find("input");
  auto d = (*r)->Data(*t);
  std::vector<float> v(d.size() / 4);
  std::memcpy(v.data(), d.data(), d.size());
  return HostTensor::Float(t->shape, std::move(v));
}

// Relative output error of the current precision against FP, for K = 1..4.
std::vector<double> ErrorsByK(Model* m, const HostTensor& x, bool weight_only) {
  EXPECT_TRUE(m->SetPrecision(0, 0).ok());
  const std::vector<float> ref = m->Forward(x)->f32;
  std::vector<double> out;
  for (int k = 1; k <= 4; ++k) {
    EXPECT_TRUE(m->SetPrecision(k, weight_only ? 0 : k).ok());
    auto y = m->Forward(x);
    EXPECT_TRUE(y.ok()) << y.status();
    out.push_back(RelErr(y->f32, ref));
  }
  return out;
}

void ExpectNear5Percent(const std::vector<double>& got, const std::vector<double>& want,
                        const char* what) {
  for (size_t k = 0; k < want.size(); ++k) {
    EXPECT_NEAR(got[k], want[k], 0.05 * want[k]) << what << " K=" << k + 1;
  }
}

// docs/ALGORITHM.md §7, C7 on the reference tensors (numpy default_rng(0)): one layer, W per channel, X per
// tensor, sym b=4 for both, signed first term as the reference computes it.
TEST(ModelReference, C7LayerExpansion) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("c7_layer.pt"));
  ASSERT_NE(m, nullptr);
  const HostTensor x = LoadInput("c7_io.safetensors");
  ModelExpansionSpec s = Spec(4, 4, 4, 4);
  s.act_scale = ModelExpansionSpec::ActScale::kTensor;
  s.unsigned_first = false;
  ASSERT_TRUE(m->Expand(s, nullptr).ok());
  ExpectNear5Percent(ErrorsByK(m.get(), x, true), {1.25e-1, 9.03e-3, 6.18e-4, 4.44e-5}, "W-only");
  ExpectNear5Percent(ErrorsByK(m.get(), x, false), {1.97e-1, 1.42e-2, 1.00e-3, 7.18e-5}, "full");
  s.truncate = true;
  ASSERT_TRUE(m->Expand(s, nullptr).ok());
  ExpectNear5Percent(ErrorsByK(m.get(), x, false), {1.97e-1, 2.42e-2, 2.21e-3, 1.85e-4}, "trunc");
}

// docs/ALGORITHM.md §7, C8: the 4-layer ReLU MLP; activations of every layer expanded per tensor from the input.
TEST(ModelReference, C8ModelExpansion) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("c8_mlp.pt"));
  ASSERT_NE(m, nullptr);
  ASSERT_EQ(m->layers().size(), 4u);
  const HostTensor x = LoadInput("c8_io.safetensors");
  ModelExpansionSpec s = Spec(4, 4, 4, 4);
  s.act_scale = ModelExpansionSpec::ActScale::kTensor;
  s.unsigned_first = false;
  ASSERT_TRUE(m->Expand(s, nullptr).ok());
  const std::vector<double> w = ErrorsByK(m.get(), x, true);
  const std::vector<double> wa = ErrorsByK(m.get(), x, false);
  ExpectNear5Percent(w, {2.29e-1, 1.69e-2, 1.25e-3, 8.17e-5}, "W-only");
  ExpectNear5Percent(wa, {4.05e-1, 2.91e-2, 2.13e-3, 1.48e-4}, "W4A4");
  // The output error falls by about r = 1/14 per term (T3).
  for (int k = 1; k < 4; ++k) {
    EXPECT_NEAR(w[k] / w[k - 1], 1.0 / 14, 0.5 / 14) << "k=" << k;
  }
  // The default (unsigned first term for the non-negative inputs of layers 2-4, per-row scales)
  // is at least as good.
  ModelExpansionSpec d = Spec(4, 4, 4, 4);
  ASSERT_TRUE(m->Expand(d, nullptr).ok());
  const std::vector<double> wad = ErrorsByK(m.get(), x, false);
  for (int k = 0; k < 4; ++k) EXPECT_LE(wad[k], wa[k] * 1.02) << "k=" << k + 1;
}

TEST(ModelExpansion, TruncationNeedsActivations) {
  ModelExpansionSpec s = Spec(4, 2);
  s.truncate = true;
  EXPECT_EQ(s.Validate().code(), absl::StatusCode::kInvalidArgument);
}

// The packed artifact of a model expansion is the `fpxint expand` contract, carries the same
// codes as the in-memory expansion, and is byte-identical across runs (C10).
TEST(ModelExport, ArtifactMatchesTheExpansionAndIsDeterministic) {
  ScratchDir dir;
  std::string bytes[2];
  for (int run = 0; run < 2; ++run) {
    std::unique_ptr<Model> m = MustLoad(TinyModelFile("tiny_cnn.pt"));
    ASSERT_TRUE(m->Expand(Spec(4, 3), nullptr).ok());
    const std::string path = dir.File("a" + std::to_string(run) + ".safetensors");
    auto report = m->SaveArtifact(path, nullptr);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_EQ(report->tensors.size(), 3u);
    bytes[run] = ::fpxint::testing::ReadFileOrDie(path);
    auto reader = core::SafetensorsReader::Open(path);
    ASSERT_TRUE(reader.ok()) << reader.status();
    auto view = core::ArtifactView::Parse(**reader);
    ASSERT_TRUE(view.ok()) << view.status();
    for (size_t i = 0; i < m->layers().size(); ++i) {
      auto e = view->Load(m->layers()[i].name);
      ASSERT_TRUE(e.ok()) << e.status();
      EXPECT_EQ(core::Reconstruct(*e, 3), core::Reconstruct(*m->expansion(i), 3));
    }
    EXPECT_NE((*reader)->Find(m->layers()[0].name + ".bias"), nullptr);
  }
  EXPECT_EQ(bytes[0], bytes[1]);
}

// An error-budgeted expansion: KeepTerms leaves each layer its own K; the prober's error for
// that allocation is the network's at the full precision; the artifact records each layer's
// terms, and a packed model built from it serves the same outputs at any precision.
TEST(ModelArtifact, PerLayerTermsRoundTripThroughTheArtifact) {
  ScratchDir dir;
  const TinyIo io = LoadIo();
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("tiny_cnn.pt"));
  ASSERT_TRUE(m->Expand(Spec(4, 3), nullptr).ok());
  const std::vector<int> keep = {1, 3, 2};
  auto prober = m->NewProber(io.input);
  ASSERT_TRUE(prober.ok()) << prober.status();
  auto predicted = (*prober)->OutputError(keep);
  ASSERT_TRUE(predicted.ok()) << predicted.status();
  prober->reset();
  ASSERT_TRUE(m->SetPrecision(0, 0).ok());
  const std::vector<float> fp = m->Forward(io.input)->f32;
  EXPECT_EQ(m->KeepTerms({0, 3, 2}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m->KeepTerms({1, 4, 2}).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(m->KeepTerms(keep).ok());
  for (size_t i = 0; i < keep.size(); ++i) {
    EXPECT_EQ(m->expansion(i)->terms.size(), static_cast<size_t>(keep[i]));
    EXPECT_EQ(m->layers()[i].errors.size(), static_cast<size_t>(keep[i]));
  }
  ASSERT_TRUE(m->SetPrecision(3, 0).ok());
  const std::vector<float> y3 = m->Forward(io.input)->f32;
  EXPECT_NEAR(RelErr(y3, fp), *predicted, 1e-4 * *predicted);
  const std::string path = dir.File("mixed.safetensors");
  ASSERT_TRUE(m->SaveArtifact(path, nullptr).ok());
  auto reader = core::SafetensorsReader::Open(path);
  ASSERT_TRUE(reader.ok());
  auto view = core::ArtifactView::Parse(**reader);
  ASSERT_TRUE(view.ok()) << view.status();
  for (size_t i = 0; i < keep.size(); ++i) {
    auto e = view->Load(m->layers()[i].name);
    ASSERT_TRUE(e.ok()) << e.status();
    ASSERT_EQ(e->terms.size(), static_cast<size_t>(keep[i]));
    EXPECT_EQ(core::Reconstruct(*e, keep[i]), core::Reconstruct(*m->expansion(i), keep[i]));
  }
  Model::Options packed;
  packed.packed = true;
  auto served = Model::Load(TinyModelFile("tiny_cnn.pt"), packed);
  ASSERT_TRUE(served.ok());
  ASSERT_TRUE((*served)->UseArtifact(Spec(4, 3), *view).ok());
  for (int k = 1; k <= 3; ++k) {
    ASSERT_TRUE(m->SetPrecision(k, 0).ok());
    ASSERT_TRUE((*served)->SetPrecision(k, 0).ok());
    EXPECT_LT(RelErr((*served)->Forward(io.input)->f32, m->Forward(io.input)->f32), 1e-5)
        << "k=" << k;
  }
}

// A model takes its expansion from an artifact as it is: the same layers, the same terms bit for
// bit and the same outputs as the model that wrote it, and packed networks that hold exactly the
// artifact's terms. The artifact's spec wins over the caller's.
TEST(ModelArtifact, UseArtifactRunsTheArtifactsTerms) {
  ScratchDir dir;
  const TinyIo io = LoadIo();
  for (const ModelExpansionSpec& spec : {Spec(4, 3), Spec(4, 2, 8, 2)}) {
    Model::Options packed;
    packed.packed = true;
    auto m = Model::Load(TinyModelFile("tiny_cnn.pt"), packed);
    ASSERT_TRUE(m.ok()) << m.status();
    ModelExpansionSpec s = spec;
    s.exclude = "fc";  // the artifact holds the selection
    ASSERT_TRUE((*m)->Expand(s, nullptr).ok());
    const std::string path = dir.File("a.safetensors");
    ASSERT_TRUE((*m)->SaveArtifact(path, nullptr).ok());
    auto reader = core::SafetensorsReader::Open(path);
    ASSERT_TRUE(reader.ok()) << reader.status();
    auto view = core::ArtifactView::Parse(**reader);
    ASSERT_TRUE(view.ok()) << view.status();

    auto back = Model::Load(TinyModelFile("tiny_cnn.pt"), packed);
    ASSERT_TRUE(back.ok()) << back.status();
    ModelExpansionSpec other = spec;
    other.weights.bits = 2;  // ignored: the artifact's weight spec is used
    ASSERT_TRUE((*back)->UseArtifact(other, *view).ok());
    EXPECT_EQ((*back)->spec().weights.bits, 4);
    EXPECT_EQ((*back)->spec().act_terms, spec.act_terms);
    int expanded = 0;
    for (size_t i = 0; i < (*m)->layers().size(); ++i) {
      EXPECT_EQ((*back)->layers()[i].expanded, (*m)->layers()[i].expanded) << i;
      if (!(*m)->layers()[i].expanded) continue;
      ++expanded;
      const int K = spec.weights.terms;
      EXPECT_EQ(core::Reconstruct(*(*back)->expansion(i), K),
                core::Reconstruct(*(*m)->expansion(i), K));
    }
    EXPECT_EQ(expanded, 2);
    const int ka = spec.act_terms;
    ASSERT_TRUE((*m)->SetPrecision(spec.weights.terms, ka).ok());
    ASSERT_TRUE((*back)->SetPrecision(spec.weights.terms, ka).ok());
    auto y0 = (*m)->Forward(io.input);
    auto y1 = (*back)->Forward(io.input);
    ASSERT_TRUE(y0.ok() && y1.ok());
    EXPECT_EQ(y0->f32, y1->f32);
    EXPECT_FALSE((*back)->packed_terms_sha256().empty());
    EXPECT_EQ((*back)->packed_terms_sha256(), (*m)->packed_terms_sha256());
    ASSERT_TRUE((*back)->ReleaseAllButPacked().ok());
    EXPECT_EQ((*back)->packed_terms_sha256(), (*m)->packed_terms_sha256());

    // An artifact of another network names the first tensor this one has no layer for.
    auto zoo = Model::Load(TinyModelFile("conv_zoo.pt"), packed);
    ASSERT_TRUE(zoo.ok()) << zoo.status();
    absl::Status wrong = (*zoo)->UseArtifact(spec, *view);
    EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(wrong.message(), "artifact tensor")) << wrong;
  }
}

// docs/ALGORITHM.md §7, C9 on a real pretrained network (the PaddleOCR orientation classifier).
TEST(ModelAbelian, GroupAxiomsOnARealModel) {
  const char* dir = std::getenv("FPXINT_MODELS_DIR");
  ASSERT_NE(dir, nullptr);
  std::unique_ptr<Model> m = MustLoad(std::string(dir) + "/ocr/ocr_cls.pt");
  ASSERT_NE(m, nullptr) << "run scripts/fetch_models.sh";
  ASSERT_TRUE(m->Expand(Spec(4, 3), nullptr).ok());
  const ModelParams fp = m->FpParams();
  ModelParams sum = ZeroModel(fp);
  std::vector<ModelParams> basis;
  for (int k = 1; k <= 3; ++k) basis.push_back(*m->BasisParams(k));
  for (const ModelParams& b : basis) sum = *AbelianAdd(sum, b);
  // Commutativity bit for bit; any order of the terms gives the same sum up to fp64 rounding.
  const ModelParams reversed = *AbelianAdd(*AbelianAdd(basis[2], basis[1]), basis[0]);
  auto [order_diff, mag] = *MaxAbsDiff(sum, reversed);
  EXPECT_LE(order_diff, 1e-15 * mag);
  EXPECT_EQ(MaxAbsDiff(*AbelianAdd(basis[0], basis[1]), *AbelianAdd(basis[1], basis[0]))->first, 0);
  EXPECT_EQ(MaxAbsDiff(*AbelianAdd(basis[1], Neg(basis[1])), ZeroModel(fp))->first, 0);
  // FP = Σ basis ⊕ residual in parameter space.
  auto [diff, fmag] = *MaxAbsDiff(*AbelianAdd(sum, m->ResidualParams()), fp);
  EXPECT_LE(diff, 1e-15 * fmag);
  // Per-channel scale action: s ⊙ (a ⊕ b) = s ⊙ a ⊕ s ⊙ b.
  std::vector<std::vector<double>> s;
  for (const LayerParams& l : fp.layers) s.push_back(std::vector<double>(l.shape[0], 0.5));
  auto lhs = *AbelianScaleChannels(s, *AbelianAdd(basis[0], basis[1]));
  auto rhs = *AbelianAdd(*AbelianScaleChannels(s, basis[0]), *AbelianScaleChannels(s, basis[1]));
  EXPECT_EQ(MaxAbsDiff(lhs, rhs)->first, 0);  // halving is exact
}

}  // namespace
}  // namespace fpxint::model
