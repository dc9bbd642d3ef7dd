// The integer W×A kernels: the scalar reference against the fp64 sum of the term products, every
// variant this CPU supports bit for bit against the reference (odd sizes, one row, one input,
// K' = 1, b in {2, 3, 4, 8}, unsigned and signed first activation terms, full and truncated
// pairs), and the errors for what they do not take.
#include "core/int_linear.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "core/packing.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::core {
namespace {

using ::fpxint::testing::Dist;
using ::fpxint::testing::MaxRelErr;
using ::fpxint::testing::RandomValues;
using ::fpxint::testing::ToFloat;

struct Case {
  int64_t out, in, batch;
  int wbits, wterms, abits, aterms;
  bool nonneg, truncate;
  ScaleGranularity scale;
};

std::string Name(const Case& c) {
  return absl::StrCat(c.out, "x", c.in, " batch ", c.batch, " W", c.wbits, "x", c.wterms, " A",
                      c.abits, "x", c.aterms, c.nonneg ? " x>=0" : "", c.truncate ? " trunc" : "");
}

TensorExpansion ExpandW(const Case& c, uint64_t seed) {
  ExpansionSpec s;
  s.bits = c.wbits;
  s.terms = c.wterms;
  s.scale = c.scale;
  auto e = ExpandTensor(RandomValues(Dist::kStudentT3, c.out * c.in, seed), {c.out, c.in}, s);
  EXPECT_TRUE(e.ok()) << e.status();
  return *std::move(e);
}

std::vector<float> Input(const Case& c, uint64_t seed) {
  std::vector<float> x = ToFloat(RandomValues(Dist::kGaussian, c.batch * c.in, seed));
  if (c.nonneg) {
    for (float& v : x) v = std::fabs(v);
  }
  return x;
}

// Σ_{(i,j)} Ŵ_i · X̂_j in fp64, from the expansions' own term reconstructions.
std::vector<double> Exact(const TensorExpansion& w, const std::vector<float>& x, const Case& c,
                          int kw) {
  ExpansionSpec as;
  as.bits = c.abits;
  as.terms = c.aterms;
  as.scale = c.batch > 1 ? ScaleGranularity::kChannel : ScaleGranularity::kTensor;
  as.unsigned_first = c.nonneg;
  auto ex = ExpandTensor(DType::kF32, {c.batch, c.in},
                         absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(x.data()), x.size() * 4),
                         as);
  EXPECT_TRUE(ex.ok()) << ex.status();
  const int ka = static_cast<int>(ex->terms.size()), k_max = std::max(kw, ka);
  std::vector<double> y(static_cast<size_t>(c.batch * c.out), 0.0);
  for (int i = 1; i <= kw; ++i) {
    std::vector<double> wi(static_cast<size_t>(c.out * c.in), 0.0);
    AccumulateTerm(w.spec, w.layout, w.terms[i - 1], i, wi.data());
    for (int j = 1; j <= ka; ++j) {
      if (c.truncate && i + j > k_max + 1) continue;
      std::vector<double> xj(static_cast<size_t>(c.batch * c.in), 0.0);
      AccumulateTerm(ex->spec, ex->layout, ex->terms[j - 1], j, xj.data());
      for (int64_t b = 0; b < c.batch; ++b) {
        for (int64_t o = 0; o < c.out; ++o) {
          double s = 0;
          for (int64_t k = 0; k < c.in; ++k) s += wi[o * c.in + k] * xj[b * c.in + k];
          y[b * c.out + o] += s;
        }
      }
    }
  }
  return y;
}


