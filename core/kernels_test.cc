// Every kernel variant this CPU supports against the scalar reference: codes, residuals and
// min/max bit for bit, sums of squares within 1e-12 relative, on odd sizes and every grid.
#include "core/kernels.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "core/dtype.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace fpxint::core {
namespace {

using ::fpxint::testing::Dist;
using ::fpxint::testing::RandomValues;

TEST(Kernels, ReferenceIsAlwaysSupportedAndActiveIsOneOfThem) {
  std::vector<std::string> names = SupportedKernelNames();
  ASSERT_FALSE(names.empty());
  EXPECT_EQ(names[0], "ref");
  bool found = false;
  for (const std::string& n : names) found |= n == ActiveKernels().name;
  EXPECT_TRUE(found);
  EXPECT_EQ(KernelsByName("nonsense"), nullptr);
}

struct Grid3 {
  const char* name;
  QuantizeFn KernelTable::*fn;
  TermParams params;
};

class KernelVariantTest : public ::testing::TestWithParam<std::string> {};

TEST_P(KernelVariantTest, BitIdenticalToReference) {
  const KernelTable* fast = KernelsByName(GetParam());
  if (fast == nullptr) GTEST_SKIP() << GetParam() << " is not supported on this CPU";
  const KernelTable* ref = KernelsByName("ref");
  const Grid3 grids[] = {
      {"sym4", &KernelTable::quantize_sym, {0.37, 0, -7, 7}},
      {"sym8", &KernelTable::quantize_sym, {0.011, 0, -127, 127}},
      {"asym4", &KernelTable::quantize_asym, {0.41, 7.25, 0, 15}},
      {"asym8", &KernelTable::quantize_asym, {0.023, 127.5, 0, 255}},
      {"mid4", &KernelTable::quantize_mid, {0.4, 0, -8, 7}},
      {"mid1", &KernelTable::quantize_mid, {2.5, 0, -1, 0}},
  };
  int compared = 0;
  for (int64_t n : {1, 2, 3, 7, 8, 9, 31, 33, 64, 4097}) {
    for (const Grid3& g : grids) {
      std::vector<double> x = RandomValues(Dist::kStudentT3, n, n * 31 + 7);
      // Exact ties, exact integers of r/s, zeros of both signs and out-of-range values.
      for (int64_t i = 0; i < n; i += 5) x[i] = g.params.scale * (std::floor(x[i]) + 0.5);
      if (n > 3) x[3] = -0.0;
      if (n > 2) x[2] = 1e3;
      std::vector<double> ra = x, rb = x;
      std::vector<uint8_t> ca(n, 0xAA), cb(n, 0x55);
      SegmentStats sa, sb;
      (ref->*g.fn)(g.params, ra.data(), ca.data(), n, &sa);
      (fast->*g.fn)(g.params, rb.data(), cb.data(), n, &sb);
      ASSERT_EQ(ca, cb) << GetParam() << " " << g.name << " n=" << n;
      ASSERT_EQ(0, std::memcmp(ra.data(), rb.data(), n * sizeof(double)))
          << GetParam() << " " << g.name << " n=" << n;
      EXPECT_EQ(sa.min, sb.min);
      EXPECT_EQ(sa.max, sb.max);
      EXPECT_NEAR(sa.sumsq, sb.sumsq, 1e-12 * sa.sumsq);
      SegmentStats ta, tb;
      ref->stats(x.data(), n, &ta);
      fast->stats(x.data(), n, &tb);
      EXPECT_EQ(ta.min, tb.min);
      EXPECT_EQ(ta.max, tb.max);
      EXPECT_NEAR(ta.sumsq, tb.sumsq, 1e-12 * ta.sumsq);
      ++compared;
    }
  }
  EXPECT_EQ(compared, 60);
}

// The fused digits kernel against the scalar reference (a division per term), including
// quotients a hair below an integer, where r · (1/s) rounds up to the integer and its floor would
// be one too high: the fast kernels must divide there. Zeros, exact integers and extremes too.
TEST_P(KernelVariantTest, DigitsBitIdenticalToReference) {
  const KernelTable* fast = KernelsByName(GetParam());
  if (fast == nullptr) GTEST_SKIP() << GetParam() << " is not supported on this CPU";
  const KernelTable* ref = KernelsByName("ref");
  // (x, s) with x/s a hair below an integer n <= 7 by division while x · (1/s) rounds to n.
  struct Trap {
    float x;
    double s;
  };
  std::vector<Trap> traps;
  for (float x : {5.0f, 3.0f, 7.0f, 1.7f, 2.3f, 6.1f, 0.9f, 4.4f, 1.1f, 2.9f, 3.3f}) {
    for (int n = 1; n <= 7; ++n) {
      for (int k = -6; k <= 6; ++k) {
        double s = static_cast<double>(x) / n;
        for (int i = 0; i < std::abs(k); ++i) s = std::nextafter(s, k > 0 ? 1e300 : 0.0);
        if (std::floor(x / s) != std::floor(x * (1.0 / s))) traps.push_back({x, s});
      }
    }
  }
  ASSERT_GE(traps.size(), 4u) << "too few (x, s) where the reciprocal's floor differs";
  int compared = 0;
  for (const Trap& trap : traps) {
    const double s1 = trap.s;
    for (int64_t n : {1, 7, 8, 9, 33, 130}) {
      std::vector<float> x(static_cast<size_t>(n));
      const std::vector<double> v = RandomValues(Dist::kStudentT3, n, n * 7 + 1);
      for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(v[i]);
      for (int64_t i = 0; i < n; i += 3) x[i] = trap.x;
      if (n > 4) x[4] = 0.0f;
      if (n > 5) x[5] = -0.0f;
      if (n > 7) x[7] = -trap.x;
      const double scales[2] = {s1, s1 / 16};
      DigitsParams p;
      p.scale = scales;
      p.terms = 2;
      p.bits = 4;
      p.lo = -8;
      p.hi = 7;
      p.fold_shift = 136;
      std::vector<float> sa(n, -1), sb(n, -2);
      std::vector<uint8_t> c1a(n), c2a(n), c1b(n), c2b(n), ua(n), ub(n);
      uint8_t* ca[2] = {c1a.data(), c2a.data()};
      uint8_t* cb[2] = {c1b.data(), c2b.data()};
      int64_t usa = -1, usb = -2;
      ref->digits_mid(x.data(), n, p, sa.data(), ca, ua.data(), &usa);
      fast->digits_mid(x.data(), n, p, sb.data(), cb, ub.data(), &usb);
      ASSERT_EQ(c1a, c1b) << GetParam() << " s " << s1 << " n " << n;
      ASSERT_EQ(c2a, c2b) << GetParam() << " s " << s1 << " n " << n;
      ASSERT_EQ(ua, ub);
      ASSERT_EQ(usa, usb);
      ASSERT_EQ(0, std::memcmp(sa.data(), sb.data(), n * sizeof(float)));
      EXPECT_EQ(static_cast<int8_t>(c1a[0]), static_cast<int>(std::floor(trap.x / s1)));
      ++compared;
    }
  }
  EXPECT_GT(compared, 0);
  // max |x| and finiteness.
  std::vector<float> y = {1.0f, -3.5f, 2.0f, 0.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f,
                          1.0f, 1.0f, 1.0f, 1.0f, 1.0f, -2.5f};
  float m = 0;
  EXPECT_TRUE(fast->f32_abs_max(y.data(), static_cast<int64_t>(y.size()), &m));
  EXPECT_EQ(m, 3.5f);
  for (size_t at : {size_t{1}, size_t{17}}) {
    for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                      std::numeric_limits<float>::quiet_NaN()}) {
      std::vector<float> z = y;
      z[at] = bad;
      EXPECT_FALSE(fast->f32_abs_max(z.data(), static_cast<int64_t>(z.size()), &m))
          << GetParam() << " " << bad << " at " << at;
    }
  }
}

