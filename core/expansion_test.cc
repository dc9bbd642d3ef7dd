// docs/ALGORITHM.md §7 checks that apply to tensors (C1–C6, C9 at tensor level, C10, C12, C13),
// on Gaussian, Laplace and heavy-tailed inputs. Real weights are covered in artifact_test.cc.
#include "core/expansion.h"

#include <cfloat>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <utility>

#include "core/packing.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::core {
namespace {

using ::fpxint::testing::Dist;
using ::fpxint::testing::RandomValues;
using ::fpxint::testing::ToFloat;

ExpansionSpec Spec(int bits, int terms, Grid grid, ScaleGranularity scale, int64_t g = 0,
                   Variant v = Variant::kRescaled) {
  ExpansionSpec s;
  s.bits = bits;
  s.terms = terms;
  s.grid = grid;
  s.scale = scale;
  s.group_size = g;
  s.variant = v;
  return s;
}

// Every activation spec with 3 terms and `scale`: the three grids at b = 2, 4, 8, variant D on
// the mid grid, and an unsigned first term on the sym grid (for inputs >= 0).
std::vector<ExpansionSpec> ActivationSpecs(ScaleGranularity scale) {
  std::vector<ExpansionSpec> specs;
  for (Grid grid : {Grid::kSym, Grid::kAsym, Grid::kMid}) {
    for (int bits : {2, 4, 8}) {
      for (Variant v : {Variant::kRescaled, Variant::kDigits}) {
        if (v == Variant::kDigits && grid != Grid::kMid) continue;
        for (bool unsigned_first : {false, true}) {
          if (unsigned_first && grid != Grid::kSym) continue;
          specs.push_back(Spec(bits, 3, grid, scale, 0, v));
          specs.back().unsigned_first = unsigned_first;
        }
      }
    }
  }
  return specs;
}

TensorExpansion MustExpand(const std::vector<double>& w, std::vector<int64_t> shape,
                           const ExpansionSpec& spec, const ExpandOptions& o = {}) {
  absl::StatusOr<TensorExpansion> e = ExpandTensor(w, shape, spec, o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *std::move(e) : TensorExpansion{};
}

// Relative Frobenius and max errors of the reconstruction after k terms, measured independently
// of the expansion's own statistics.
std::pair<double, double> MeasuredErrors(const std::vector<double>& w, const TensorExpansion& e,
                                         int k) {
  std::vector<double> rec = Reconstruct(e, k);
  double num = 0, den = 0, mx = 0, wmax = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    num += (w[i] - rec[i]) * (w[i] - rec[i]);
    den += w[i] * w[i];
    mx = std::max(mx, std::fabs(w[i] - rec[i]));
    wmax = std::max(wmax, std::fabs(w[i]));
  }
  return {std::sqrt(num / den), mx / wmax};
}

// The reference test tensor itself (docs/ALGORITHM.md §7, numpy default_rng(0)), so that
// per-tensor errors, which follow the sample maximum, are compared on the same samples.
const std::vector<double>& Gaussian512() {
  static const std::vector<double> v = ::fpxint::testing::ReferenceGaussian512();
  return v;
}

// Values rounded to float: real weights are fp32 (or narrower).
std::vector<double> FloatValued(std::vector<double> v) {
  for (double& x : v) x = static_cast<float>(x);
  return v;
}

// ---- C3: relative Frobenius error per term against the reference numbers (±5 %) ----

struct C3Case {
  const char* name;
  int bits;
  Grid grid;
  ScaleGranularity scale;
  double expected[4];
};

class C3Test : public ::testing::TestWithParam<C3Case> {};

TEST_P(C3Test, MatchesReferenceWithinFivePercent) {
  const C3Case& c = GetParam();
  const std::vector<double>& w = Gaussian512();
  ASSERT_EQ(w.size(), 512u * 512u);
  TensorExpansion e = MustExpand(w, {512, 512}, Spec(c.bits, 4, c.grid, c.scale));
  ASSERT_EQ(e.errors.size(), 4u);
  for (int k = 1; k <= 4; ++k) {
    EXPECT_NEAR(e.errors[k - 1].rel_fro / c.expected[k - 1], 1.0, 0.05) << c.name << " k=" << k;
    // The expansion's own statistics agree with an independent reconstruction.
    auto [fro, mx] = MeasuredErrors(w, e, k);
    EXPECT_NEAR(fro / e.errors[k - 1].rel_fro, 1.0, 1e-6) << c.name << " k=" << k;
    EXPECT_NEAR(mx / e.errors[k - 1].rel_max, 1.0, 1e-6) << c.name << " k=" << k;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Reference, C3Test,
    ::testing::Values(
        C3Case{"sym_tensor_b4", 4, Grid::kSym, ScaleGranularity::kTensor, {1.95e-1, 1.39e-2, 9.94e-4, 7.1e-5}},
        C3Case{"sym_channel_b4", 4, Grid::kSym, ScaleGranularity::kChannel, {1.35e-1, 9.62e-3, 6.85e-4, 4.88e-5}},
        C3Case{"sym_tensor_b2", 2, Grid::kSym, ScaleGranularity::kTensor, {0.970, 0.671, 0.341, 0.170}},
        C3Case{"mid_tensor_b4", 4, Grid::kMid, ScaleGranularity::kTensor, {0.171, 1.06e-2, 6.66e-4, 4.16e-5}},
        C3Case{"asym_tensor_b4", 4, Grid::kAsym, ScaleGranularity::kTensor, {0.179, 1.20e-2, 7.97e-4, 5.30e-5}}),
    [](const ::testing::TestParamInfo<C3Case>& i) { return std::string(i.param.name); });

// ---- C1: contraction per term (k >= 2) equals r within ±3 % ----

struct C1Case {
  int bits;
  Grid grid;
  double r;
};

class C1Test : public ::testing::TestWithParam<C1Case> {};

TEST_P(C1Test, ContractionRatioIsR) {
  const C1Case& c = GetParam();
  ExpansionSpec spec = Spec(c.bits, 5, c.grid, ScaleGranularity::kTensor);
  EXPECT_NEAR(spec.contraction(), c.r, c.r * 1e-3);
  TensorExpansion e = MustExpand(Gaussian512(), {512, 512}, spec);
  for (int k = 2; k < 5; ++k) {
    const double fro = e.errors[k].rel_fro / e.errors[k - 1].rel_fro;
    const double mx = e.errors[k].max_abs / e.errors[k - 1].max_abs;
    EXPECT_NEAR(fro / c.r, 1.0, 0.03) << "k=" << k;
    EXPECT_NEAR(mx / c.r, 1.0, 0.03) << "k=" << k;
  }
}

INSTANTIATE_TEST_SUITE_P(Reference, C1Test,
                         ::testing::Values(C1Case{2, Grid::kSym, 0.5}, C1Case{3, Grid::kSym, 0.1667},
                                           C1Case{4, Grid::kSym, 0.0714}, C1Case{8, Grid::kSym, 0.00394},
                                           C1Case{4, Grid::kAsym, 0.0667}, C1Case{4, Grid::kMid, 0.0625}));

// C1 beyond the Gaussian: after the first term the residual is roughly uniform within its
// bound whatever the source, so the per-term ratio is r on Laplace and heavy-tailed (Student-t,
// 3 degrees of freedom) weights too, per tensor and per channel.
TEST(C1Distributions, ContractionRatioIsROnLaplaceAndHeavyTails) {
  int checked = 0;
  for (Dist d : {Dist::kLaplace, Dist::kStudentT3}) {
    const std::vector<double> w = FloatValued(RandomValues(d, 512 * 512, 11));
    for (Grid g : {Grid::kSym, Grid::kMid, Grid::kAsym}) {
      for (ScaleGranularity sc : {ScaleGranularity::kTensor, ScaleGranularity::kChannel}) {
        ExpansionSpec spec = Spec(4, 5, g, sc);
        TensorExpansion e = MustExpand(w, {512, 512}, spec);
        const double r = spec.contraction();
        for (int k = 2; k < 5; ++k) {
          const double fro = e.errors[k].rel_fro / e.errors[k - 1].rel_fro;
          const double mx = e.errors[k].max_abs / e.errors[k - 1].max_abs;
          EXPECT_NEAR(fro / r, 1.0, 0.03) << DistName(d) << " " << spec.ToString() << " k=" << k;
          EXPECT_NEAR(mx / r, 1.0, 0.03) << DistName(d) << " " << spec.ToString() << " k=" << k;
          ++checked;
        }
      }
    }
  }
  EXPECT_EQ(checked, 2 * 3 * 2 * 3);
}

// ---- C2 hard bound and C13 monotonicity, every grid, granularity, distribution and b ----

TEST(ExpansionBounds, HardBoundAndMonotonicEverywhere) {
  const Dist dists[] = {Dist::kGaussian, Dist::kLaplace, Dist::kStudentT3};
  const Grid grids[] = {Grid::kSym, Grid::kAsym, Grid::kMid};
  const ScaleGranularity scales[] = {ScaleGranularity::kTensor, ScaleGranularity::kChannel,
                                     ScaleGranularity::kGroup};
  int checked = 0;
  for (Dist d : dists) {
    const std::vector<double> w = FloatValued(RandomValues(d, 96 * 200, 7));
    for (Grid g : grids) {
      for (ScaleGranularity s : scales) {
        for (int b : {1, 2, 3, 4, 5, 8}) {
          if (g == Grid::kSym && b == 1) continue;
          ExpansionSpec spec = Spec(b, b <= 2 ? 8 : 4, g, s, s == ScaleGranularity::kGroup ? 64 : 0);
          TensorExpansion e = MustExpand(w, {96, 200}, spec);
          const double r = spec.contraction();
          double prev = e.source_max_abs;
          for (const TermError& t : e.errors) {
            // worst_ratio = max over groups of max|R_k,g| / m_g.
            EXPECT_LE(t.worst_ratio, std::pow(r, t.k) * (1 + 1e-12))
                << DistName(d) << " " << spec.ToString() << " k=" << t.k;
            EXPECT_LE(t.max_abs, prev) << DistName(d) << " " << spec.ToString() << " k=" << t.k;
            prev = t.max_abs;
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 500);
}

// ---- C4: variant D, mid b=4 K=3 equals one 12-bit mid-rise quantizer ----

TEST(ExpansionDigits, ThreeFourBitDigitsAreOneTwelveBitInt) {
  const std::vector<double> wf = FloatValued(Gaussian512());  // an fp32 tensor
  ASSERT_EQ(wf.size(), 512u * 512u);
  ExpansionSpec spec = Spec(4, 3, Grid::kMid, ScaleGranularity::kTensor, 0, Variant::kDigits);
  TensorExpansion e = MustExpand(wf, {512, 512}, spec);
  ASSERT_EQ(e.terms.size(), 3u);
  const double m = e.source_max_abs;
  // Scales are exact shifts of the first.
  EXPECT_EQ(e.terms[1].scale[0], e.terms[0].scale[0] / 16);
  EXPECT_EQ(e.terms[2].scale[0], e.terms[0].scale[0] / 256);
  // One 12-bit mid-rise quantizer on the same tensor.
  const double s12 = m / 2048;
  std::vector<double> rec = Reconstruct(e, 3);
  std::vector<int32_t> digits[3];
  for (int k = 0; k < 3; ++k) {
    digits[k].resize(wf.size());
    for (int64_t row = 0; row < 512; ++row) {
      UnpackCodes(e.terms[k].codes.data() + row * e.layout.packed_row_bytes, 512, 4, true,
                  digits[k].data() + row * 512);
    }
  }
  double max_diff = 0, max_err = 0;
  for (size_t i = 0; i < wf.size(); ++i) {
    const double c12 = std::min(2047.0, std::max(-2048.0, std::floor(wf[i] / s12)));
    const double q12 = (c12 + 0.5) * s12;
    max_diff = std::max(max_diff, std::fabs(q12 - rec[i]));
    max_err = std::max(max_err, std::fabs(wf[i] - rec[i]));
    for (int k = 0; k < 3; ++k) {
      ASSERT_GE(digits[k][i], -8);
      ASSERT_LE(digits[k][i], 7);
    }
    // Bit-exact digit identity: C12 = 256·c1 + 16·c2 + c3 + 136.
    ASSERT_EQ(static_cast<int32_t>(c12),
              256 * digits[0][i] + 16 * digits[1][i] + digits[2][i] + 136)
        << "element " << i;
  }
  EXPECT_LE(max_diff, 1e-15 * m);
  EXPECT_NEAR(max_err / (m * std::ldexp(1.0, -12)), 1.0, 1e-6);
}

// ---- C5: terms needed for fp32 precision (relative max error <= 2^-24) ----

TEST(ExpansionPrecision, TermsToFp32Precision) {
  struct Case {
    int bits;
    Grid grid;
    int expected;
  } cases[] = {{4, Grid::kMid, 6}, {4, Grid::kSym, 7}, {8, Grid::kMid, 3}, {8, Grid::kSym, 4},
               {2, Grid::kSym, 24}};
  for (const Case& c : cases) {
    TensorExpansion e = MustExpand(Gaussian512(), {512, 512},
                                   Spec(c.bits, 30, c.grid, ScaleGranularity::kTensor));
    int needed = -1;
    for (const TermError& t : e.errors) {
      if (t.rel_max <= std::ldexp(1.0, -24)) {
        needed = t.k;
        break;
      }
    }
    EXPECT_EQ(needed, c.expected) << "b=" << c.bits << " " << GridName(c.grid);
    // The closed form K = ceil(log(1/eps) / log(1/r)) agrees.
    const double r = Spec(c.bits, 1, c.grid, ScaleGranularity::kTensor).contraction();
    EXPECT_EQ(static_cast<int>(std::ceil(24 * std::log(2.0) / std::log(1 / r) - 1e-9)), c.expected);
  }
}

// ---- C6: finer scales are never worse and reach the same asymptotic r ----

TEST(ExpansionGranularity, FinerIsNeverWorse) {
  const std::vector<double> w = RandomValues(Dist::kGaussian, 1024 * 1024, 1);
  TensorExpansion t = MustExpand(w, {1024, 1024}, Spec(4, 4, Grid::kSym, ScaleGranularity::kTensor));
  TensorExpansion c = MustExpand(w, {1024, 1024}, Spec(4, 4, Grid::kSym, ScaleGranularity::kChannel));
  TensorExpansion g = MustExpand(w, {1024, 1024}, Spec(4, 4, Grid::kSym, ScaleGranularity::kGroup, 128));
  const double expected_group[] = {0.117, 8.3e-3, 5.9e-4, 4.1e-5};
  for (int k = 0; k < 4; ++k) {
    EXPECT_LE(c.errors[k].rel_fro, t.errors[k].rel_fro) << "k=" << k + 1;
    EXPECT_LE(g.errors[k].rel_fro, c.errors[k].rel_fro) << "k=" << k + 1;
    EXPECT_NEAR(g.errors[k].rel_fro / expected_group[k], 1.0, 0.05) << "k=" << k + 1;
    if (k >= 1) {
      for (const TensorExpansion* e : {&t, &c, &g}) {
        EXPECT_NEAR(e->errors[k].rel_fro / e->errors[k - 1].rel_fro / (1.0 / 14), 1.0, 0.03);
      }
    }
  }
}

// ---- C9 (tensor level): terms sum in any order ----

TEST(ExpansionAbelian, TermOrderDoesNotMatter) {
  const std::vector<double> w = RandomValues(Dist::kLaplace, 64 * 96, 3);
  // Variant D: the integer accumulation Σ_k 16^(K-k)·C_k is bit-identical for every permutation.
  TensorExpansion d = MustExpand(w, {64, 96}, Spec(4, 4, Grid::kMid, ScaleGranularity::kChannel, 0,
                                                   Variant::kDigits));
  std::vector<std::vector<int32_t>> codes(4, std::vector<int32_t>(w.size()));
  for (int k = 0; k < 4; ++k) {
    for (int64_t row = 0; row < 64; ++row) {
      UnpackCodes(d.terms[k].codes.data() + row * d.layout.packed_row_bytes, 96, 4, true,
                  codes[k].data() + row * 96);
    }
  }
  std::vector<int> order = {0, 1, 2, 3};
  std::vector<int64_t> first;
  do {
    std::vector<int64_t> acc(w.size(), 0);
    for (int k : order) {
      for (size_t i = 0; i < w.size(); ++i) acc[i] += (int64_t{1} << (4 * (3 - k))) * codes[k][i];
    }
    if (first.empty()) first = acc;
    ASSERT_EQ(acc, first);
  } while (std::next_permutation(order.begin(), order.end()));

  // Variant R: fp32 sums of the dequantized terms agree within 1e-6 relative in every order.
  TensorExpansion e = MustExpand(w, {64, 96}, Spec(4, 4, Grid::kSym, ScaleGranularity::kChannel));
  std::vector<std::vector<double>> terms(4, std::vector<double>(w.size(), 0.0));
  for (int k = 0; k < 4; ++k) AccumulateTerm(e.spec, e.layout, e.terms[k], k + 1, terms[k].data());
  std::vector<float> ref;
  order = {0, 1, 2, 3};
  do {
    std::vector<float> acc(w.size(), 0.0f);
    for (int k : order) {
      for (size_t i = 0; i < w.size(); ++i) acc[i] += static_cast<float>(terms[k][i]);
    }
    if (ref.empty()) ref = acc;
    double num = 0, den = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      num += (double{acc[i]} - ref[i]) * (double{acc[i]} - ref[i]);
      den += double{ref[i]} * ref[i];
    }
    EXPECT_LE(std::sqrt(num / den), 1e-6);
  } while (std::next_permutation(order.begin(), order.end()));
  // And the sum of all terms plus the residual is the tensor: W = Σ D_k + R_K (R_K = W - Σ D_k
  // is bounded by the last term's error).
  auto [fro, mx] = MeasuredErrors(w, e, 4);
  EXPECT_LE(mx, std::pow(1.0 / 14, 4) * (1 + 1e-12));
}

// ---- C10: calibration-free and deterministic (threads and kernels included) ----

TEST(ExpansionDeterminism, IdenticalAcrossRunsThreadsAndKernels) {
  const std::vector<double> w = RandomValues(Dist::kStudentT3, 300 * 257, 11);
  for (ScaleGranularity s : {ScaleGranularity::kTensor, ScaleGranularity::kChannel,
                             ScaleGranularity::kGroup}) {
    const ExpansionSpec spec = Spec(4, 3, Grid::kAsym, s, s == ScaleGranularity::kGroup ? 32 : 0);
    ExpandOptions ref_opts;
    ref_opts.kernels = KernelsByName("ref");
    TensorExpansion ref = MustExpand(w, {300, 257}, spec, ref_opts);
    ThreadPool pool(2);
    for (const std::string& kn : SupportedKernelNames()) {
      ExpandOptions o;
      o.kernels = KernelsByName(kn);
      o.pool = &pool;
      TensorExpansion e = MustExpand(w, {300, 257}, spec, o);
      ASSERT_EQ(e.terms.size(), ref.terms.size());
      for (size_t k = 0; k < e.terms.size(); ++k) {
        EXPECT_EQ(e.terms[k].codes, ref.terms[k].codes) << kn << " " << spec.ToString();
        EXPECT_EQ(e.terms[k].scale, ref.terms[k].scale) << kn << " " << spec.ToString();
        EXPECT_EQ(e.terms[k].zero, ref.terms[k].zero) << kn << " " << spec.ToString();
        EXPECT_NEAR(e.errors[k].rel_fro / ref.errors[k].rel_fro, 1.0, 1e-12);
        EXPECT_EQ(e.errors[k].max_abs, ref.errors[k].max_abs);
      }
    }
  }
}

// ---- C12: storage = K·b bits per weight + K scales per group ----

TEST(ExpansionCost, StorageIsKbBitsPlusScales) {
  const std::vector<double> w = RandomValues(Dist::kGaussian, 256 * 512, 5);
  for (int b : {1, 2, 3, 4, 8}) {
    for (int K : {1, 2, 4}) {
      ExpansionSpec spec = Spec(b, K, Grid::kMid, ScaleGranularity::kGroup, 128);
      TensorExpansion e = MustExpand(w, {256, 512}, spec);
      int64_t code_bytes = 0, scales = 0;
      for (const TermData& t : e.terms) {
        code_bytes += t.codes.size();
        scales += t.scale.size();
      }
      const int stored_bits = spec.is_packed() ? b : 8;  // 3, 5..8 bits take a byte each
      EXPECT_EQ(code_bytes * 8, int64_t{K} * stored_bits * 256 * 512) << "b=" << b << " K=" << K;
      EXPECT_EQ(scales, int64_t{K} * 256 * 4);
    }
  }
}

// ---- Edge cases ----

TEST(ExpansionEdges, ZeroGroupsStayExactlyZero) {
  std::vector<double> w(4 * 64, 0.0);
  for (int i = 64; i < 128; ++i) w[i] = 0.25 * (i % 7 - 3);  // row 1 nonzero, others zero
  for (Grid g : {Grid::kSym, Grid::kAsym, Grid::kMid}) {
    TensorExpansion e = MustExpand(w, {4, 64}, Spec(4, 3, g, ScaleGranularity::kChannel));
    std::vector<double> rec = Reconstruct(e, 3);
    for (int i = 0; i < 64; ++i) EXPECT_EQ(rec[i], 0.0) << GridName(g);
    for (int i = 128; i < 256; ++i) EXPECT_EQ(rec[i], 0.0) << GridName(g);
    if (g == Grid::kMid) {
      EXPECT_EQ(e.terms[0].scale[0], 0.0f);
    } else if (g == Grid::kSym) {
      EXPECT_EQ(e.terms[0].scale[0], 1.0f);
    }
  }
  // An all-zero tensor: errors are 0, no NaN.
  TensorExpansion z = MustExpand(std::vector<double>(16, 0.0), {4, 4},
                                 Spec(4, 2, Grid::kMid, ScaleGranularity::kTensor));
  EXPECT_EQ(z.errors[1].rel_fro, 0.0);
  EXPECT_EQ(z.errors[1].rel_max, 0.0);
}

TEST(ExpansionEdges, ConstantGroupAsymIsExact) {
  std::vector<double> w(8 * 8, 0.75);
  TensorExpansion e = MustExpand(w, {8, 8}, Spec(2, 1, Grid::kAsym, ScaleGranularity::kChannel));
  for (double v : Reconstruct(e, 1)) EXPECT_EQ(v, 0.75);
}

TEST(ExpansionEdges, EpsStopsEarlyAndMeetsTheTolerance) {
  const std::vector<double> w = RandomValues(Dist::kGaussian, 128 * 128, 9);
  ExpansionSpec spec = Spec(4, 16, Grid::kSym, ScaleGranularity::kChannel);
  spec.eps = 1e-4;
  TensorExpansion e = MustExpand(w, {128, 128}, spec);
  // (1/14)^3 = 3.6e-4 > 1e-4 >= (1/14)^4: four terms.
  EXPECT_EQ(e.terms.size(), 4u);
  EXPECT_LE(e.errors.back().worst_ratio, 1e-4);
  EXPECT_GT(e.errors[2].worst_ratio, 1e-4);
  spec.scale = ScaleGranularity::kTensor;
  TensorExpansion t = MustExpand(w, {128, 128}, spec);
  EXPECT_EQ(t.terms.size(), 4u);
  EXPECT_LE(t.errors.back().rel_max, 1e-4);
}

TEST(ExpansionEdges, OddShapesAndInputDTypes) {
  // rank 4 (conv weight), a row shorter than the group, a group that does not divide the row.
  const std::vector<double> w = RandomValues(Dist::kGaussian, 5 * 3 * 3 * 3, 2);
  for (int64_t g : {1, 7, 27, 100}) {
    TensorExpansion e = MustExpand(w, {5, 3, 3, 3}, Spec(3, 2, Grid::kSym, ScaleGranularity::kGroup, g));
    EXPECT_EQ(e.layout.row_len, 27);
    EXPECT_EQ(e.layout.groups_per_row, (27 + std::min<int64_t>(g, 27) - 1) / std::min<int64_t>(g, 27));
    EXPECT_EQ(e.terms[0].scale.size(), static_cast<size_t>(5 * e.layout.groups_per_row));
    auto [fro, mx] = MeasuredErrors(w, e, 2);
    EXPECT_LT(fro, 0.1);
  }
  // F16, BF16, F32, F8 inputs expand to the same result as the same values given in F64.
  const std::vector<double> src = RandomValues(Dist::kGaussian, 16 * 16, 4);
  std::vector<uint16_t> h(src.size()), bf(src.size());
  std::vector<float> f(src.size());
  std::vector<double> hd(src.size()), bfd(src.size()), fd(src.size());
  // FP8: codes spread over each format's finite range (E4M3 skips its NaN codes 0x7F, 0xFF;
  // E5M2 its inf/NaN codes, exponent 31).
  std::vector<uint8_t> e4(src.size()), e5(src.size());
  std::vector<double> e4d(src.size()), e5d(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    e4[i] = static_cast<uint8_t>((i * 37) % 256);
    if ((e4[i] & 0x7F) == 0x7F) e4[i] ^= 1;
    e5[i] = static_cast<uint8_t>((i * 53) % 256);
    if (((e5[i] >> 2) & 0x1F) == 0x1F) e5[i] &= 0xF3;
    e4d[i] = Fp8E4M3ToFloat(e4[i]);
    e5d[i] = Fp8E5M2ToFloat(e5[i]);
  }
  for (size_t i = 0; i < src.size(); ++i) {
    h[i] = FloatToHalf(static_cast<float>(src[i]));
    bf[i] = FloatToBFloat16(static_cast<float>(src[i]));
    f[i] = static_cast<float>(src[i]);
    hd[i] = HalfToFloat(h[i]);
    bfd[i] = BFloat16ToFloat(bf[i]);
    fd[i] = f[i];
  }
  const ExpansionSpec spec = Spec(4, 2, Grid::kSym, ScaleGranularity::kChannel);
  auto bytes = [](const auto& v) {
    return absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(v.data()),
                               v.size() * sizeof(v[0]));
  };
  const std::vector<int64_t> shape = {16, 16};
  struct {
    DType t;
    absl::Span<const uint8_t> data;
    const std::vector<double>* same;
  } cases[] = {{DType::kF16, bytes(h), &hd},      {DType::kBF16, bytes(bf), &bfd},
               {DType::kF32, bytes(f), &fd},      {DType::kF8E4M3, bytes(e4), &e4d},
               {DType::kF8E5M2, bytes(e5), &e5d}};
  for (const auto& c : cases) {
    absl::StatusOr<TensorExpansion> a = ExpandTensor(c.t, shape, c.data, spec);
    ASSERT_TRUE(a.ok()) << a.status();
    TensorExpansion b = MustExpand(*c.same, shape, spec);
    EXPECT_EQ(a->terms[1].codes, b.terms[1].codes) << DTypeName(c.t);
    EXPECT_EQ(a->terms[1].scale, b.terms[1].scale) << DTypeName(c.t);
  }
}

TEST(ExpansionErrors, RejectsBadInputWithClearMessages) {
  const ExpansionSpec spec = Spec(4, 2, Grid::kSym, ScaleGranularity::kChannel);
  std::vector<double> w(4 * 4, 1.0);
  w[9] = NAN;
  absl::StatusOr<TensorExpansion> e = ExpandTensor(w, {4, 4}, spec);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("flat index 9"), std::string::npos) << e.status();
  w[9] = INFINITY;
  EXPECT_NE(ExpandTensor(w, {4, 4}, Spec(4, 2, Grid::kSym, ScaleGranularity::kTensor))
                .status().message().find("not finite"), std::string::npos);
  w[9] = 1e300;  // finite in F64 but beyond the float32 scale range
  EXPECT_NE(ExpandTensor(w, {4, 4}, spec).status().message().find("float32 range"),
            std::string::npos);
  w[9] = 1;
  EXPECT_NE(ExpandTensor(w, {16}, spec).status().message().find("rank >= 2"), std::string::npos);
  EXPECT_NE(ExpandTensor(w, {4, 5}, spec).status().message().find("bytes"), std::string::npos);
  std::vector<int32_t> ints(16);
  EXPECT_NE(ExpandTensor(DType::kI32, {4, 4},
                         absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(ints.data()), 64), spec)
                .status().message().find("accepted F16, BF16, F32, F64"),
            std::string::npos);
  ExpansionSpec bad = spec;
  bad.bits = 9;
  EXPECT_NE(ExpandTensor(w, {4, 4}, bad).status().message().find("bits"), std::string::npos);
}

// ---- the fused activation path: ExpandReconstructF32 == Reconstruct(ExpandTensor) bit for bit ----

TEST(ExpandReconstructF32, EqualsExpandThenReconstructBitForBit) {
  ThreadPool pool(2);
  struct Case {
    int64_t rows, cols;
  };
  for (const Case c : {Case{37, 131}, Case{1, 1}, Case{1, 300}, Case{200, 7}, Case{3, 4096}}) {
    std::vector<float> x = ToFloat(RandomValues(Dist::kStudentT3, c.rows * c.cols, 31));
    for (int64_t i = 0; i < c.cols && c.rows > 2; ++i) x[2 * c.cols + i] = 0;  // a zero row
    std::vector<float> relu = x;
    for (float& v : relu) v = std::max(v, 0.0f);
    for (ScaleGranularity sc : {ScaleGranularity::kTensor, ScaleGranularity::kChannel}) {
      for (const ExpansionSpec& spec : ActivationSpecs(sc)) {
        const std::vector<float>& in = spec.unsigned_first ? relu : x;
        const auto bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(in.data()),
                                               in.size() * 4);
        absl::StatusOr<TensorExpansion> e =
            ExpandTensor(DType::kF32, {c.rows, c.cols}, bytes, spec);
        ASSERT_TRUE(e.ok()) << e.status();
        const std::vector<double> sum = Reconstruct(*e, 3);
        for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
          ExpandOptions o;
          o.pool = p;
          std::vector<float> got(in.size(), -1.f);
          std::vector<std::vector<float>> terms(3, std::vector<float>(in.size(), -1.f));
          std::vector<float*> term_ptrs = {terms[0].data(), terms[1].data(), terms[2].data()};
          ASSERT_TRUE(ExpandReconstructF32(in.data(), c.rows, c.cols, spec, o, got.data(),
                                           term_ptrs)
                          .ok());
          for (size_t i = 0; i < in.size(); ++i) {
            ASSERT_EQ(got[i], static_cast<float>(sum[i]))
                << spec.ToString() << " " << c.rows << "x" << c.cols << " at " << i;
          }
          for (int k = 1; k <= 3; ++k) {
            std::vector<double> one(in.size(), 0.0);
            AccumulateTerm(e->spec, e->layout, e->terms[k - 1], k, one.data());
            for (size_t i = 0; i < in.size(); ++i) {
              ASSERT_EQ(terms[k - 1][i], static_cast<float>(one[i]))
                  << spec.ToString() << " term " << k << " at " << i;
            }
          }
          // The sum alone (variant D with channel scales: the fused digits kernel of
          // every kernel table).
          for (const std::string& kernels : SupportedKernelNames()) {
            o.kernels = KernelsByName(kernels);
            std::vector<float> only(in.size());
            ASSERT_TRUE(
                ExpandReconstructF32(in.data(), c.rows, c.cols, spec, o, only.data(), {})
                    .ok());
            EXPECT_EQ(only, got) << kernels << " " << spec.ToString();
          }
        }
      }
    }
  }
}