const Case kCases[] = {
    {17, 130, 5, 4, 2, 4, 2, false, false, ScaleGranularity::kChannel},
    {17, 130, 5, 4, 2, 4, 2, true, true, ScaleGranularity::kChannel},
    {1, 64, 1, 4, 1, 4, 1, false, false, ScaleGranularity::kChannel},
    {9, 1, 3, 4, 2, 4, 3, false, true, ScaleGranularity::kChannel},
    {6, 63, 9, 2, 3, 2, 2, true, false, ScaleGranularity::kTensor},
    {13, 65, 2, 3, 2, 4, 2, false, false, ScaleGranularity::kChannel},
    {8, 200, 4, 8, 1, 8, 1, false, false, ScaleGranularity::kChannel},
    {8, 200, 7, 8, 2, 4, 2, true, true, ScaleGranularity::kChannel},
    {33, 256, 64, 4, 2, 4, 2, true, true, ScaleGranularity::kChannel},
    {33, 256, 64, 4, 3, 4, 3, false, false, ScaleGranularity::kChannel},
    // Panels of 16 activation rows (AVX-512 VNNI): a ragged last panel, a weight tile of 7 rows.
    {23, 130, 17, 4, 2, 4, 2, false, true, ScaleGranularity::kChannel},
    {40, 300, 37, 2, 2, 8, 2, true, false, ScaleGranularity::kTensor},
    {16, 64, 16, 8, 1, 4, 1, false, false, ScaleGranularity::kChannel},
    // The many-row schedule (b = 4 weights, >= 8 rows): weight panels of 32 rows with a ragged
    // last one, odd and 8-indivisible row lengths (the packed activations' tail codes), a
    // ragged last tile of activation rows, signed and unsigned first activation terms.
    {70, 77, 11, 4, 2, 4, 2, true, false, ScaleGranularity::kChannel},
    {31, 203, 8, 4, 3, 4, 2, false, true, ScaleGranularity::kTensor},
    {64, 64, 21, 4, 2, 3, 2, false, false, ScaleGranularity::kChannel},
    // Other widths on s8 panels: b = 3 and 8, odd lengths, a ragged tile.
    {35, 101, 12, 3, 2, 4, 2, true, true, ScaleGranularity::kChannel},
    {20, 130, 9, 8, 1, 4, 2, false, false, ScaleGranularity::kTensor},
    // Long rows (2500 codes) with several activation tiles.
    {11, 2500, 9, 4, 2, 4, 2, false, true, ScaleGranularity::kChannel},
};

TEST(IntLinear, ReferenceMatchesTheSumOfTermProducts) {
  uint64_t seed = 1;
  for (const Case& c : kCases) {
    const TensorExpansion w = ExpandW(c, seed++);
    auto lin = IntLinear::FromExpansion(w);
    ASSERT_TRUE(lin.ok()) << lin.status();
    const std::vector<float> x = Input(c, seed++);
    for (int kw = 1; kw <= c.wterms; ++kw) {
      std::vector<float> y(static_cast<size_t>(c.batch * c.out), -1.0f);
      IntLinear::ActSpec a{c.abits, c.aterms, true, c.truncate};
      ASSERT_TRUE(lin->Forward(x.data(), c.batch, y.data(), a, kw, nullptr,
                               IntKernelsByName("ref")).ok());
      EXPECT_LT(MaxRelErr(y, Exact(w, x, c, kw)), 1e-5) << Name(c) << " K_w'=" << kw;
    }
  }
}

class IntVariant : public ::testing::TestWithParam<std::string> {};

TEST_P(IntVariant, BitForBitEqualToTheReference) {
  const IntKernelTable* fast = IntKernelsByName(GetParam());
  if (fast == nullptr) GTEST_SKIP() << GetParam() << " is not supported on this CPU";
  ThreadPool pool(2);
  uint64_t seed = 100;
  for (const Case& c : kCases) {
    auto lin = IntLinear::FromExpansion(ExpandW(c, seed++));
    ASSERT_TRUE(lin.ok());
    const std::vector<float> x = Input(c, seed++);
    for (int kw : {1, c.wterms}) {
      IntLinear::ActSpec a{c.abits, c.aterms, true, c.truncate};
      std::vector<float> ref(static_cast<size_t>(c.batch * c.out)), got(ref.size(), 7.0f);
      ASSERT_TRUE(lin->Forward(x.data(), c.batch, ref.data(), a, kw, nullptr,
                               IntKernelsByName("ref")).ok());
      ASSERT_TRUE(lin->Forward(x.data(), c.batch, got.data(), a, kw, &pool, fast).ok());
      EXPECT_EQ(got, ref) << GetParam() << " " << Name(c) << " K_w'=" << kw;
    }
  }
}