// Every one of the 65536 bfloat16 and float16 codes, at odd offsets and lengths (vector bodies
// and scalar tails), against ConvertToDouble: the same double, or NaN for NaN.
TEST(Kernels, HalfWidthConversionsMatchConvertToDouble) {
  std::vector<uint8_t> all(2 * 65536 + 2);
  for (uint32_t c = 0; c < 65536; ++c) {
    all[2 * c + 1] = static_cast<uint8_t>(c);  // +1: an odd address
    all[2 * c + 2] = static_cast<uint8_t>(c >> 8);
  }
  struct Conv {
    const char* name;
    DType dtype;
    void (*KernelTable::*fn)(const uint8_t*, int64_t, double*);
  };
  int compared = 0;
  for (const std::string& name : SupportedKernelNames()) {
    const KernelTable* fast = KernelsByName(name);
    for (const Conv& c : {Conv{"bf16", DType::kBF16, &KernelTable::bf16_to_f64},
                          Conv{"f16", DType::kF16, &KernelTable::f16_to_f64}}) {
      for (int64_t first : {int64_t{0}, int64_t{5}}) {
        for (int64_t n :
             {int64_t{65536} - first, int64_t{1}, int64_t{15}, int64_t{17}, int64_t{33}}) {
          const uint8_t* src = all.data() + 1 + 2 * first;
          std::vector<double> want(static_cast<size_t>(n)), got(static_cast<size_t>(n), -1.0);
          ConvertToDouble(c.dtype, src, n, want.data());
          (fast->*c.fn)(src, n, got.data());
          for (int64_t i = 0; i < n; ++i) {
            if (std::isnan(want[i])) {
              ASSERT_TRUE(std::isnan(got[i])) << name << " " << c.name << " code " << first + i;
            } else {
              ASSERT_EQ(0, std::memcmp(&want[i], &got[i], sizeof(double)))
                  << name << " " << c.name << " code " << first + i << ": " << want[i] << " vs "
                  << got[i];
            }
          }
          ++compared;
        }
      }
    }
  }
  EXPECT_EQ(compared, 20 * static_cast<int>(SupportedKernelNames().size()));
}