// Blocks: one call over several blocks of rows gives the bits of one call per block (each block
// its own tensor scales), for every grid and with the terms alone.
TEST(ExpandReconstructF32, BlocksAreExpandedAsSeparateTensors) {
  ThreadPool pool(2);
  const int64_t blocks = 3, rows_per_block = 5, cols = 37, n = blocks * rows_per_block * cols;
  std::vector<float> x = ToFloat(RandomValues(Dist::kStudentT3, n, 77));
  // Blocks of very different ranges: a shared scale would change the small ones.
  for (int64_t i = 0; i < n; ++i) x[i] *= i < n / 3 ? 100.0f : i < 2 * n / 3 ? 1.0f : 0.01f;
  for (Grid grid : {Grid::kSym, Grid::kAsym, Grid::kMid}) {
    ExpansionSpec spec = Spec(4, 2, grid, ScaleGranularity::kTensor, 0, Variant::kRescaled);
    ExpandOptions o;
    o.pool = &pool;
    std::vector<float> whole(n), t1(n), t2(n);
    std::vector<float*> terms = {t1.data(), t2.data()};
    ASSERT_TRUE(ExpandReconstructF32(x.data(), blocks * rows_per_block, cols, spec, o,
                                     whole.data(), terms, blocks)
                    .ok());
    std::vector<float> shared(n);
    ASSERT_TRUE(ExpandReconstructF32(x.data(), blocks * rows_per_block, cols, spec, o,
                                     shared.data(), {})
                    .ok());
    EXPECT_NE(shared, whole) << "one scale for all blocks should differ";
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t off = b * rows_per_block * cols;
      std::vector<float> one(rows_per_block * cols), o1(one.size()), o2(one.size());
      std::vector<float*> one_terms = {o1.data(), o2.data()};
      ASSERT_TRUE(ExpandReconstructF32(x.data() + off, rows_per_block, cols, spec, o, one.data(),
                                       one_terms)
                      .ok());
      for (size_t i = 0; i < one.size(); ++i) {
        ASSERT_EQ(whole[off + i], one[i]) << GridName(grid) << " block " << b << " at " << i;
        ASSERT_EQ(t1[off + i], o1[i]) << GridName(grid) << " block " << b << " at " << i;
        ASSERT_EQ(t2[off + i], o2[i]) << GridName(grid) << " block " << b << " at " << i;
      }
    }
  }
  std::vector<float> out(n);
  EXPECT_EQ(ExpandReconstructF32(x.data(), blocks * rows_per_block, cols,
                                 Spec(4, 2, Grid::kSym, ScaleGranularity::kTensor, 0,
                                      Variant::kRescaled),
                                 ExpandOptions{}, out.data(), {}, 4)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ExpandReconstructF32, SameErrorsAsExpandTensor) {
  std::vector<float> x(4 * 4, 1.0f);
  x[9] = NAN;
  std::vector<float> out(16);
  for (ScaleGranularity sc : {ScaleGranularity::kTensor, ScaleGranularity::kChannel}) {
    const absl::Status s =
        ExpandReconstructF32(x.data(), 4, 4, Spec(4, 2, Grid::kSym, sc), {}, out.data(), {});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("flat index 9"), std::string::npos) << s;
  }
  x[9] = -1.0f;
  ExpansionSpec u = Spec(4, 2, Grid::kSym, ScaleGranularity::kChannel);
  u.unsigned_first = true;
  EXPECT_NE(ExpandReconstructF32(x.data(), 4, 4, u, {}, out.data(), {}).message().find("negative"),
            std::string::npos);
  EXPECT_NE(ExpandReconstructF32(x.data(), 4, 4, Spec(4, 2, Grid::kSym, ScaleGranularity::kGroup, 2),
                                 {}, out.data(), {})
                .message()
                .find("tensor or channel"),
            std::string::npos);
  float* one[1] = {out.data()};
  EXPECT_NE(ExpandReconstructF32(x.data(), 4, 4, Spec(4, 2, Grid::kSym, ScaleGranularity::kTensor),
                                 {}, nullptr, one)
                .message()
                .find("1 term outputs for 2 terms"),
            std::string::npos);
}