TEST_P(IntVariant, UnpackIsExactForEveryWidthAndLength) {
  const IntKernelTable* fast = IntKernelsByName(GetParam());
  if (fast == nullptr) GTEST_SKIP() << GetParam() << " is not supported on this CPU";
  std::vector<uint8_t> packed(400);
  for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<uint8_t>(i * 53 + 7);
  for (int bits : {2, 3, 4, 8}) {
    for (int64_t n : {1, 31, 64, 65, 127, 128, 200, 300}) {
      const int64_t npad = (n + 63) / 64 * 64;
      std::vector<int8_t> a(npad, 9), b(npad, 9);
      IntKernelsByName("ref")->unpack_row(packed.data(), n, bits, a.data());
      fast->unpack_row(packed.data(), n, bits, b.data());
      ASSERT_EQ(a, b) << GetParam() << " bits " << bits << " n " << n;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, IntVariant, ::testing::Values("avx2", "avx512vnni"));

// A view of a LowbitLinear's codes (what the TorchScript op uses) computes exactly what the
// owning object does; one activation scale per tensor matches the exact sum too.
TEST(IntLinear, ViewOfLowbitLinearAndPerTensorScales) {
  const Case c{21, 150, 7, 4, 2, 4, 2, false, false, ScaleGranularity::kChannel};
  const TensorExpansion w = ExpandW(c, 41);
  auto owning = IntLinear::FromExpansion(w);
  auto lowbit = LowbitLinear::FromExpansion(w);
  ASSERT_TRUE(owning.ok() && lowbit.ok());
  auto view = IntLinear::ViewOf(*lowbit);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_LT(view->resident_bytes(), owning->resident_bytes());  // no copy of the codes
  const std::vector<float> x = Input(c, 42);
  ThreadPool pool(2);
  for (bool per_tensor : {false, true}) {
    IntLinear::ActSpec a{c.abits, c.aterms, true, false, per_tensor};
    std::vector<float> y1(static_cast<size_t>(c.batch * c.out)), y2(y1.size());
    ASSERT_TRUE(owning->Forward(x.data(), c.batch, y1.data(), a, 0, &pool).ok());
    ASSERT_TRUE(view->Forward(x.data(), c.batch, y2.data(), a, 0, &pool).ok());
    EXPECT_EQ(y1, y2) << "per_tensor " << per_tensor;
  }
  // Per tensor against the exact products with one activation scale.
  ExpansionSpec as;
  as.bits = c.abits;
  as.terms = c.aterms;
  as.scale = ScaleGranularity::kTensor;
  auto ex = ExpandTensor(DType::kF32, {c.batch, c.in},
                         absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(x.data()), x.size() * 4),
                         as);
  ASSERT_TRUE(ex.ok());
  const std::vector<double> xw = Reconstruct(*ex, c.aterms), ww = Reconstruct(w, c.wterms);
  std::vector<double> exact(static_cast<size_t>(c.batch * c.out), 0.0);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t o = 0; o < c.out; ++o) {
      for (int64_t k = 0; k < c.in; ++k) exact[b * c.out + o] += ww[o * c.in + k] * xw[b * c.in + k];
    }
  }
  std::vector<float> y(exact.size());
  ASSERT_TRUE(view->Forward(x.data(), c.batch, y.data(), {c.abits, c.aterms, true, false, true}).ok());
  EXPECT_LT(MaxRelErr(y, exact), 1e-5);
  // Mid-grid weights are refused by the view as by FromExpansion.
  ExpansionSpec mid;
  mid.bits = 4;
  mid.terms = 2;
  mid.grid = Grid::kMid;
  auto em = ExpandTensor(RandomValues(Dist::kGaussian, 4 * 32, 1), {4, 32}, mid);
  auto lm = LowbitLinear::FromExpansion(*em);
  ASSERT_TRUE(lm.ok());
  EXPECT_EQ(IntLinear::ViewOf(*lm).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(IntLinear, RejectsWhatItDoesNotTake) {
  Case c{4, 32, 1, 4, 2, 4, 2, false, false, ScaleGranularity::kChannel};
  ExpansionSpec mid;
  mid.bits = 4;
  mid.terms = 2;
  mid.grid = Grid::kMid;
  auto e = ExpandTensor(RandomValues(Dist::kGaussian, 4 * 32, 1), {4, 32}, mid);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(IntLinear::FromExpansion(*e).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(IntLinear::FromExpansion(TensorExpansion()).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto lin = IntLinear::FromExpansion(ExpandW(c, 2));
  ASSERT_TRUE(lin.ok());
  std::vector<float> x(32, 1.0f), y(4);
  for (int bad_bits : {1, 9}) {
    auto s = lin->Forward(x.data(), 1, y.data(), {bad_bits, 2, true, false});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(s.message()).find("accepted bits 2..8"), std::string::npos) << s;
  }
  // 8-bit × 8-bit codes over 70000 inputs could overflow an int32 sum: refused.
  Case wide{1, 70000, 1, 8, 1, 8, 1, false, false, ScaleGranularity::kChannel};
  auto big = IntLinear::FromExpansion(ExpandW(wide, 3));
  ASSERT_TRUE(big.ok());
  std::vector<float> xb(70000, 0.5f), yb(1);
  auto s = big->Forward(xb.data(), 1, yb.data(), {8, 1, true, false});
  EXPECT_NE(std::string(s.message()).find("overflow"), std::string::npos) << s;
}

// ---- Folded terms (variant D) ----

struct FoldCase {
  int64_t out, in, batch;
  int wbits, wterms, abits, aterms;
  ScaleGranularity scale;
};

const FoldCase kFoldCases[] = {
    {17, 130, 5, 4, 2, 4, 2, ScaleGranularity::kChannel},
    {40, 77, 11, 4, 2, 4, 2, ScaleGranularity::kTensor},   // odd rows, a ragged panel
    {33, 256, 1, 4, 2, 4, 2, ScaleGranularity::kChannel},  // one row: a tensor scale
    {9, 64, 20, 2, 4, 2, 3, ScaleGranularity::kChannel},   // 8-bit and 6-bit folded codes
    {8, 300, 9, 8, 1, 4, 1, ScaleGranularity::kChannel},   // one term each
    {64, 2500, 16, 4, 2, 4, 2, ScaleGranularity::kChannel},
};

ExpansionSpec DigitsSpec(int bits, int terms, ScaleGranularity scale) {
  ExpansionSpec s;
  s.bits = bits;
  s.terms = terms;
  s.grid = Grid::kMid;
  s.variant = Variant::kDigits;
  s.scale = scale;
  return s;
}

TensorExpansion ExpandDigits(const FoldCase& c, uint64_t seed) {
  auto e = ExpandTensor(RandomValues(Dist::kStudentT3, c.out * c.in, seed), {c.out, c.in},
                        DigitsSpec(c.wbits, c.wterms, c.scale));
  EXPECT_TRUE(e.ok()) << e.status();
  return *std::move(e);
}

// The activation expansion FoldedIntLinear makes of x.
TensorExpansion ExpandActDigits(const FoldCase& c, const std::vector<float>& x) {
  auto ex = ExpandTensor(
      DType::kF32, {c.batch, c.in},
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(x.data()), x.size() * 4),
      DigitsSpec(c.abits, c.aterms,
                 c.batch > 1 ? ScaleGranularity::kChannel : ScaleGranularity::kTensor));
  EXPECT_TRUE(ex.ok()) << ex.status();
  return *std::move(ex);
}

std::vector<float> FoldInput(const FoldCase& c, uint64_t seed) {
  return ToFloat(RandomValues(Dist::kGaussian, c.batch * c.in, seed));
}

// One folded u8 × s8 product against every (i, j) term product in fp64.
TEST(FoldedIntLinear, EqualsTheSumOfEveryTermProduct) {
  uint64_t seed = 300;
  for (const FoldCase& c : kFoldCases) {
    const TensorExpansion w = ExpandDigits(c, seed++);
    auto lin = FoldedIntLinear::FromExpansion(w);
    ASSERT_TRUE(lin.ok()) << lin.status();
    EXPECT_EQ(lin->weight_bits(), c.wbits * c.wterms);
    const std::vector<float> x = FoldInput(c, seed++);
    const TensorExpansion ex = ExpandActDigits(c, x);
    std::vector<double> want(static_cast<size_t>(c.batch * c.out), 0.0);
    for (int i = 1; i <= c.wterms; ++i) {
      std::vector<double> wi(static_cast<size_t>(c.out * c.in), 0.0);
      AccumulateTerm(w.spec, w.layout, w.terms[i - 1], i, wi.data());
      for (int j = 1; j <= c.aterms; ++j) {
        std::vector<double> xj(static_cast<size_t>(c.batch * c.in), 0.0);
        AccumulateTerm(ex.spec, ex.layout, ex.terms[j - 1], j, xj.data());
        for (int64_t b = 0; b < c.batch; ++b) {
          for (int64_t o = 0; o < c.out; ++o) {
            double s = 0;
            for (int64_t k = 0; k < c.in; ++k) s += wi[o * c.in + k] * xj[b * c.in + k];
            want[static_cast<size_t>(b * c.out + o)] += s;
          }
        }
      }
    }
    std::vector<float> y(want.size(), -1.0f);
    ASSERT_TRUE(lin->Forward(x.data(), c.batch, y.data(), {c.abits, c.aterms}, nullptr,
                             IntKernelsByName("ref")).ok());
    EXPECT_LT(MaxRelErr(y, want), 1e-6) << c.out << "x" << c.in << " batch " << c.batch;
  }
}

// The fold is exact: its integers are those of the K_w·K_a unfolded products, each mid-grid digit
// product Σ_c (2C_i + 1)(2C_j + 1) weighted by its place 2^{b(K_w−i) + b(K_a−j)}.
TEST(FoldedIntLinear, ItsIntegersAreTheUnfoldedProductsIntegers) {
  uint64_t seed = 400;
  for (const FoldCase& c : kFoldCases) {
    const TensorExpansion w = ExpandDigits(c, seed++);
    auto lin = FoldedIntLinear::FromExpansion(w);
    ASSERT_TRUE(lin.ok()) << lin.status();
    const std::vector<float> x = FoldInput(c, seed++);
    const TensorExpansion ex = ExpandActDigits(c, x);
    std::vector<int64_t> got(static_cast<size_t>(c.batch * c.out), 0);
    ASSERT_TRUE(lin->ForwardIntegers(x.data(), c.batch, got.data(), {c.abits, c.aterms}).ok());
    auto codes = [](const TensorExpansion& e, int k, int64_t row, int64_t n) {
      std::vector<int32_t> q(static_cast<size_t>(n));
      UnpackCodes(e.terms[static_cast<size_t>(k)].codes.data() + row * e.layout.packed_row_bytes,
                  n, e.spec.bits, true, q.data());
      return q;
    };
    for (int64_t b = 0; b < c.batch; ++b) {
      for (int64_t o = 0; o < c.out; ++o) {
        int64_t want = 0;
        for (int i = 0; i < c.wterms; ++i) {
          const std::vector<int32_t> cw = codes(w, i, o, c.in);
          for (int j = 0; j < c.aterms; ++j) {
            const std::vector<int32_t> cx = codes(ex, j, b, c.in);
            int64_t p = 0;
            for (int64_t k = 0; k < c.in; ++k) {
              p += (2 * int64_t{cw[static_cast<size_t>(k)]} + 1) *
                   (2 * int64_t{cx[static_cast<size_t>(k)]} + 1);
            }
            const int place = c.wbits * (c.wterms - 1 - i) + c.abits * (c.aterms - 1 - j);
            want += p * (int64_t{1} << place);
          }
        }
        ASSERT_EQ(got[static_cast<size_t>(b * c.out + o)], want) << "row " << b << " out " << o;
      }
    }
  }
}

TEST(FoldedIntLinear, VnniIsBitForBitTheReference) {
  const IntKernelTable* fast = IntKernelsByName("avx512vnni");
  if (fast == nullptr) GTEST_SKIP() << "no AVX-512 VNNI on this CPU";
  ThreadPool pool(2);
  uint64_t seed = 500;
  for (const FoldCase& c : kFoldCases) {
    auto lin = FoldedIntLinear::FromExpansion(ExpandDigits(c, seed++));
    ASSERT_TRUE(lin.ok());
    const std::vector<float> x = FoldInput(c, seed++);
    std::vector<float> ref(static_cast<size_t>(c.batch * c.out)), got(ref.size(), 7.0f);
    ASSERT_TRUE(lin->Forward(x.data(), c.batch, ref.data(), {c.abits, c.aterms}, nullptr,
                             IntKernelsByName("ref")).ok());
    ASSERT_TRUE(lin->Forward(x.data(), c.batch, got.data(), {c.abits, c.aterms}, &pool, fast).ok());
    EXPECT_EQ(got, ref) << c.out << "x" << c.in << " batch " << c.batch;
  }
}

TEST(FoldedIntLinear, RefusesWhatDoesNotFold) {
  FoldCase c{8, 64, 2, 4, 2, 4, 2, ScaleGranularity::kChannel};
  ExpansionSpec r;  // variant R, sym
  auto plain = ExpandTensor(RandomValues(Dist::kGaussian, 8 * 64, 1), {8, 64}, r);
  ASSERT_TRUE(plain.ok());
  auto s = FoldedIntLinear::FromExpansion(*plain);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("variant D"), std::string::npos) << s.status();
  c.wterms = 3;  // 12 bits
  EXPECT_FALSE(FoldedIntLinear::FromExpansion(ExpandDigits(c, 2)).ok());
  c.wterms = 2;
  auto lin = FoldedIntLinear::FromExpansion(ExpandDigits(c, 3));
  ASSERT_TRUE(lin.ok());
  std::vector<float> x(128, 1.0f), y(16);
  auto bad = lin->Forward(x.data(), 2, y.data(), {4, 3});
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("bits·terms <= 8"), std::string::npos) << bad;
}