INSTANTIATE_TEST_SUITE_P(All, KernelVariantTest, ::testing::Values("avx2", "avx512"));

TEST(KernelsRef, FormulasOfEachGrid) {
  const KernelTable* ref = KernelsByName("ref");
  double r[4] = {0.74, -0.76, 0.5, 10.0};
  uint8_t c[4];
  SegmentStats st;
  // sym: s = 0.5, codes clamp at ±7; round half to even: 0.5/0.5 = 1 exactly.
  ref->quantize_sym({0.5, 0, -7, 7}, r, c, 4, &st);
  EXPECT_EQ(static_cast<int8_t>(c[0]), 1);
  EXPECT_EQ(static_cast<int8_t>(c[1]), -2);
  EXPECT_EQ(static_cast<int8_t>(c[2]), 1);
  EXPECT_EQ(static_cast<int8_t>(c[3]), 7);
  EXPECT_DOUBLE_EQ(r[0], 0.24);
  EXPECT_DOUBLE_EQ(r[3], 6.5);
  EXPECT_EQ(st.max, 6.5);
  // mid: floor, value (C + 1/2)·s.
  double m[2] = {0.1, -0.1};
  ref->quantize_mid({1.0, 0, -8, 7}, m, c, 2, &st);
  EXPECT_EQ(static_cast<int8_t>(c[0]), 0);
  EXPECT_EQ(static_cast<int8_t>(c[1]), -1);
  EXPECT_DOUBLE_EQ(m[0], -0.4);
  EXPECT_DOUBLE_EQ(m[1], 0.4);
  // asym: codes are unsigned up to 255.
  double a[2] = {-1.0, 1.0};
  ref->quantize_asym({2.0 / 255, 127.5, 0, 255}, a, c, 2, &st);
  EXPECT_EQ(c[0], 0);
  EXPECT_EQ(c[1], 255);
}

}  // namespace
}  // namespace fpxint::core