TEST(ExpansionUnsignedFirst, NonNegativeInputsUseTheFullUnsignedRange) {
  std::vector<double> x = FloatValued(RandomValues(Dist::kGaussian, 64 * 256, 21));
  for (double& v : x) v = std::max(v, 0.0);  // ReLU output
  ExpansionSpec spec = Spec(4, 3, Grid::kSym, ScaleGranularity::kTensor);
  TensorExpansion signed_e = MustExpand(x, {64, 256}, spec);
  spec.unsigned_first = true;
  TensorExpansion unsigned_e = MustExpand(x, {64, 256}, spec);
  // Term 1: codes 0..15 with s = m/15, so the error is at most m/30 (sym: m/14).
  EXPECT_LE(unsigned_e.errors[0].rel_max, 1.0 / 30 * (1 + 1e-12));
  EXPECT_LT(unsigned_e.errors[0].rel_fro, signed_e.errors[0].rel_fro);
  // Later terms are signed residuals that contract by 1/14.
  EXPECT_NEAR(unsigned_e.errors[2].max_abs / unsigned_e.errors[1].max_abs, 1.0 / 14, 0.01);
  auto [fro, mx] = MeasuredErrors(x, unsigned_e, 3);
  EXPECT_NEAR(fro / unsigned_e.errors[2].rel_fro, 1.0, 1e-9);
  x[7] = -0.5;
  absl::StatusOr<TensorExpansion> neg = ExpandTensor(x, {64, 256}, spec);
  EXPECT_NE(neg.status().message().find("unsigned_first needs a non-negative"), std::string::npos)
      << neg.status();
  spec.grid = Grid::kMid;
  EXPECT_FALSE(spec.Validate().ok());
}