// The served layers hold LowbitLinear codes: built from them, the fold must be the one built from
// the expansion, bit for bit, and codes that are not variant D by content must be refused.
TEST(FoldedIntLinear, FromLowbitCodesIsTheFoldOfTheExpansion) {
  uint64_t seed = 700;
  for (const FoldCase& c : kFoldCases) {
    const TensorExpansion e = ExpandDigits(c, seed++);
    auto lw = LowbitLinear::FromExpansion(e);
    ASSERT_TRUE(lw.ok()) << lw.status();
    auto a = FoldedIntLinear::FromExpansion(e);
    auto b = FoldedIntLinear::FromLowbit(*lw);
    ASSERT_TRUE(a.ok() && b.ok()) << b.status();
    EXPECT_EQ(a->resident_bytes(), b->resident_bytes());
    const std::vector<float> x = FoldInput(c, seed++);
    std::vector<int64_t> ia(static_cast<size_t>(c.batch * c.out)), ib(ia.size(), 7);
    ASSERT_TRUE(a->ForwardIntegers(x.data(), c.batch, ia.data(), {c.abits, c.aterms}).ok());
    ASSERT_TRUE(b->ForwardIntegers(x.data(), c.batch, ib.data(), {c.abits, c.aterms}).ok());
    EXPECT_EQ(ia, ib) << c.out << "x" << c.in;
    std::vector<float> ya(ia.size()), yb(ia.size(), 7.0f);
    ASSERT_TRUE(a->Forward(x.data(), c.batch, ya.data(), {c.abits, c.aterms}).ok());
    ASSERT_TRUE(b->Forward(x.data(), c.batch, yb.data(), {c.abits, c.aterms}).ok());
    EXPECT_EQ(ya, yb) << c.out << "x" << c.in;
  }
  // Variant R on the mid grid: the same offsets, but its scales are not s_k / 2^b.
  ExpansionSpec r;
  r.grid = Grid::kMid;
  auto er = ExpandTensor(RandomValues(Dist::kGaussian, 8 * 64, 9), {8, 64}, r);
  ASSERT_TRUE(er.ok());
  auto lr = LowbitLinear::FromExpansion(*er);
  ASSERT_TRUE(lr.ok());
  auto refused = FoldedIntLinear::FromLowbit(*lr);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("variant D"), std::string::npos) << refused.status();
  // Sym codes (offset 0).
  ExpansionSpec sym;
  auto es = ExpandTensor(RandomValues(Dist::kGaussian, 8 * 64, 10), {8, 64}, sym);
  ASSERT_TRUE(es.ok());
  auto ls = LowbitLinear::FromExpansion(*es);
  ASSERT_TRUE(ls.ok());
  EXPECT_NE(FoldedIntLinear::FromLowbit(*ls).status().message().find("mid-grid"),
            std::string::npos);
}

