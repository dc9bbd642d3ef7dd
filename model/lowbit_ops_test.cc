// The packed low-bit ops in a network: the packed module (fpxint::linear / conv2d / dequantize
// on PackedWeight constants) against the same expansion run with dequantized fp32 weights, for
// every kind of layer (grouped, strided, depthwise dilated, 1x1, conv1d, linear on tokens,
// matmul), on the packed-kernel path (few activation rows) and the dense path (many), for every
// K' of one packed module; saved and reloaded; released for serving; weight memory.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include <torch/script.h>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "model/act_expand_op.h"
#include "model/aten_pool.h"
#include "model/lowbit_ops.h"
#include "model/model.h"
#include "model/vet.h"
#include "tests/support/test_support.h"

namespace fpxint::model {
namespace {

using ::fpxint::testing::MaxRelErr;
using ::fpxint::testing::ScratchDir;
using ::fpxint::testing::TinyModelFile;


HostTensor RandomInput(std::vector<int64_t> shape, uint32_t seed) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return HostTensor::Float(std::move(shape), std::move(v));
}


ModelExpansionSpec Spec(int bits, int terms, core::Grid grid = core::Grid::kSym) {
  ModelExpansionSpec s;
  s.weights.bits = bits;
  s.weights.terms = terms;
  s.weights.grid = grid;
  return s;
}

// A PackedWeight of dense shape `shape` ([out, ...]): Gaussian values (seed `seed`) expanded
// into two 4-bit terms with one scale per output row, on `grid` and `variant`.
c10::IValue PackedW4x2(std::vector<int64_t> shape, uint32_t seed,
                       core::Grid grid = core::Grid::kMid,
                       core::Variant variant = core::Variant::kDigits) {
  int64_t cols = 1;
  for (size_t d = 1; d < shape.size(); ++d) cols *= shape[d];
  const std::vector<double> wv = ::fpxint::testing::RandomValues(
      ::fpxint::testing::Dist::kGaussian, shape[0] * cols, seed);
  core::ExpansionSpec ws;
  ws.bits = 4;
  ws.terms = 2;
  ws.grid = grid;
  ws.variant = variant;
  ws.scale = core::ScaleGranularity::kChannel;
  auto e = core::ExpandTensor(wv, {shape[0], cols}, ws);
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return c10::IValue();
  auto lw = core::LowbitLinear::FromExpansion(*e);
  EXPECT_TRUE(lw.ok()) << lw.status();
  if (!lw.ok()) return c10::IValue();
  return MakePackedWeight(*std::move(lw), std::move(shape));
}

std::unique_ptr<Model> MustLoad(const std::string& path, bool packed) {
  Model::Options o;
  o.packed = packed;
  auto m = Model::Load(path, o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

class PackedOps : public ::testing::TestWithParam<int64_t> {  // PackedMaxRows
 protected:
  void SetUp() override {
    saved_ = PackedMaxRows();
    SetPackedMaxRows(GetParam());
  }
  void TearDown() override { SetPackedMaxRows(saved_); }
  int64_t saved_ = -1;
};

TEST_P(PackedOps, EveryLayerKindMatchesTheDequantizedNetwork) {
  for (const ModelExpansionSpec& spec :
       {Spec(4, 3), Spec(2, 3, core::Grid::kMid), Spec(3, 2, core::Grid::kAsym)}) {
    std::unique_ptr<Model> dense = MustLoad(TinyModelFile("conv_zoo.pt"), false);
    std::unique_ptr<Model> packed = MustLoad(TinyModelFile("conv_zoo.pt"), true);
    ASSERT_NE(packed, nullptr);
    ASSERT_EQ(packed->layers().size(), 6u);
    ASSERT_TRUE(dense->Expand(spec, nullptr).ok());
    ASSERT_TRUE(packed->Expand(spec, nullptr).ok());
    // 9, 36 and 108 tokens for the linear layers: the small-batch kernels, the panel schedule
    // (17-48 rows) and the transposed one, or the dense path beyond max rows; 121 pixels for a
    // 1x1 convolution with 12 output channels: the transposed schedule split over pixels.
    for (const auto& shape : {std::vector<int64_t>{1, 4, 5, 6}, std::vector<int64_t>{1, 4, 11, 11},
                              std::vector<int64_t>{2, 4, 17, 11},
                              std::vector<int64_t>{1, 4, 21, 21}}) {
      const HostTensor x = RandomInput(shape, 7);
      for (int k = 1; k <= spec.weights.terms; ++k) {
        ASSERT_TRUE(dense->SetPrecision(k, 0).ok());
        ASSERT_TRUE(packed->SetPrecision(k, 0).ok());
        auto want = dense->Forward(x);
        auto got = packed->Forward(x);
        ASSERT_TRUE(want.ok()) << want.status();
        ASSERT_TRUE(got.ok()) << got.status();
        EXPECT_EQ(got->shape, want->shape);
        EXPECT_LT(MaxRelErr(got->f32, want->f32), 1e-5)
            << "b=" << spec.weights.bits << " K'=" << k << " input " << shape[2] << "x" << shape[3];
      }
    }
    const Model::WeightMemory mem = packed->weight_memory();
    EXPECT_EQ(mem.packed_layers, 6);
    EXPECT_GT(mem.fp32_bytes, 0u);
  }
}

// -1 is the default (automatic), 16 the dense path beyond 16 rows, 0 the dense path everywhere,
// the largest the packed kernels everywhere.
INSTANTIATE_TEST_SUITE_P(Schedules, PackedOps, ::testing::Values(-1, 16, 0, 1 << 30));

// fpxint::conv2d's tail_ops / tail_values: the same bits as the op without them followed by the
// aten ops, on every schedule (depthwise: per channel with the bias, with and without the
// input's expansion inside; grouped and plain convolutions: one pass), with a bias and without.
TEST_P(PackedOps, ConvTailsGiveTheLibTorchOpsBits) {
  const int64_t C = 8, out = 6;
  struct Layer {
    const char* name;
    c10::IValue w;
    int64_t groups, out;
  };
  const Layer layers[] = {{"depthwise 3x3", PackedW4x2({C, 1, 3, 3}, 3), C, C},
                          {"grouped 3x3", PackedW4x2({C, 2, 3, 3}, 3), 4, C},
                          {"plain 3x3", PackedW4x2({out, C, 3, 3}, 3), 1, out}};
  const auto& conv = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::conv2d", "");
  const std::vector<int64_t> ops = {3, 4, 2, 3, 4, 5, 1};
  const std::vector<double> values = {0.75f, -0.125f, 0, 1.5f, 0.25f, 3.0f, 0};
  const auto aten_tail = [](at::Tensor h) {
    h = at::add(at::mul(h, at::full({1}, 0.75f)), at::full({1}, -0.125f));
    h = at::div(at::mul(h, at::clamp(at::add(h, 3.0), 0.0, 6.0)), 6.0);
    return at::relu(at::div(at::add(at::mul(h, 1.5), 0.25), 3.0));
  };
  at::manual_seed(13);
  const at::Tensor x = at::randn({3, C, 10, 14}, at::TensorOptions().dtype(at::kFloat));
  for (const Layer& l : layers) {
    const at::Tensor b32 = at::randn({l.out}, at::TensorOptions().dtype(at::kFloat));
    for (const c10::IValue& bias : {c10::IValue(), c10::IValue(b32)}) {
      for (const int64_t act_bits : {int64_t{0}, int64_t{4}}) {
        const auto run = [&](const c10::IValue& b, std::vector<int64_t> o,
                             std::vector<double> v) {
          torch::jit::Stack st = {x, l.w, b, std::vector<int64_t>{1, 1},
                                  std::vector<int64_t>{1, 1}, std::vector<int64_t>{1, 1},
                                  l.groups, int64_t{2}, act_bits, int64_t{2},
                                  static_cast<int64_t>(core::Grid::kMid),
                                  static_cast<int64_t>(ActGranularity::kChannel),
                                  static_cast<int64_t>(core::Variant::kDigits), std::move(o),
                                  std::move(v)};
          conv.callBoxed(&st);
          return st[0].toTensor();
        };
        const at::Tensor got = run(bias, ops, values), want = aten_tail(run(bias, {}, {}));
        EXPECT_TRUE(at::equal(got, want))
            << l.name << (bias.isNone() ? ", no bias" : ", bias")
            << ", act_bits " << act_bits << ", max diff "
            << (got - want).abs().max().item<float>();
        // The bias the op adds itself has add_'s bits (the dense path, taken beyond
        // PackedMaxRows rows, hands it to LibTorch's convolution instead).
        const bool packed_schedule = GetParam() < 0 || GetParam() >= x.numel() / C;
        if (!bias.isNone() && packed_schedule) {
          EXPECT_TRUE(at::equal(run(bias, {}, {}),
                                run(c10::IValue(), {}, {}).add_(b32.view({1, l.out, 1, 1}))))
              << l.name << ", act_bits " << act_bits;
        }
      }
    }
  }
  // A bias of another dtype or size is refused on every schedule, naming what is accepted.
  for (const at::Tensor& bad : {at::zeros({C}, at::kDouble), at::zeros({C + 1}, at::kFloat)}) {
    torch::jit::Stack st = {x, layers[0].w, bad, std::vector<int64_t>{1, 1},
                            std::vector<int64_t>{1, 1}, std::vector<int64_t>{1, 1}, C,
                            int64_t{2}, int64_t{0}, int64_t{0}, int64_t{0}, int64_t{0},
                            int64_t{0}, std::vector<int64_t>{}, std::vector<double>{}};
    try {
      conv.callBoxed(&st);
      ADD_FAILURE() << "bias " << bad.sizes() << " " << bad.dtype() << " accepted";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what_without_backtrace())
                    .find("the bias must be float32 with one value per output channel (8)"),
                std::string::npos)
          << e.what_without_backtrace();
    }
  }
}

// The ops' pool is LibTorch's intra-op pool. at::parallel_for is a header template whose OpenMP
// region is compiled into the caller, so without OpenMP in model/'s build every packed op ran on
// the calling thread (it once did, silently: the results were right, only slower).
// fpxint::conv2d with act_* arguments: a depthwise layer expands its input itself (variant D,
// one scale per image and channel, inside the depthwise schedule; other schedules first run
// fpxint::act_expand): the bits of fpxint::act_expand followed by the plain op, and the same
// error for an input it rejects.
TEST(PackedOpsConv, DepthwiseExpandsItsInputAsActExpandDoes) {
  const int64_t C = 8;
  const c10::IValue pw = PackedW4x2({C, 1, 3, 3}, 5);
  ASSERT_FALSE(pw.isNone());
  const auto& conv = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::conv2d", "");
  const auto& expand = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::act_expand", "");
  const int64_t mid = static_cast<int64_t>(core::Grid::kMid);
  const int64_t digits = static_cast<int64_t>(core::Variant::kDigits);
  const int64_t channel = static_cast<int64_t>(ActGranularity::kChannel);
  auto run = [&](const at::Tensor& x, std::vector<int64_t> stride, int64_t act_bits,
                 int64_t act_terms) {
    torch::jit::Stack st = {x, pw, c10::IValue(), stride, std::vector<int64_t>{1, 1},
                            std::vector<int64_t>{1, 1}, C, int64_t{2}, act_bits, act_terms,
                            mid, channel, digits, std::vector<int64_t>{}, std::vector<double>{}};
    conv.callBoxed(&st);
    return st[0].toTensor();
  };
  auto expanded = [&](const at::Tensor& x, int64_t act_terms) {
    torch::jit::Stack st = {x, int64_t{4}, act_terms, mid, channel, false, digits};
    expand.callBoxed(&st);
    return st[0].toTensor();
  };
  at::manual_seed(7);
  for (const auto& stride : {std::vector<int64_t>{1, 1}, {2, 1}, {1, 2}}) {
    for (int64_t n : {1, 3}) {
      at::Tensor x = at::randn({n, C, 12, 20}, at::TensorOptions().dtype(at::kFloat));
      x.select(1, 2).zero_();                                   // a channel of zeros
      x.select(1, 3).clamp_min_(0);                             // a ReLU'd channel
      x.select(1, 5).mul_(1e-39);                               // subnormal scales
      for (int64_t ka : {1, 2}) {
        const at::Tensor want = run(expanded(x, ka), stride, 0, 0);
        const at::Tensor got = run(x, stride, 4, ka);
        ASSERT_TRUE(at::equal(got, want)) << "stride " << stride[0] << "x" << stride[1]
                                          << " n " << n << " K_a " << ka << " max diff "
                                          << (got - want).abs().max().item<float>();
      }
    }
  }
  at::Tensor bad = at::randn({2, C, 12, 20}, at::TensorOptions().dtype(at::kFloat));
  bad[1][4][3][7] = std::numeric_limits<float>::quiet_NaN();
  std::string want_error, got_error;
  try {
    expanded(bad, 2);
  } catch (const c10::Error& err) {
    want_error = err.what_without_backtrace();
  }
  try {
    run(bad, {1, 1}, 4, 2);
  } catch (const c10::Error& err) {
    got_error = err.what_without_backtrace();
  }
  ASSERT_FALSE(want_error.empty());
  EXPECT_EQ(got_error, want_error);
}

TEST(AtenPool, ParallelForUsesMoreThanOneThread) {
  const char* omp = std::getenv("OMP_NUM_THREADS");
  if (std::thread::hardware_concurrency() < 2 || (omp != nullptr && std::atoi(omp) == 1)) {
    GTEST_SKIP() << "one intra-op thread here";
  }
  // Loading a network sets LibTorch's intra-op threads (Model::Options::threads, 2), as in the
  // server; LibTorch's own default on this machine is 1.
  ASSERT_NE(MustLoad(TinyModelFile("conv_zoo.pt"), true), nullptr);
  std::mutex mu;
  std::set<std::thread::id> ids;
  std::vector<int> hits(64, 0);
  AtenPool().ParallelFor(64, [&](int64_t i) {
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
    ++hits[static_cast<size_t>(i)];
  });
  EXPECT_EQ(std::count(hits.begin(), hits.end(), 1), 64);  // every index exactly once
  EXPECT_GE(ids.size(), 2u) << "at::parallel_for ran serially: is model/ built with OpenMP?";
}

TEST(PackedOpsModel, SavedPackedModelReloadsAndSelectsTermsPerCall) {
  std::unique_ptr<Model> packed = MustLoad(TinyModelFile("conv_zoo.pt"), true);
  ASSERT_TRUE(packed->Expand(Spec(4, 2), nullptr).ok());
  const HostTensor x = RandomInput({1, 4, 6, 6}, 3);
  ASSERT_TRUE(packed->SetPrecision(2, 0).ok());
  auto y2 = packed->Forward(x);
  ASSERT_TRUE(packed->SetPrecision(1, 0).ok());
  auto y1 = packed->Forward(x);
  ASSERT_TRUE(y1.ok() && y2.ok());
  EXPECT_NE(y1->f32, y2->f32);  // one module, two precisions
  ScratchDir dir;
  ASSERT_TRUE(packed->SavePacked(dir.File("packed.pt")).ok());
  // The saved network loads as a packed network (its PackedWeights are the layers) and serves
  // every precision, bit for bit.
  std::unique_ptr<Model> back = MustLoad(dir.File("packed.pt"), true);
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(back->layers().size(), 6u);
  EXPECT_EQ(back->layers()[0].op, "packed");
  EXPECT_EQ(back->spec().weights.terms, 2);
  auto r2 = back->Forward(x);  // all terms by default
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->f32, y2->f32);
  ASSERT_TRUE(back->SetPrecision(1, 0).ok());
  EXPECT_EQ(back->Forward(x)->f32, y1->f32);
  EXPECT_EQ(back->SetPrecision(3, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(back->SetPrecision(0, 0).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(back->weight_memory().packed_layers, 6);
  // Saving before anything is expanded says so.
  std::unique_ptr<Model> fresh = MustLoad(TinyModelFile("conv_zoo.pt"), true);
  EXPECT_EQ(fresh->SavePacked(dir.File("none.pt")).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(PackedOpsModel, ReleasedModelServesOnlyPackedPrecisionsWithKbOver32Memory) {
  std::unique_ptr<Model> m = MustLoad(TinyModelFile("conv_zoo.pt"), true);
  ASSERT_TRUE(m->Expand(Spec(4, 2), nullptr).ok());
  EXPECT_EQ(m->ReleaseAllButPacked().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(m->SetPrecision(2, 0).ok());
  const HostTensor x = RandomInput({1, 4, 9, 9}, 5);
  auto before = m->Forward(x);
  ASSERT_TRUE(before.ok());
  ASSERT_TRUE(m->ReleaseAllButPacked().ok());
  auto after = m->Forward(x);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->f32, before->f32);
  EXPECT_TRUE(m->SetPrecision(1, 0).ok());
  EXPECT_TRUE(m->Forward(x).ok());
  EXPECT_EQ(m->SetPrecision(0, 0).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m->SaveDequantized(TinyModelFile("x.pt")).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(m->Expand(Spec(4, 2), nullptr).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(m->FpParams().layers.empty());
  const Model::WeightMemory mem = m->weight_memory();
  EXPECT_EQ(mem.packed_layers, 6);
  // Tiny layers: per-channel scales and offsets weigh in; K·b/32 = 0.25 plus them.
  EXPECT_GT(mem.resident_bytes, mem.fp32_bytes * 0.25);
  EXPECT_LT(mem.resident_bytes, mem.fp32_bytes * 0.5) << mem.resident_bytes << " / " << mem.fp32_bytes;
}

ModelExpansionSpec SpecWA(int bits, int terms, int act_bits, int act_terms, bool truncate) {
  ModelExpansionSpec s = Spec(bits, terms);
  s.act_bits = act_bits;
  s.act_terms = act_terms;
  s.truncate = truncate;
  return s;
}

// W4A4×2 with variant D weights and activations on the mid grid: the spec that folds.
ModelExpansionSpec FoldedSpecWA() {
  ModelExpansionSpec s = SpecWA(4, 2, 4, 2, false);
  s.weights.grid = core::Grid::kMid;
  s.weights.variant = core::Variant::kDigits;
  s.act_grid = core::Grid::kMid;
  s.act_variant = core::Variant::kDigits;
  return s;
}

// W×A on the packed network: integer ops (linear_wa on tokens and the matmul, conv2d_wa on the
// 1x1 convolution) and dequantize + act_expand for the rest, against the dequantized model
// layer, at every (K_w', K_a').
TEST(PackedOpsModel, ExpandedActivationsMatchTheModelLayer) {
  const ModelExpansionSpec spec = SpecWA(4, 2, 4, 2, false);
  std::unique_ptr<Model> dense = MustLoad(TinyModelFile("conv_zoo.pt"), false);
  std::unique_ptr<Model> packed = MustLoad(TinyModelFile("conv_zoo.pt"), true);
  ASSERT_TRUE(dense->Expand(spec, nullptr).ok());
  ASSERT_TRUE(packed->Expand(spec, nullptr).ok());
  for (const auto& shape : {std::vector<int64_t>{1, 4, 5, 6}, std::vector<int64_t>{2, 4, 17, 11}}) {
    HostTensor x = RandomInput(shape, 11);
    for (int kw = 1; kw <= 2; ++kw) {
      for (int ka = 1; ka <= 2; ++ka) {
        ASSERT_TRUE(dense->SetPrecision(kw, ka).ok());
        ASSERT_TRUE(packed->SetPrecision(kw, ka).ok());
        EXPECT_EQ(packed->weight_memory().packed_layers, 6);
        // fc -> relu runs as linear_wa with the ReLU in its epilogue.
        EXPECT_EQ(packed->weight_memory().integer_layers, 3);
        EXPECT_EQ(packed->weight_memory().fused_post_ops, 1);
        auto want = dense->Forward(x);
        auto got = packed->Forward(x);
        ASSERT_TRUE(want.ok() && got.ok()) << got.status();
        EXPECT_LT(MaxRelErr(got->f32, want->f32), 1e-4) << "K_w'=" << kw << " K_a'=" << ka;
      }
    }
  }
  // Weight-only precisions of the same expansion still run packed.
  ASSERT_TRUE(packed->SetPrecision(2, 0).ok());
  EXPECT_EQ(packed->weight_memory().packed_layers, 6);
  // Saved and reloaded: a W×A packed network (forward(x, terms, act_terms)).
  ASSERT_TRUE(packed->SetPrecision(2, 2).ok());
  const HostTensor x = RandomInput({1, 4, 7, 7}, 12);
  auto y22 = packed->Forward(x);
  ASSERT_TRUE(packed->SetPrecision(2, 1).ok());
  auto y21 = packed->Forward(x);
  ScratchDir dir;
  ASSERT_TRUE(packed->SavePacked(dir.File("wa.pt")).ok());
  std::unique_ptr<Model> back = MustLoad(dir.File("wa.pt"), true);
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(back->spec().act_terms, 2);
  EXPECT_EQ(back->Forward(x)->f32, y22->f32);  // defaults: all terms
  ASSERT_TRUE(back->SetPrecision(2, 1).ok());
  EXPECT_EQ(back->Forward(x)->f32, y21->f32);
  EXPECT_EQ(back->SetPrecision(2, 0).code(), absl::StatusCode::kFailedPrecondition);
}

// Folded W×A (variant D weights and activations, K·b = 8 each side): linear, matmul and the 1x1
// convolution run linear_folded / conv2d_folded, everything against the dequantized model layer
// at every (K_w', K_a') (the partial ones take the act_expand route inside the same ops); saved
// and reloaded, the folded network gives the same bits.
TEST(PackedOpsModel, FoldedProductsMatchTheModelLayer) {
  ModelExpansionSpec spec = FoldedSpecWA();
  std::string how;
  ASSERT_TRUE(spec.Folds(&how)) << how;
  EXPECT_TRUE(absl::StrContains(how, "4 term products as one u8 x s8 product")) << how;
  std::unique_ptr<Model> dense = MustLoad(TinyModelFile("conv_zoo.pt"), false);
  std::unique_ptr<Model> packed = MustLoad(TinyModelFile("conv_zoo.pt"), true);
  ASSERT_TRUE(dense->Expand(spec, nullptr).ok());
  ASSERT_TRUE(packed->Expand(spec, nullptr).ok());
  for (const auto& shape : {std::vector<int64_t>{1, 4, 5, 6}, std::vector<int64_t>{2, 4, 17, 11}}) {
    HostTensor x = RandomInput(shape, 21);
    for (int kw = 1; kw <= 2; ++kw) {
      for (int ka = 1; ka <= 2; ++ka) {
        ASSERT_TRUE(dense->SetPrecision(kw, ka).ok());
        ASSERT_TRUE(packed->SetPrecision(kw, ka).ok());
        const Model::WeightMemory mem = packed->weight_memory();
        EXPECT_EQ(mem.packed_layers, 6);
        EXPECT_EQ(mem.folded_layers, 3);  // the linear on tokens, the matmul, the 1x1 conv
        EXPECT_EQ(mem.integer_layers, 0);
        EXPECT_EQ(mem.fused_post_ops, 1);  // fc -> relu
        auto want = dense->Forward(x);
        auto got = packed->Forward(x);
        ASSERT_TRUE(want.ok() && got.ok()) << got.status();
        EXPECT_LT(MaxRelErr(got->f32, want->f32), 1e-4) << "K_w'=" << kw << " K_a'=" << ka;
      }
    }
  }
  ASSERT_TRUE(packed->SetPrecision(2, 2).ok());
  const HostTensor x = RandomInput({1, 4, 7, 7}, 22);
  auto y = packed->Forward(x);
  ASSERT_TRUE(y.ok()) << y.status();
  ScratchDir dir;
  ASSERT_TRUE(packed->SavePacked(dir.File("folded.pt")).ok());
  std::unique_ptr<Model> back = MustLoad(dir.File("folded.pt"), true);
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(back->weight_memory().folded_layers, 3);
  EXPECT_EQ(back->Forward(x)->f32, y->f32);

  // Variant R activations on the same weights: nothing folds, and the report says why.
  spec.act_variant = core::Variant::kRescaled;
  EXPECT_FALSE(spec.Folds(&how));
  EXPECT_TRUE(absl::StrContains(how, "not folded: folding needs variant digits")) << how;
  ASSERT_TRUE(packed->Expand(spec, nullptr).ok());
  ASSERT_TRUE(packed->SetPrecision(2, 2).ok());
  EXPECT_EQ(packed->weight_memory().folded_layers, 0);
}

// The elementwise ops after packed layers run in the folded op's epilogue or as one
// fpxint::post_ pass per layer: the decomposed hardswish and a learnable scale and shift after
// the 1x1 conv (3 steps; freezing folds the scale and shift before it into the conv) and
// hardswish, div, sub, relu after the depthwise one (4), on the weight-only and the folded W×A
// network.
TEST(PackedOpsModel, ElementwiseTailsRunInOnePassPerLayer) {
  for (const ModelExpansionSpec& spec : {Spec(4, 2), FoldedSpecWA()}) {
    std::unique_ptr<Model> dense = MustLoad(TinyModelFile("tail_zoo.pt"), false);
    std::unique_ptr<Model> packed = MustLoad(TinyModelFile("tail_zoo.pt"), true);
    ASSERT_TRUE(dense->Expand(spec, nullptr).ok());
    ASSERT_TRUE(packed->Expand(spec, nullptr).ok());
    const int ka = spec.act_bits > 0 ? 2 : 0;
    ASSERT_TRUE(dense->SetPrecision(2, ka).ok());
    ASSERT_TRUE(packed->SetPrecision(2, ka).ok());
    const Model::WeightMemory mem = packed->weight_memory();
    EXPECT_EQ(mem.packed_layers, 2);
    EXPECT_EQ(mem.fused_tail_steps, 7) << "K_a " << ka;
    EXPECT_EQ(dense->weight_memory().fused_tail_steps, 0);
    for (const auto& shape : {std::vector<int64_t>{1, 4, 5, 6}, std::vector<int64_t>{3, 4, 9, 7}}) {
      HostTensor x = RandomInput(shape, 31);
      auto want = dense->Forward(x);
      auto got = packed->Forward(x);
      ASSERT_TRUE(want.ok() && got.ok()) << got.status();
      EXPECT_LT(MaxRelErr(got->f32, want->f32), 1e-4) << "K_a " << ka;
    }
    // Saved, the network passes the upload vetting the server applies to what it reloads, and
    // loads back with its tails, bit for bit.
    ScratchDir dir;
    ASSERT_TRUE(packed->SavePacked(dir.File("tails.pt")).ok());
    auto vet = VetTorchScript(::fpxint::testing::ReadFileOrDie(dir.File("tails.pt")),
                              OpAllowList::BuiltIn());
    ASSERT_TRUE(vet.ok()) << vet.status();
    EXPECT_TRUE(vet->passed) << vet->Summary();
    std::unique_ptr<Model> back = MustLoad(dir.File("tails.pt"), true);
    ASSERT_NE(back, nullptr);
    EXPECT_EQ(back->weight_memory().fused_tail_steps, 7);
    const HostTensor x = RandomInput({2, 4, 6, 5}, 32);
    auto a = packed->Forward(x);
    auto b = back->Forward(x);
    ASSERT_TRUE(a.ok() && b.ok()) << b.status();
    EXPECT_EQ(a->f32, b->f32);
  }
}

// fpxint::post_ gives LibTorch's bits for each step, infinities, signed zeros and subnormals
// included (NaN where LibTorch gives NaN; ATen's vector max/min write all-ones NaNs, so NaN
// payloads may differ), on contiguous and strided tensors; and names what it rejects.
TEST(PackedOps, PostStepsGiveTheLibTorchOpsBits) {
  const auto& post = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::post_", "");
  const auto run = [&](at::Tensor y, std::vector<int64_t> ops, std::vector<double> values) {
    torch::jit::Stack st = {y, ops, values};
    post.callBoxed(&st);
    return st[0].toTensor();
  };
  at::manual_seed(3);
  at::Tensor x = at::randn({5, 7, 33, 41}, at::TensorOptions().dtype(at::kFloat)) * 4;
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            0.0f, -0.0f, -3.0f, 3.0f, 6.0f, -6.0f, 1e-40f, -1e-40f, 3e38f};
  for (size_t i = 0; i < sizeof(specials) / sizeof(specials[0]); ++i) {
    x.view({-1})[static_cast<int64_t>(i * 97)] = specials[i];
  }
  const auto bits = [](const at::Tensor& t) {
    return t.masked_fill(t.isnan(), 0.0f).contiguous().view(at::kInt);
  };
  const at::Tensor three = at::scalar_tensor(3.0, at::kDouble), six = at::scalar_tensor(6.0, at::kDouble);
  const auto aten_tail = [&](at::Tensor h) {
    h = at::mul(h, at::full({1}, 0.7f));
    h = at::add(h, at::full({1}, -0.3f));
    h = at::div(at::mul(h, at::clamp(at::add(h, three), 0.0, 6.0)), six);
    h = at::relu(at::sub(h, 0.1));
    return at::div(at::hardswish(h), 3.0);
  };
  const std::vector<int64_t> ops = {3, 4, 2, 4, 1, 2, 5};
  const std::vector<double> values = {0.7f, -0.3f, 0, -0.1f, 0, 0, 3.0};
  for (const bool strided : {false, true}) {
    at::Tensor y = strided ? x.transpose(1, 3) : x;
    const at::Tensor want = aten_tail(y);
    const at::Tensor got = run(y.clone(), ops, values);
    ASSERT_TRUE(at::equal(got.isnan(), want.isnan())) << "strided " << strided;
    ASSERT_TRUE(at::equal(bits(got), bits(want))) << "strided " << strided;
  }
  const auto error = [&](std::vector<int64_t> o, std::vector<double> v, at::Tensor y) {
    try {
      run(y, std::move(o), std::move(v));
    } catch (const c10::Error& err) {
      return std::string(err.what_without_backtrace());
    }
    return std::string();
  };
  EXPECT_TRUE(absl::StrContains(error({3, 9}, {1, 1}, x.clone()), "step 1 op 9 unknown"));
  EXPECT_TRUE(absl::StrContains(error({3}, {1, 2}, x.clone()), "1 steps but 2 values"));
  EXPECT_TRUE(absl::StrContains(error({3}, {1}, x.to(at::kDouble)), "takes float32"));
  EXPECT_TRUE(absl::StrContains(error({}, {}, x.clone()), "no steps; give 1..16"));
  EXPECT_TRUE(absl::StrContains(
      error(std::vector<int64_t>(17, 3), std::vector<double>(17, 1.0), x.clone()),
      "17 steps; accepted at most 16"));
}

// conv2d_folded and conv2d_wa with a tail in their epilogue give the bits of the op without it
// followed by the LibTorch ops.
TEST(PackedOps, EpilogueTailsGiveTheLibTorchOpsBits) {
  const int64_t cin = 24, cout = 40;
  // The same weights on the two grids: variant D (the folded op) and residual sym (the integer
  // op).
  const c10::IValue folded_w = PackedW4x2({cout, cin, 1, 1}, 9);
  const c10::IValue int_w =
      PackedW4x2({cout, cin, 1, 1}, 9, core::Grid::kSym, core::Variant::kRescaled);
  const auto& folded = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::conv2d_folded", "");
  const auto& wa = c10::Dispatcher::singleton().findSchemaOrThrow("fpxint::conv2d_wa", "");
  at::manual_seed(5);
  const at::Tensor x = at::randn({2, cin, 9, 11}, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor bias = at::randn({cout}, at::TensorOptions().dtype(at::kFloat));
  const std::vector<int64_t> one = {1, 1}, zero = {0, 0};
  const std::vector<int64_t> ops = {3, 4, 2, 3, 4, 5};
  const std::vector<double> values = {0.75f, -0.125f, 0, 1.5f, 0.25f, 3.0f};
  const auto aten_tail = [](at::Tensor h) {
    h = at::add(at::mul(h, at::full({1}, 0.75f)), at::full({1}, -0.125f));
    h = at::div(at::mul(h, at::clamp(at::add(h, 3.0), 0.0, 6.0)), 6.0);
    return at::div(at::add(at::mul(h, 1.5), 0.25), 3.0);
  };
  for (const int64_t post : {int64_t{0}, int64_t{1}}) {
    const auto call_folded = [&](std::vector<int64_t> o, std::vector<double> v) {
      torch::jit::Stack st = {x, folded_w, bias, one, zero, one, int64_t{1}, int64_t{0},
                              int64_t{4}, int64_t{2}, post, std::move(o), std::move(v)};
      folded.callBoxed(&st);
      return st[0].toTensor();
    };
    const auto call_wa = [&](std::vector<int64_t> o, std::vector<double> v) {
      torch::jit::Stack st = {x, int_w, bias, one, zero, one, int64_t{1}, int64_t{0}, int64_t{4},
                              int64_t{2}, false, false,
                              static_cast<int64_t>(ActGranularity::kPixel), post, std::move(o),
                              std::move(v)};
      wa.callBoxed(&st);
      return st[0].toTensor();
    };
    EXPECT_TRUE(at::equal(call_folded(ops, values), aten_tail(call_folded({}, {}))))
        << "post " << post;
    EXPECT_TRUE(at::equal(call_wa(ops, values), aten_tail(call_wa({}, {})))) << "post " << post;
  }
  // An unbatched [C, H, W] input gives an unbatched result, folded (all terms) or not (K' = 1:
  // the activation's expansion through fpxint::conv2d), the image's values of a batch of one.
  for (const int64_t terms : {int64_t{0}, int64_t{1}}) {
    const auto call = [&](const at::Tensor& in) {
      torch::jit::Stack st = {in, folded_w, bias, one, zero, one, int64_t{1}, terms, int64_t{4},
                              int64_t{2}, int64_t{1}, ops, values};
      folded.callBoxed(&st);
      return st[0].toTensor();
    };
    const at::Tensor image = x.select(0, 1), got = call(image);
    ASSERT_EQ(got.dim(), 3) << "terms " << terms;
    EXPECT_TRUE(at::equal(got, call(image.unsqueeze(0)).squeeze(0))) << "terms " << terms;
  }
}

// Order truncation: the integer ops run it; a network with layers they do not take (grouped,
// depthwise, conv1d) falls back to the dequantized network instead of failing.
TEST(PackedOpsModel, TruncatedProductsRunOnIntegerOpsOrFallBack) {
  const ModelExpansionSpec spec = SpecWA(4, 2, 4, 2, true);
  std::unique_ptr<Model> dense = MustLoad(TinyModelFile("c8_mlp.pt"), false);
  std::unique_ptr<Model> packed = MustLoad(TinyModelFile("c8_mlp.pt"), true);
  ASSERT_TRUE(dense->Expand(spec, nullptr).ok());
  ASSERT_TRUE(packed->Expand(spec, nullptr).ok());
  ASSERT_TRUE(dense->SetPrecision(2, 2).ok());
  ASSERT_TRUE(packed->SetPrecision(2, 2).ok());
  EXPECT_EQ(packed->weight_memory().packed_layers, static_cast<int>(packed->layers().size()));
  // Every layer but the last is followed by a ReLU, fused into its epilogue.
  EXPECT_EQ(packed->weight_memory().fused_post_ops,
            static_cast<int>(packed->layers().size()) - 1);
  // 5 rows: the integer dot products, against the dequantized network. 40 rows: the integer
  // GEMM (VNNI) or the dense route. Activation scales are per row, so every row must come out
  // exactly as it does in calls of 5 rows. (The dequantized network is no reference for 40 rows:
  // through four re-quantized layers, float sums in another order sooner or later move a code
  // that sits on a rounding boundary.)
  const HostTensor x5 = RandomInput({5, 256}, 13);
  const HostTensor x40 = RandomInput({40, 256}, 14);
  for (int kw = 1; kw <= 2; ++kw) {
    for (int ka = 1; ka <= 2; ++ka) {
      ASSERT_TRUE(dense->SetPrecision(kw, ka).ok());
      ASSERT_TRUE(packed->SetPrecision(kw, ka).ok());
      auto want = dense->Forward(x5);
      auto got = packed->Forward(x5);
      ASSERT_TRUE(want.ok() && got.ok()) << got.status();
      EXPECT_LT(MaxRelErr(got->f32, want->f32), 1e-4) << "K_w'=" << kw << " K_a'=" << ka;
      std::vector<float> by_five;
      for (int64_t r0 = 0; r0 < 40; r0 += 5) {
        const HostTensor part = HostTensor::Float(
            {5, 256}, std::vector<float>(x40.f32.begin() + r0 * 256,
                                         x40.f32.begin() + (r0 + 5) * 256));
        auto y = packed->Forward(part);
        ASSERT_TRUE(y.ok()) << y.status();
        by_five.insert(by_five.end(), y->f32.begin(), y->f32.end());
      }
      auto all = packed->Forward(x40);
      ASSERT_TRUE(all.ok()) << all.status();
      if (PackedMaxRows() >= 0 && PackedMaxRows() < 40) continue;  // forced dense route
      EXPECT_EQ(all->f32, by_five) << "40 rows, K_w'=" << kw << " K_a'=" << ka;
    }
  }

  std::unique_ptr<Model> zoo = MustLoad(TinyModelFile("conv_zoo.pt"), true);
  ASSERT_TRUE(zoo->Expand(spec, nullptr).ok());
  ASSERT_TRUE(zoo->SetPrecision(2, 2).ok());
  EXPECT_EQ(zoo->weight_memory().packed_layers, 0);  // the dequantized network
  EXPECT_TRUE(zoo->Forward(RandomInput({1, 4, 5, 6}, 14)).ok());
  ScratchDir dir;
  const absl::Status s = zoo->SavePacked(dir.File("t.pt"));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(s.message(), "order-truncated")) << s;
}

// The default activation scales are never coarser than a sample: a sample batched with others
// (here one 100x larger and one 100x smaller) comes out as it does alone, on the integer ops
// (linear_wa on tokens, conv2d_wa with per-pixel and, truncated, per-sample scales) and on the
// act_expand route (the other convolutions), packed and dense. ActScale::kTensor is one scale
// for the whole batch (the reference's setting), so there the small sample does change.
void ExpectSamplesAsAlone(Model* m, const std::vector<int64_t>& one, bool coupled,
                          const std::string& what) {
  std::vector<int64_t> shape = one;
  shape[0] = 3;
  HostTensor x = RandomInput(shape, 31);
  const int64_t n = static_cast<int64_t>(x.f32.size()) / 3;
  for (int64_t i = 0; i < n; ++i) {
    x.f32[static_cast<size_t>(n + i)] *= 100.0f;
    x.f32[static_cast<size_t>(2 * n + i)] *= 0.01f;
  }
  auto all = m->Forward(x);
  ASSERT_TRUE(all.ok()) << all.status();
  const size_t out = all->f32.size() / 3;
  for (int64_t s = 0; s < 3; ++s) {
    const HostTensor xs = HostTensor::Float(
        one, std::vector<float>(x.f32.begin() + s * n, x.f32.begin() + (s + 1) * n));
    auto alone = m->Forward(xs);
    ASSERT_TRUE(alone.ok()) << alone.status();
    const std::vector<float> got(all->f32.begin() + static_cast<int64_t>(s * out),
                                 all->f32.begin() + static_cast<int64_t>((s + 1) * out));
    if (!coupled) {
      EXPECT_LT(MaxRelErr(got, alone->f32), 1e-4) << what << ", sample " << s;
    } else if (s == 2) {
      EXPECT_GT(MaxRelErr(got, alone->f32), 1e-2) << what << ", sample " << s;
    }
  }
}

TEST(PackedOpsModel, BatchedSamplesKeepTheirOwnActivationScales) {
  for (const bool truncate : {false, true}) {
    const char* file = truncate ? "tiny_cnn.pt" : "conv_zoo.pt";
    for (const bool packed : {true, false}) {
      for (const auto scale :
           {ModelExpansionSpec::ActScale::kAuto, ModelExpansionSpec::ActScale::kTensor}) {
        ModelExpansionSpec spec = SpecWA(4, 2, 4, 2, truncate);
        spec.act_scale = scale;
        std::unique_ptr<Model> m = MustLoad(TinyModelFile(file), packed);
        ASSERT_TRUE(m->Expand(spec, nullptr).ok());
        ASSERT_TRUE(m->SetPrecision(2, 2).ok());
        const bool per_tensor = scale == ModelExpansionSpec::ActScale::kTensor;
        if (packed && !per_tensor) {
          // conv_zoo: linear, matmul, 1x1 conv; tiny_cnn: its 3x3 conv, linear and matmul.
          EXPECT_EQ(m->weight_memory().integer_layers, 3) << file;
        }
        ExpectSamplesAsAlone(m.get(), truncate ? std::vector<int64_t>{1, 3, 8, 8}
                                               : std::vector<int64_t>{1, 4, 6, 8},
                             per_tensor,
                             std::string(file) + (packed ? " packed" : " dense") +
                                 (per_tensor ? ", per-tensor scales" : ""));
      }
    }
  }
}

TEST(PackedOpsModel, RealOcrClassifierResidentWeightsAreKbOver32) {
  const char* dir = std::getenv("FPXINT_MODELS_DIR");
  ASSERT_NE(dir, nullptr);
  std::unique_ptr<Model> m = MustLoad(std::string(dir) + "/ocr/ocr_cls.pt", true);
  ASSERT_NE(m, nullptr) << "run scripts/fetch_models.sh";
  ASSERT_TRUE(m->Expand(Spec(4, 2), nullptr).ok());
  ASSERT_TRUE(m->SetPrecision(2, 0).ok());
  ASSERT_TRUE(m->ReleaseAllButPacked().ok());
  const Model::WeightMemory mem = m->weight_memory();
  EXPECT_EQ(mem.packed_layers, static_cast<int>(m->layers().size()));
  const double ratio = static_cast<double>(mem.resident_bytes) / mem.fp32_bytes;
  EXPECT_GT(ratio, 0.25);  // K·b/32 ...
  EXPECT_LT(ratio, 0.40);  // ... + per-channel scales and offsets of small layers
}

}  // namespace
}  // namespace fpxint::model