TEST(ExpansionCancel, CancelledFlagStopsTheWork) {
  const std::vector<double> w = RandomValues(Dist::kGaussian, 64 * 64, 1);
  std::atomic<bool> cancel{true};
  ExpandOptions o;
  o.cancel = &cancel;
  for (ScaleGranularity s : {ScaleGranularity::kTensor, ScaleGranularity::kChannel}) {
    absl::StatusOr<TensorExpansion> e = ExpandTensor(w, {64, 64}, Spec(4, 2, Grid::kSym, s), o);
    EXPECT_EQ(e.status().code(), absl::StatusCode::kCancelled);
  }
}


// ExpandRowCodesF32 hands over, row by row, the codes and scales ExpandTensor would pack.
TEST(ExpandRowCodesF32, EqualsExpandTensorsCodesAndScales) {
  ThreadPool pool(2);
  const int64_t rows = 41, cols = 133;
  std::vector<float> x = ToFloat(RandomValues(Dist::kStudentT3, rows * cols, 91));
  for (int64_t i = 0; i < cols; ++i) x[5 * cols + i] = 0;  // a zero row (mid grid: skipped terms)
  std::vector<float> relu = x;
  for (float& v : relu) v = std::max(v, 0.0f);
  for (const std::string& kernels : SupportedKernelNames()) {
    for (const ExpansionSpec& spec : ActivationSpecs(ScaleGranularity::kChannel)) {
      const std::vector<float>& in = spec.unsigned_first ? relu : x;
      ExpandOptions o;
      o.kernels = KernelsByName(kernels);
      absl::StatusOr<TensorExpansion> e = ExpandTensor(
          DType::kF32, {rows, cols},
          absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(in.data()), in.size() * 4),
          spec, o);
      ASSERT_TRUE(e.ok()) << e.status();
      o.pool = &pool;
      std::vector<int> seen(rows, 0);
      std::vector<std::vector<int32_t>> got(3, std::vector<int32_t>(rows * cols));
      std::vector<std::vector<float>> scale(3, std::vector<float>(rows));
      ASSERT_TRUE(ExpandRowCodesF32(in.data(), rows, cols, spec, o,
                                    [&](int64_t row, const uint8_t* const* codes,
                                        const float* scales) {
                                      ++seen[row];
                                      for (int k = 0; k < 3; ++k) {
                                        scale[k][row] = scales[k];
                                        for (int64_t c = 0; c < cols; ++c) {
                                          // The low `bits` bits, as PackCodes keeps them.
                                          got[k][row * cols + c] = codes[k][c];
                                        }
                                      }
                                    })
                      .ok());
      for (int k = 0; k < 3; ++k) {
        const bool is_signed = !spec.term_is_unsigned(k + 1);
        for (int64_t row = 0; row < rows; ++row) {
          ASSERT_EQ(seen[row], 1);
          ASSERT_EQ(scale[k][row], e->terms[k].scale[row]) << spec.ToString() << " " << row;
          std::vector<int32_t> want(cols);
          UnpackCodes(e->terms[k].codes.data() + row * e->layout.packed_row_bytes, cols,
                      spec.bits, is_signed, want.data());
          for (int64_t c = 0; c < cols; ++c) {
            const uint8_t byte = static_cast<uint8_t>(got[k][row * cols + c]);
            const int32_t code = is_signed ? static_cast<int8_t>(byte) : byte;
            ASSERT_EQ(code, want[c]) << kernels << " " << spec.ToString() << " term "
                                     << k + 1 << " row " << row << " col " << c;
          }
        }
      }
    }
  }
}

