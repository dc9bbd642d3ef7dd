// Layer and model expansion on TorchScript networks: loading, BatchNorm folding, K=1 == RTN,
// any precision, activation expansion, exports, and the Abelian group axioms (SPEC C9).
#include "model/model.h"

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "absl/strings/match.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::model {
namespace {

using ::fpxint::testing::ScratchDir;

std::string Fixture(const std::string& name) {
  const char* dir = std::getenv("FPXINT_TINY_MODELS_DIR");
  EXPECT_NE(dir, nullptr) << "run through ctest (fixture.tiny_models)";
  return std::string(dir ? dir : "") + "/" + name;
}

struct TinyIo {
  HostTensor input;
  std::vector<float> output;
};

TinyIo LoadIo() {
  auto r = core::SafetensorsReader::Open(Fixture("tiny_io.safetensors"));
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
  auto none = Model::Load(Fixture("no_layers.pt"), {});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(none.status().message(), "no layer to expand")) << none.status();
}

TEST(ModelLoad, FindsLayersFoldsBatchNormAndRunsFp) {
  std::unique_ptr<Model> m = MustLoad(Fixture("tiny_cnn.pt"));
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

// K=1 is plain round-to-nearest: an independent implementation of the sym per-channel grid
// (scale m/7 rounded down to a float, as core/expansion.h documents) gives the same bits.
TEST(ModelExpansion, OneTermIsRoundToNearest) {
  std::unique_ptr<Model> m = MustLoad(Fixture("tiny_cnn.pt"));
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
  std::unique_ptr<Model> m = MustLoad(Fixture("tiny_cnn.pt"));
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
  std::unique_ptr<Model> m = MustLoad(Fixture("tiny_cnn.pt"));
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

TEST(ModelAbelian, GroupAxiomsAndSeriesIdentity) {
  std::unique_ptr<Model> m = MustLoad(Fixture("tiny_cnn.pt"));
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

}  // namespace
}  // namespace fpxint::model