// A dead channel: a weight row of subnormal magnitude, whose second scale the expansion rounds
// up (s_1 / 16 is not a float). It folds with 16·s_2 for s_1: the integers are those of the
// expansion's fold, and the outputs differ from the exact unfolded sum only far below FLT_MIN.
TEST(FoldedIntLinear, FoldsRowsWhoseScalesAreSubnormal) {
  const int64_t out = 4, in = 64;
  std::vector<double> w = RandomValues(Dist::kGaussian, out * in, 12);
  for (int64_t c = 0; c < in; ++c) w[static_cast<size_t>(2 * in + c)] *= 1e-39;
  const TensorExpansion e = [&] {
    auto r = ExpandTensor(w, {out, in}, DigitsSpec(4, 2, ScaleGranularity::kChannel));
    EXPECT_TRUE(r.ok()) << r.status();
    return *std::move(r);
  }();
  const float s1 = e.terms[0].scale[2], s2 = e.terms[1].scale[2];
  ASSERT_LT(s1, FLT_MIN);
  ASSERT_NE(s2 * 16.0f, s1) << "the row must exercise the rounded-up subnormal scale";
  auto lw = LowbitLinear::FromExpansion(e);
  ASSERT_TRUE(lw.ok());
  auto folded = FoldedIntLinear::FromLowbit(*lw);
  ASSERT_TRUE(folded.ok()) << folded.status();
  auto reference = FoldedIntLinear::FromExpansion(e);
  ASSERT_TRUE(reference.ok());
  const FoldCase c{out, in, 3, 4, 2, 4, 2, ScaleGranularity::kChannel};
  const std::vector<float> x = FoldInput(c, 13);
  std::vector<int64_t> ia(static_cast<size_t>(c.batch * out)), ib(ia.size());
  ASSERT_TRUE(folded->ForwardIntegers(x.data(), c.batch, ia.data(), {4, 2}).ok());
  ASSERT_TRUE(reference->ForwardIntegers(x.data(), c.batch, ib.data(), {4, 2}).ok());
  EXPECT_EQ(ia, ib);
  std::vector<float> y(ia.size());
  ASSERT_TRUE(folded->Forward(x.data(), c.batch, y.data(), {4, 2}).ok());
  const TensorExpansion ex = ExpandActDigits(c, x);
  std::vector<double> wq(static_cast<size_t>(out * in), 0.0), xq(static_cast<size_t>(c.batch * in), 0.0);
  for (int k = 1; k <= 2; ++k) {
    AccumulateTerm(e.spec, e.layout, e.terms[k - 1], k, wq.data());
    AccumulateTerm(ex.spec, ex.layout, ex.terms[k - 1], k, xq.data());
  }
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t o = 0; o < out; ++o) {
      double want = 0;
      for (int64_t k = 0; k < in; ++k) want += wq[o * in + k] * xq[b * in + k];
      const float got = y[static_cast<size_t>(b * out + o)];
      if (o == 2) {
        EXPECT_LT(std::fabs(got - want), 2e-40) << "row " << b << " want " << want;
      } else {
        EXPECT_NEAR(got, want, 1e-5 * std::fabs(want) + 1e-30) << "row " << b << " out " << o;
      }
    }
  }
}