// The folded bytes are the fold of ExpandRowCodesF32's codes (themselves ExpandTensor's), on
// every kernel table, for every K·b <= 8, with a zero row, a dead row (subnormal scales), odd
// widths and the padding left alone.
TEST(ExpandRowFoldedF32, IsTheFoldOfTheRowCodes) {
  ThreadPool pool(2);
  const int64_t rows = 23;
  for (int64_t cols : {int64_t{1}, int64_t{7}, int64_t{133}}) {
    std::vector<float> x = ToFloat(RandomValues(Dist::kStudentT3, rows * cols, 17));
    for (int64_t i = 0; i < cols; ++i) x[3 * cols + i] = 0;                    // all zeros
    for (int64_t i = 0; i < cols; ++i) x[5 * cols + i] *= 1e-39f;              // subnormal scales
    for (int64_t i = 0; i < cols; ++i) x[7 * cols + i] = std::max(x[7 * cols + i], 0.0f);
    for (const std::string& kernels : SupportedKernelNames()) {
      for (const auto& [b, k] : {std::pair{4, 2}, {2, 4}, {2, 3}, {8, 1}, {3, 2}, {1, 8}}) {
        const int bits = b, terms = k;  // named copies: lambdas cannot capture bindings in C++17
        ExpansionSpec spec = Spec(bits, terms, Grid::kMid, ScaleGranularity::kChannel, 0,
                                  Variant::kDigits);
        ExpandOptions o;
        o.kernels = KernelsByName(kernels);
        o.pool = &pool;
        std::vector<int32_t> want(static_cast<size_t>(rows * cols));
        std::vector<int64_t> want_sum(rows, 0);
        std::vector<float> want_scale(rows);
        ASSERT_TRUE(ExpandRowCodesF32(x.data(), rows, cols, spec, o,
                                      [&](int64_t row, const uint8_t* const* codes,
                                          const float* scales) {
                                        for (int64_t c = 0; c < cols; ++c) {
                                          int32_t v = 0, shift = 0;
                                          for (int k = 0; k < terms; ++k) {
                                            v = v * (1 << bits) + static_cast<int8_t>(codes[k][c]);
                                            shift = shift * (1 << bits) + (1 << (bits - 1));
                                          }
                                          want[row * cols + c] = v + shift;
                                          want_sum[row] += v + shift;
                                        }
                                        want_scale[row] = scales[terms - 1];
                                      })
                        .ok());
        const int64_t ld = cols + 5;
        std::vector<uint8_t> u(static_cast<size_t>(rows * ld), 0xAB);
        std::vector<int64_t> usum(rows, -1);
        std::vector<float> scale(rows, -1);
        ASSERT_TRUE(ExpandRowFoldedF32(x.data(), rows, cols, bits, terms, o, u.data(), ld,
                                       usum.data(), scale.data())
                        .ok());
        for (int64_t row = 0; row < rows; ++row) {
          ASSERT_EQ(usum[row], want_sum[row]) << kernels << " " << spec.ToString() << " " << row;
          ASSERT_EQ(scale[row], want_scale[row]) << kernels << " " << row;
          for (int64_t c = 0; c < cols; ++c) {
            ASSERT_EQ(u[row * ld + c], want[row * cols + c])
                << kernels << " " << spec.ToString() << " row " << row << " col " << c;
          }
          for (int64_t c = cols; c < ld; ++c) ASSERT_EQ(u[row * ld + c], 0xAB);
        }
      }
    }
  }
  std::vector<float> bad(64, 1.0f);
  bad[40] = std::numeric_limits<float>::infinity();
  std::vector<uint8_t> u(64);
  std::vector<int64_t> usum(1);
  std::vector<float> scale(1);
  const absl::Status s =
      ExpandRowFoldedF32(bad.data(), 1, 64, 4, 2, {}, u.data(), 64, usum.data(), scale.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_EQ(ExpandRowFoldedF32(bad.data(), 1, 64, 4, 3, {}, u.data(), 64, usum.data(),
                               scale.data())
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ExpandRowCodesF32, SameErrorsAsExpandTensor) {
  std::vector<float> x(4 * 4, 1.0f);
  x[9] = NAN;
  auto ignore = [](int64_t, const uint8_t* const*, const float*) {};
  const absl::Status s =
      ExpandRowCodesF32(x.data(), 4, 4, Spec(4, 2, Grid::kSym, ScaleGranularity::kChannel), {},
                        ignore);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("flat index 9"), std::string::npos) << s;
  EXPECT_EQ(ExpandRowCodesF32(x.data(), 4, 4, Spec(4, 2, Grid::kSym, ScaleGranularity::kTensor),
                              {}, ignore)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fpxint::core