// The fused epilogue (bias, then ReLU or hardswish) gives the bits of the unfused output with
// the same float operations applied afterwards, on both schedules and on the fold.
TEST(IntLinear, FusedEpilogueEqualsTheSeparatePasses) {
  ThreadPool pool(2);
  const auto separate = [](std::vector<float> y, int64_t out, const std::vector<float>& bias,
                           PostOp op) {
    for (size_t i = 0; i < y.size(); ++i) {
      float v = y[i] + bias[i % static_cast<size_t>(out)];
      if (op == PostOp::kRelu) v = std::max(v, 0.0f);
      if (op == PostOp::kHardswish) v = v * std::min(std::max(v + 3.0f, 0.0f), 6.0f) / 6.0f;
      y[i] = v;
    }
    return y;
  };
  for (int64_t batch : {3, 29}) {  // the dot schedule and the GEMM
    const Case c{45, 200, batch, 4, 2, 4, 2, false, false, ScaleGranularity::kChannel};
    auto lin = IntLinear::FromExpansion(ExpandW(c, 61));
    ASSERT_TRUE(lin.ok());
    const std::vector<float> x = Input(c, 62);
    std::vector<float> bias = ToFloat(RandomValues(Dist::kGaussian, c.out, 63));
    for (float& b : bias) b *= 4.0f;  // so that ReLU and hardswish both clip some outputs
    std::vector<float> plain(static_cast<size_t>(c.batch * c.out));
    ASSERT_TRUE(lin->Forward(x.data(), c.batch, plain.data(), {c.abits, c.aterms}, 0, &pool).ok());
    for (PostOp op : {PostOp::kNone, PostOp::kRelu, PostOp::kHardswish}) {
      std::vector<float> fused(plain.size(), 7.0f);
      ASSERT_TRUE(lin->Forward(x.data(), c.batch, fused.data(), {c.abits, c.aterms}, 0, &pool,
                               nullptr, Epilogue{bias.data(), op}).ok());
      const std::vector<float> want = separate(plain, c.out, bias, op);
      EXPECT_EQ(fused, want) << "batch " << batch << " op " << static_cast<int>(op);
      if (op == PostOp::kRelu) {
        EXPECT_GT(std::count(fused.begin(), fused.end(), 0.0f), 0);
        EXPECT_LT(std::count(fused.begin(), fused.end(), 0.0f), static_cast<long>(fused.size()));
      }
    }
  }
  const FoldCase& f = kFoldCases[0];
  auto folded = FoldedIntLinear::FromExpansion(ExpandDigits(f, 64));
  ASSERT_TRUE(folded.ok());
  const std::vector<float> x = FoldInput(f, 65);
  const std::vector<float> bias = ToFloat(RandomValues(Dist::kGaussian, f.out, 66));
  std::vector<float> plain(static_cast<size_t>(f.batch * f.out)), fused(plain.size());
  ASSERT_TRUE(folded->Forward(x.data(), f.batch, plain.data(), {f.abits, f.aterms}, &pool).ok());
  ASSERT_TRUE(folded->Forward(x.data(), f.batch, fused.data(), {f.abits, f.aterms}, &pool, nullptr,
                              Epilogue{bias.data(), PostOp::kRelu}).ok());
  EXPECT_EQ(fused, separate(plain, f.out, bias, PostOp::kRelu));
}

// Every kernel table's post steps give the reference table's bits, signed zeros, infinities and
// subnormals included (NaN where it gives NaN), on lengths with and without a partial vector.
TEST(PostSteps, EveryTableGivesTheReferenceBits) {
  const IntKernelTable* ref = IntKernelsByName("ref");
  ASSERT_NE(ref, nullptr);
  ASSERT_NE(ref->post_steps, nullptr);
  std::vector<float> x = ToFloat(RandomValues(Dist::kGaussian, 4099, 17));
  for (float& v : x) v *= 4.0f;
  const float specials[] = {std::nanf(""), INFINITY, -INFINITY, 0.0f, -0.0f, -3.0f, 3.0f,
                            6.0f, -6.0f, 1e-40f, -1e-40f, 3e38f, -3e38f};
  for (size_t i = 0; i < sizeof(specials) / sizeof(specials[0]); ++i) x[i * 7] = specials[i];
  const std::vector<PostStep> steps = {{PostOp::kMul, 0.7f},  {PostOp::kAdd, -0.3f},
                                       {PostOp::kHardswish, 0}, {PostOp::kRelu, 0},
                                       {PostOp::kAdd, -0.1f}, {PostOp::kRelu, 0},
                                       {PostOp::kDiv, 3.0f},  {PostOp::kHardswish, 0}};
  int tables = 0;
  for (const char* name : {"avx2", "avx512vnni"}) {
    const IntKernelTable* t = IntKernelsByName(name);
    if (t == nullptr || t->post_steps == nullptr) continue;
    ++tables;
    for (const int64_t n :
         {int64_t{1}, int64_t{15}, int64_t{16}, int64_t{17}, int64_t{80}, int64_t{4099}}) {
      // Each prefix of the steps, so a wrong step is found where it first differs.
      for (size_t k = 1; k <= steps.size(); ++k) {
        std::vector<float> want(x.begin(), x.begin() + n), got = want;
        ref->post_steps(steps.data(), static_cast<int>(k), want.data(), n);
        t->post_steps(steps.data(), static_cast<int>(k), got.data(), n);
        for (int64_t i = 0; i < n; ++i) {
          const bool same = std::isnan(want[i]) ? std::isnan(got[i])
                                                 : std::memcmp(&want[i], &got[i], 4) == 0;
          ASSERT_TRUE(same) << name << " n " << n << " steps " << k << " x " << x[i] << ": "
                            << got[i] << " vs " << want[i];
        }
      }
    }
  }
  // Tables without their own post steps use the reference's; this CPU's must have been compared.
  const auto active = ActiveIntKernels().post_steps;
  if (active != nullptr && active != ref->post_steps) {
    EXPECT_GE(tables, 1);
  }
}

// rows_per_image: the rows are pixels of several images and the output is written channel-major
// per image (a 1x1 convolution's NCHW), the same values as the row-major output transposed.
TEST(FoldedIntLinear, ImageLayoutIsTheRowMajorOutputTransposed) {
  ThreadPool pool(2);
  const FoldCase c{45, 96, 3 * 13, 4, 2, 4, 2, ScaleGranularity::kChannel};  // 13 pixels per image
  auto lin = FoldedIntLinear::FromExpansion(ExpandDigits(c, 71));
  ASSERT_TRUE(lin.ok());
  const std::vector<float> x = FoldInput(c, 72);
  const std::vector<float> bias = ToFloat(RandomValues(Dist::kGaussian, c.out, 73));
  const Epilogue post{bias.data(), PostOp::kHardswish};
  const int64_t px = 13, images = c.batch / px;
  for (const IntKernelTable* kt : {IntKernelsByName("ref"), IntKernelsByName("avx512vnni")}) {
    if (kt == nullptr) continue;
    std::vector<float> rows(static_cast<size_t>(c.batch * c.out)), nchw(rows.size(), 7.0f);
    ASSERT_TRUE(lin->Forward(x.data(), c.batch, rows.data(), {c.abits, c.aterms}, &pool, kt, post)
                    .ok());
    ASSERT_TRUE(lin->Forward(x.data(), c.batch, nchw.data(), {c.abits, c.aterms}, &pool, kt, post,
                             px)
                    .ok());
    for (int64_t n = 0; n < images; ++n) {
      for (int64_t o = 0; o < c.out; ++o) {
        for (int64_t p = 0; p < px; ++p) {
          ASSERT_EQ(nchw[static_cast<size_t>((n * c.out + o) * px + p)],
                    rows[static_cast<size_t>((n * px + p) * c.out + o)])
              << kt->name << " image " << n << " out " << o << " pixel " << p;
        }
      }
    }
  }
  std::vector<float> y(static_cast<size_t>(c.batch * c.out));
  EXPECT_EQ(lin->Forward(x.data(), c.batch, y.data(), {c.abits, c.aterms}, &pool, nullptr, post, 14)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fpxint::core
