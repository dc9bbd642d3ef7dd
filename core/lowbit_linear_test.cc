// The low-bit linear kernels: every variant this CPU supports against the scalar reference, and
// the reference against the exact fp64 reconstruction of the expansion (x · Σ Ŵ_kᵀ), on random
// and edge shapes (odd sizes, one row, one column, K' = 1, every grid, packed and byte codes,
// channel and group scales, small and large batches).
#include "core/lowbit_linear.h"

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

struct Case {
  int64_t out, in, batch;
  int bits, terms;
  Grid grid;
  ScaleGranularity scale;
  int64_t group;
};

std::string Name(const Case& c) {
  return absl::StrCat(c.out, "x", c.in, " batch ", c.batch, " b=", c.bits, " K=", c.terms, " grid ",
                      static_cast<int>(c.grid), " scale ", static_cast<int>(c.scale), " g ", c.group);
}

TensorExpansion Expand(const Case& c, uint64_t seed) {
  ExpansionSpec spec;
  spec.bits = c.bits;
  spec.terms = c.terms;
  spec.grid = c.grid;
  spec.scale = c.scale;
  spec.group_size = c.group;
  auto e = ExpandTensor(RandomValues(Dist::kStudentT3, c.out * c.in, seed), {c.out, c.in}, spec);
  EXPECT_TRUE(e.ok()) << e.status();
  return *std::move(e);
}

// y = x · (Σ_{k<K'} Ŵ_k)ᵀ in fp64 from Reconstruct.
std::vector<double> Exact(const TensorExpansion& e, const std::vector<float>& x, int64_t batch,
                          int terms) {
  const std::vector<double> w = Reconstruct(e, terms);
  const int64_t out = e.layout.rows, in = e.layout.row_len;
  std::vector<double> y(static_cast<size_t>(batch * out));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) s += w[o * in + i] * x[b * in + i];
      y[b * out + o] = s;
    }
  }
  return y;
}


const Case kCases[] = {
    {17, 33, 1, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0},
    {1, 64, 1, 4, 3, Grid::kMid, ScaleGranularity::kChannel, 0},
    {40, 1, 3, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0},
    {33, 129, 2, 2, 4, Grid::kMid, ScaleGranularity::kChannel, 0},
    {31, 100, 5, 4, 2, Grid::kAsym, ScaleGranularity::kChannel, 0},
    {24, 96, 1, 4, 2, Grid::kSym, ScaleGranularity::kGroup, 32},
    {24, 96, 9, 4, 2, Grid::kMid, ScaleGranularity::kGroup, 16},
    {19, 77, 4, 3, 2, Grid::kSym, ScaleGranularity::kChannel, 0},
    {19, 77, 8, 8, 1, Grid::kSym, ScaleGranularity::kChannel, 0},
    {21, 45, 2, 1, 5, Grid::kMid, ScaleGranularity::kChannel, 0},
    {16, 50, 6, 2, 3, Grid::kAsym, ScaleGranularity::kTensor, 0},
    {64, 256, 64, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0},
    {20, 60, 2, 1, 3, Grid::kMid, ScaleGranularity::kGroup, 12},   // groups not byte-aligned
    {20, 60, 3, 3, 2, Grid::kSym, ScaleGranularity::kGroup, 20},   // byte codes, groups
    {13, 48, 7, 4, 2, Grid::kAsym, ScaleGranularity::kGroup, 16},  // asym zero per group
    {29, 96, 8, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0},   // 8 rows: table lookup
    {17, 128, 6, 2, 3, Grid::kMid, ScaleGranularity::kGroup, 64},
    {11, 70, 1, 4, 2, Grid::kSym, ScaleGranularity::kGroup, 32},   // last group shorter (6)
    {11, 70, 5, 4, 2, Grid::kAsym, ScaleGranularity::kGroup, 32},
    {11, 70, 12, 2, 3, Grid::kMid, ScaleGranularity::kGroup, 16},
    {45, 120, 40, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0},  // masked lane blocks
    {9, 33, 17, 4, 1, Grid::kMid, ScaleGranularity::kChannel, 0},
    {7, 25, 33, 2, 2, Grid::kAsym, ScaleGranularity::kGroup, 8},
};

TEST(LowbitLinear, ReferenceMatchesTheExactExpansion) {
  uint64_t seed = 1;
  for (const Case& c : kCases) {
    const TensorExpansion e = Expand(c, seed++);
    auto w = LowbitLinear::FromExpansion(e);
    ASSERT_TRUE(w.ok()) << w.status();
    std::vector<float> x = ::fpxint::testing::ToFloat(RandomValues(Dist::kGaussian, c.batch * c.in, seed++));
    for (int k = 1; k <= c.terms; ++k) {
      std::vector<float> y(static_cast<size_t>(c.batch * c.out), -1.0f);
      w->Forward(x.data(), c.batch, y.data(), k, nullptr, LinearKernelsByName("ref"));
      EXPECT_LT(MaxRelErr(y, Exact(e, x, c.batch, k)), 1e-5) << Name(c) << " K'=" << k;
    }
  }
}

class LowbitVariant : public ::testing::TestWithParam<std::string> {};

TEST_P(LowbitVariant, MatchesReferenceWithAndWithoutThreads) {
  const LinearKernelTable* fast = LinearKernelsByName(GetParam());
  if (fast == nullptr) GTEST_SKIP() << GetParam() << " is not supported on this CPU";
  ThreadPool pool(2);
  uint64_t seed = 100;
  for (const Case& c : kCases) {
    const TensorExpansion e = Expand(c, seed++);
    auto w = LowbitLinear::FromExpansion(e);
    ASSERT_TRUE(w.ok());
    std::vector<float> x = ::fpxint::testing::ToFloat(RandomValues(Dist::kLaplace, c.batch * c.in, seed++));
    for (int k : {1, c.terms}) {
      std::vector<float> ref(static_cast<size_t>(c.batch * c.out)), got(ref.size(), 7.0f);
      w->Forward(x.data(), c.batch, ref.data(), k, nullptr, LinearKernelsByName("ref"));
      w->Forward(x.data(), c.batch, got.data(), k, &pool, fast);
      std::vector<double> refd(ref.begin(), ref.end());
      EXPECT_LT(MaxRelErr(got, refd), 1e-5) << GetParam() << " " << Name(c) << " K'=" << k;
    }
  }
}

TEST_P(LowbitVariant, DecodeIsExactForEveryWidthAndOffset) {
  const LinearKernelTable* fast = LinearKernelsByName(GetParam());
  if (fast == nullptr) GTEST_SKIP() << GetParam() << " is not supported on this CPU";
  const LinearKernelTable* ref = LinearKernelsByName("ref");
  std::vector<uint8_t> packed(300);
  for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<uint8_t>(i * 37 + 11);
  for (int bits = 1; bits <= 8; ++bits) {
    for (bool is_signed : {false, true}) {
      for (int64_t n : {1, 7, 8, 15, 16, 17, 31, 33, 100, 257}) {
        std::vector<float> a(n), b(n);
        ref->decode(packed.data(), n, bits, is_signed, a.data());
        fast->decode(packed.data(), n, bits, is_signed, b.data());
        ASSERT_EQ(a, b) << GetParam() << " bits " << bits << " signed " << is_signed << " n " << n;
      }
    }
  }
}

// decode_terms on every variant (ref included) gives exactly the bits of its definition: one
// fused multiply-add per term in term order, from zero or from y.
TEST(LowbitLinear, DecodeTermsIsBitForBitItsDefinitionOnEveryVariant) {
  int variants = 0;
  for (const std::string name : {"ref", "avx2", "avx512"}) {
    const LinearKernelTable* kt = LinearKernelsByName(name);
    if (kt == nullptr) continue;  // not supported on this CPU
    ++variants;
    std::vector<std::vector<uint8_t>> codes(kMaxDecodeTerms, std::vector<uint8_t>(300));
    for (size_t k = 0; k < codes.size(); ++k) {
      for (size_t i = 0; i < codes[k].size(); ++i)
        codes[k][i] = static_cast<uint8_t>(i * 37 + 11 * k + 5);
    }
    const uint8_t* packed[kMaxDecodeTerms];
    for (int k = 0; k < kMaxDecodeTerms; ++k) packed[k] = codes[static_cast<size_t>(k)].data();
    const float s[kMaxDecodeTerms] = {0.37f,    -0.021f, 1.9e-3f, 3.3e-4f,
                                      -7.7e-5f, 1e-5f,   2.5e-6f, 1e-7f};
    const float off[kMaxDecodeTerms] = {0.5f, 0.0f, -3.0f, 0.5f, 0.0f, 0.5f, -1.0f, 0.0f};
    for (int bits : {1, 2, 3, 4, 8}) {
      for (bool is_signed : {false, true}) {
        for (int K : {1, 2, 3, kMaxDecodeTerms}) {
          int bw[kMaxDecodeTerms];
          bool sg[kMaxDecodeTerms];
          for (int k = 0; k < K; ++k) {
            bw[k] = bits;
            sg[k] = k == 0 ? is_signed : true;  // an unsigned first term, signed residuals
          }
          for (int64_t n : {1, 7, 9, 15, 16, 17, 33, 100, 257}) {
            for (bool accumulate : {false, true}) {
              std::vector<float> want(static_cast<size_t>(n)), got(want.size());
              for (int64_t i = 0; i < n; ++i) want[i] = got[i] = accumulate ? 0.1f * i - 3 : 99.0f;
              if (!accumulate) std::fill(want.begin(), want.end(), 0.0f);
              std::vector<int32_t> q(static_cast<size_t>(n));
              for (int k = 0; k < K; ++k) {
                UnpackCodes(packed[k], n, bw[k], sg[k], q.data());
                for (int64_t i = 0; i < n; ++i) {
                  want[i] = std::fma(s[k], static_cast<float>(q[i]) + off[k], want[i]);
                }
              }
              kt->decode_terms(packed, bw, sg, s, off, K, n, accumulate, got.data());
              ASSERT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)))
                  << name << " bits " << bits << " signed " << is_signed << " K " << K << " n " << n
                  << " accumulate " << accumulate;
            }
          }
        }
      }
    }
    // Terms of different widths (the interface allows it; expansions never make it).
    for (const auto& widths :
         {std::vector<int>{4, 2}, std::vector<int>{4, 8}, std::vector<int>{3, 1}}) {
      int bw[kMaxDecodeTerms];
      bool sg[kMaxDecodeTerms] = {true, true};
      for (size_t k = 0; k < widths.size(); ++k) bw[k] = widths[k];
      for (int64_t n : {1, 17, 100}) {
        std::vector<float> want(static_cast<size_t>(n), 0.0f), got(want.size(), 99.0f);
        std::vector<int32_t> q(static_cast<size_t>(n));
        for (int k = 0; k < 2; ++k) {
          UnpackCodes(packed[k], n, bw[k], sg[k], q.data());
          for (int64_t i = 0; i < n; ++i) {
            want[i] = std::fma(s[k], static_cast<float>(q[i]) + off[k], want[i]);
          }
        }
        kt->decode_terms(packed, bw, sg, s, off, 2, n, false, got.data());
        ASSERT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)))
            << name << " widths " << widths[0] << "," << widths[1] << " n " << n;
      }
    }
  }
  EXPECT_GE(variants, 1);
}

// decode_rows on every variant gives, row by row, the bits of the reference decode_terms on that
// row (its codes at r·row_bytes, its own scale and offset), for short rows (depthwise kernels)
// and long, and writes nothing between rows (ldo > n).
TEST(LowbitLinear, DecodeRowsIsDecodeTermsRowByRowOnEveryVariant) {
  const LinearKernelTable* ref = LinearKernelsByName("ref");
  ASSERT_NE(ref, nullptr);
  int variants = 0;
  for (const std::string name : {"ref", "avx2", "avx512"}) {
    const LinearKernelTable* kt = LinearKernelsByName(name);
    if (kt == nullptr) continue;  // not supported on this CPU
    ++variants;
    for (int bits : {1, 2, 3, 4, 8}) {
      for (int K : {1, 2, 3, kMaxDecodeTerms}) {
        for (int64_t n : {1, 9, 16, 25, 120, 257}) {
          const int64_t rows = 7, row_bytes = CodesPerByte(bits) > 1 ? (n * bits + 7) / 8 : n,
                        ldo = n + 3;
          std::vector<std::vector<uint8_t>> codes(K);
          std::vector<std::vector<float>> scale(K), off(K);
          const uint8_t* cp[kMaxDecodeTerms];
          const float* sp[kMaxDecodeTerms];
          const float* op[kMaxDecodeTerms];
          bool sg[kMaxDecodeTerms];
          for (int k = 0; k < K; ++k) {
            codes[k].resize(static_cast<size_t>(rows * row_bytes));
            for (size_t i = 0; i < codes[k].size(); ++i)
              codes[k][i] = static_cast<uint8_t>(i * 29 + 13 * k + 3);
            for (int64_t r = 0; r < rows; ++r) {
              scale[k].push_back(0.3f / static_cast<float>((k + 1) * (k + 1) * (r + 2)));
              off[k].push_back(r % 3 == 0 ? 0.5f : r % 3 == 1 ? 0.0f : -2.0f);
            }
            cp[k] = codes[k].data();
            sp[k] = scale[k].data();
            op[k] = off[k].data();
            sg[k] = k > 0 || bits != 2;  // an unsigned first term somewhere
          }
          std::vector<float> want(static_cast<size_t>(rows * ldo), -7.0f), got(want);
          for (int64_t r = 0; r < rows; ++r) {
            const uint8_t* packed[kMaxDecodeTerms];
            int bw[kMaxDecodeTerms];
            float s[kMaxDecodeTerms], o[kMaxDecodeTerms];
            for (int k = 0; k < K; ++k) {
              packed[k] = cp[k] + r * row_bytes;
              bw[k] = bits;
              s[k] = sp[k][r];
              o[k] = op[k][r];
            }
            ref->decode_terms(packed, bw, sg, s, o, K, n, false, want.data() + r * ldo);
          }
          kt->decode_rows(cp, sp, op, sg, K, bits, rows, row_bytes, n, got.data(), ldo);
          ASSERT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)))
              << name << " bits " << bits << " K " << K << " n " << n;
        }
      }
    }
  }
  EXPECT_GE(variants, 1);
}

// The large-batch inner loop: every output one fused multiply-add chain over i in order, so every
// variant gives the reference's bits, in both output layouts (rows contiguous as a convolution
// writes them, or activation rows contiguous as a linear layer does), with nothing written
// outside the tile.
TEST(LowbitLinear, GemmXtIsBitForBitItsDefinitionOnEveryVariant) {
  const LinearKernelTable* ref = LinearKernelsByName("ref");
  ASSERT_NE(ref, nullptr);
  int variants = 0;
  for (const std::string name : {"ref", "avx2", "avx512"}) {
    const LinearKernelTable* kt = LinearKernelsByName(name);
    if (kt == nullptr) continue;
    ++variants;
    for (int R = 1; R <= kGemmRows; ++R) {
      for (int64_t n : {1, 3, 16, 37, 120}) {
        for (int64_t B : {1, 5, 8, 15, 16, 17, 31, 32, 33, 40, 64, 100}) {
          const int64_t ldw = n + 3, ldxt = B + 2;
          const std::vector<float> w = ::fpxint::testing::ToFloat(
              RandomValues(Dist::kGaussian, R * ldw, static_cast<uint64_t>(R * 1000 + n)));
          const std::vector<float> xt = ::fpxint::testing::ToFloat(
              RandomValues(Dist::kLaplace, n * ldxt, static_cast<uint64_t>(B * 7 + n)));
          for (bool rows_contiguous : {true, false}) {
            const int64_t rs = rows_contiguous ? B + 1 : 1, bs = rows_contiguous ? 1 : R + 2;
            const size_t size = static_cast<size_t>(R * rs + B * bs + 4);
            std::vector<float> want(size, -5.0f), got(size, -5.0f);
            ref->gemm_xt(w.data(), ldw, R, xt.data(), ldxt, B, n, want.data(), rs, bs);
            kt->gemm_xt(w.data(), ldw, R, xt.data(), ldxt, B, n, got.data(), rs, bs);
            ASSERT_EQ(0, std::memcmp(want.data(), got.data(), size * sizeof(float)))
                << name << " R " << R << " n " << n << " B " << B << " rows contiguous "
                << rows_contiguous;
            // The definition itself, and the padding untouched.
            float acc = 0.0f;
            for (int64_t i = 0; i < n; ++i) {
              acc = std::fma(w[static_cast<size_t>((R - 1) * ldw + i)],
                             xt[static_cast<size_t>(i * ldxt + B - 1)], acc);
            }
            ASSERT_EQ(got[static_cast<size_t>((R - 1) * rs + (B - 1) * bs)], acc);
            if (rows_contiguous) {
              ASSERT_EQ(got[static_cast<size_t>(B)], -5.0f) << "wrote past B";
            }
          }
        }
      }
    }
  }
  EXPECT_GE(variants, 1);
}

// The moderate-batch inner loop (weight rows in the lanes): every variant that has it gives the
// reference's bits (one fused multiply-add chain over i in order, across the kernel's input
// chunks too), for partial lane counts, row tails and inputs past one chunk, and writes nothing
// beyond R columns of each output row.
TEST(LowbitLinear, GemmWrIsBitForBitItsDefinitionOnEveryVariant) {
  const LinearKernelTable* ref = LinearKernelsByName("ref");
  ASSERT_NE(ref, nullptr);
  ASSERT_NE(ref->gemm_wr, nullptr);
  int variants = 0;
  for (const std::string name : {"ref", "avx2", "avx512"}) {
    const LinearKernelTable* kt = LinearKernelsByName(name);
    if (kt == nullptr || kt->gemm_wr == nullptr) continue;
    ++variants;
    for (int R : {1, 5, 15, 16, 17, 31, kPanelRows}) {
      for (int64_t n : {1, 3, 16, 37, 120, 300, 520}) {
        for (int64_t B : {1, 5, 11, 12, 13, 24, 40, 64}) {
          const int64_t ldw = n + 3, ldx = n + 5, ldo = R + 2;
          const std::vector<float> w = ::fpxint::testing::ToFloat(
              RandomValues(Dist::kGaussian, R * ldw, static_cast<uint64_t>(R * 1000 + n)));
          const std::vector<float> x = ::fpxint::testing::ToFloat(
              RandomValues(Dist::kLaplace, B * ldx, static_cast<uint64_t>(B * 7 + n)));
          const size_t size = static_cast<size_t>(B * ldo);
          std::vector<float> want(size, -5.0f), got(size, -5.0f);
          ref->gemm_wr(w.data(), ldw, R, x.data(), ldx, B, n, want.data(), ldo);
          kt->gemm_wr(w.data(), ldw, R, x.data(), ldx, B, n, got.data(), ldo);
          ASSERT_EQ(0, std::memcmp(want.data(), got.data(), size * sizeof(float)))
              << name << " R " << R << " n " << n << " B " << B;
          float acc = 0.0f;  // the definition itself, for the last output
          for (int64_t i = 0; i < n; ++i) {
            acc = std::fma(w[static_cast<size_t>((R - 1) * ldw + i)],
                           x[static_cast<size_t>((B - 1) * ldx + i)], acc);
          }
          ASSERT_EQ(got[static_cast<size_t>((B - 1) * ldo + R - 1)], acc);
          ASSERT_EQ(got[static_cast<size_t>(R)], -5.0f) << "wrote past R";
        }
      }
    }
  }
  EXPECT_GE(variants, 1);
}

// ForwardPanels (where the table has gemm_wr) against the exact product and the reference's bits.
TEST(LowbitLinear, ForwardPanelsMatchesTheReferenceBits) {
  ThreadPool pool(2);
  const LinearKernelTable* ref = LinearKernelsByName("ref");
  for (const Case& c : {Case{70, 300, 40, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0},
                        Case{33, 120, 17, 2, 3, Grid::kMid, ScaleGranularity::kChannel, 0},
                        Case{40, 96, 13, 4, 2, Grid::kAsym, ScaleGranularity::kGroup, 32}}) {
    const TensorExpansion e = Expand(c, 5);
    auto w = LowbitLinear::FromExpansion(e);
    ASSERT_TRUE(w.ok());
    const std::vector<float> x = ::fpxint::testing::ToFloat(
        RandomValues(Dist::kGaussian, c.batch * c.in, 99));
    std::vector<float> want(static_cast<size_t>(c.batch * c.out));
    w->ForwardPanels(x.data(), c.in, c.batch, 0, c.out, want.data(), c.out, 0, nullptr, ref);
    EXPECT_LT(MaxRelErr(want, Exact(e, x, c.batch, c.terms)), 1e-5) << Name(c);
    for (const char* name : {"avx2", "avx512"}) {
      const LinearKernelTable* kt = LinearKernelsByName(name);
      if (kt == nullptr || kt->gemm_wr == nullptr) continue;
      std::vector<float> got(want.size(), 7.0f);
      // A row range too, as the op's thread split hands it out.
      w->ForwardPanels(x.data(), c.in, c.batch, 0, c.out, got.data(), c.out, 0, &pool, kt);
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)))
          << name << " " << Name(c);
    }
  }
}

// One depthwise output row: every variant that has it gives the reference's bits (one FMA chain
// per output in tap order) for row lengths around the 16- and 64-output blocks, and writes
// nothing past n.
TEST(LowbitLinear, DepthwiseRowIsBitForBitItsDefinitionOnEveryVariant) {
  const LinearKernelTable* ref = LinearKernelsByName("ref");
  ASSERT_NE(ref, nullptr);
  int variants = 0;
  for (const std::string name : {"ref", "avx2", "avx512"}) {
    const LinearKernelTable* kt = LinearKernelsByName(name);
    if (kt == nullptr || kt->depthwise_row == nullptr) continue;
    ++variants;
    for (int k : {1, 3, 5}) {
      for (int64_t n : {1, 15, 16, 17, 63, 64, 65, 80, 160, 200}) {
        const std::vector<float> in = ::fpxint::testing::ToFloat(
            RandomValues(Dist::kLaplace, k * (n + k), static_cast<uint64_t>(n * 10 + k)));
        const std::vector<float> w = ::fpxint::testing::ToFloat(
            RandomValues(Dist::kGaussian, k * k, static_cast<uint64_t>(k)));
        std::vector<const float*> rows;
        for (int i = 0; i < k; ++i) rows.push_back(in.data() + i * (n + k));
        std::vector<float> want(static_cast<size_t>(n + 4), -5.0f), got(want);
        ref->depthwise_row(rows.data(), w.data(), k, k, n, want.data());
        kt->depthwise_row(rows.data(), w.data(), k, k, n, got.data());
        ASSERT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)))
            << name << " k " << k << " n " << n;
        ASSERT_EQ(got[static_cast<size_t>(n)], -5.0f) << "wrote past n";
      }
    }
  }
  EXPECT_GE(variants, 1);
}

// DepthwiseConv2d against the convolution computed from the exact expansion (fp64), with height
// strides, asymmetric padding, K' < K, and the channel split over a pool (the same bits as one
// thread).
TEST(LowbitLinear, DepthwiseConv2dMatchesTheExactConvolution) {
  ThreadPool pool(2);
  const LinearKernelTable& kt = ActiveLinearKernels();
  if (kt.depthwise_row == nullptr) GTEST_SKIP() << kt.name << " has no depthwise path";
  struct Geo { int64_t C, H, W; int k, sh, ph, pw; };
  for (const Geo& g : {Geo{24, 12, 80, 5, 1, 2, 2}, Geo{16, 9, 20, 3, 2, 1, 1},
                       Geo{9, 5, 7, 3, 1, 0, 1}}) {
    const Case c{g.C, g.k * g.k, 1, 4, 3, Grid::kSym, ScaleGranularity::kChannel, 0};
    const TensorExpansion e = Expand(c, 31);
    auto w = LowbitLinear::FromExpansion(e);
    ASSERT_TRUE(w.ok());
    const std::vector<float> x = ::fpxint::testing::ToFloat(
        RandomValues(Dist::kGaussian, g.C * g.H * g.W, 17));
    const int64_t OH = (g.H + 2 * g.ph - g.k) / g.sh + 1, OW = g.W + 2 * g.pw - g.k + 1;
    for (int terms : {1, 3}) {
      const std::vector<double> wd = Reconstruct(e, terms);
      std::vector<double> want(static_cast<size_t>(g.C * OH * OW), 0.0);
      for (int64_t ch = 0; ch < g.C; ++ch) {
        for (int64_t oh = 0; oh < OH; ++oh) {
          for (int64_t ow = 0; ow < OW; ++ow) {
            double acc = 0;
            for (int i = 0; i < g.k; ++i) {
              for (int j = 0; j < g.k; ++j) {
                const int64_t ih = oh * g.sh + i - g.ph, iw = ow + j - g.pw;
                if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
                acc += wd[static_cast<size_t>(ch * g.k * g.k + i * g.k + j)] *
                       x[static_cast<size_t>((ch * g.H + ih) * g.W + iw)];
              }
            }
            want[static_cast<size_t>((ch * OH + oh) * OW + ow)] = acc;
          }
        }
      }
      std::vector<float> one(want.size()), two(want.size());
      w->DepthwiseConv2d(x.data(), g.H, g.W, g.k, g.k, g.sh, g.ph, g.pw, OH, one.data(), terms);
      w->DepthwiseConv2d(x.data(), g.H, g.W, g.k, g.k, g.sh, g.ph, g.pw, OH, two.data(), terms,
                         &pool);
      EXPECT_LT(MaxRelErr(one, want), 1e-5) << g.C << "x" << g.H << "x" << g.W << " K'=" << terms;
      EXPECT_EQ(one, two);
    }
  }
}

// The transposed schedule as a convolution calls it: im2col columns [in, pixels] with a row
// stride, the output [out, pixels] for a row range, against the exact product; and the same bits
// as the reference table.
TEST(LowbitLinear, ForwardTransposedWritesTheConvolutionLayout) {
  ThreadPool pool(2);
  for (const Case& c : {Case{37, 27, 50, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0},
                        Case{20, 64, 240, 4, 2, Grid::kMid, ScaleGranularity::kGroup, 32},
                        Case{9, 30, 3, 2, 3, Grid::kAsym, ScaleGranularity::kChannel, 0}}) {
    const TensorExpansion e = Expand(c, 41);
    auto w = LowbitLinear::FromExpansion(e);
    ASSERT_TRUE(w.ok());
    const int64_t px = c.batch, ldxt = px + 7;
    const std::vector<float> xt =
        ::fpxint::testing::ToFloat(RandomValues(Dist::kGaussian, c.in * ldxt, 3));
    std::vector<float> x(static_cast<size_t>(px * c.in));  // the same activations, row-major
    for (int64_t p = 0; p < px; ++p) {
      for (int64_t i = 0; i < c.in; ++i) x[p * c.in + i] = xt[i * ldxt + p];
    }
    for (int k = 1; k <= c.terms; ++k) {
      const std::vector<double> exact = Exact(e, x, px, k);
      const int64_t r0 = 3, r1 = c.out - 2, ldy = px + 1;
      std::vector<float> y(static_cast<size_t>((r1 - r0) * ldy), -3.0f), y_ref(y);
      w->ForwardTransposed(xt.data(), ldxt, px, r0, r1, y.data(), ldy, 1, k, &pool);
      w->ForwardTransposed(xt.data(), ldxt, px, r0, r1, y_ref.data(), ldy, 1, k, nullptr,
                           LinearKernelsByName("ref"));
      EXPECT_EQ(0, std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float))) << Name(c);
      std::vector<float> got;
      std::vector<double> want;
      for (int64_t o = r0; o < r1; ++o) {
        for (int64_t p = 0; p < px; ++p) {
          got.push_back(y[static_cast<size_t>((o - r0) * ldy + p)]);
          want.push_back(exact[static_cast<size_t>(p * c.out + o)]);
        }
        EXPECT_EQ(y[static_cast<size_t>((o - r0) * ldy + px)], -3.0f) << "wrote into the padding";
      }
      EXPECT_LT(MaxRelErr(got, want), 1e-5) << Name(c) << " K'=" << k;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, LowbitVariant, ::testing::Values("avx2", "avx512"));

TEST(LowbitLinear, ResidentBytesAreAboutKBitsOver32OfFp32) {
  const Case c{256, 1024, 1, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0};
  auto w = LowbitLinear::FromExpansion(Expand(c, 9));
  ASSERT_TRUE(w.ok());
  const double fp32 = 4.0 * c.out * c.in;
  const double packed = c.out * c.in * c.bits * c.terms / 8.0;
  EXPECT_GE(w->resident_bytes(), packed);
  EXPECT_LT(w->resident_bytes(), packed * 1.01 + 2 * 2 * 4 * c.out);  // + scales and offsets
  EXPECT_LT(w->resident_bytes() / fp32, 0.26);  // K·b/32 = 0.25
}

// Row ranges with strided activations and outputs (one grouped-convolution group per call) give
// exactly the rows of the full product.
TEST(LowbitLinear, ForwardRowsMatchesTheFullProductOnStridedViews) {
  ThreadPool pool(2);
  for (const Case& c : {Case{37, 40, 3, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0},
                        Case{37, 40, 20, 2, 3, Grid::kMid, ScaleGranularity::kGroup, 8}}) {
    auto w = LowbitLinear::FromExpansion(Expand(c, 31));
    ASSERT_TRUE(w.ok());
    const int64_t ldx = c.in + 5, ldy = 50;
    std::vector<float> xs = ::fpxint::testing::ToFloat(RandomValues(Dist::kGaussian, c.batch * ldx, 5));
    std::vector<float> x(static_cast<size_t>(c.batch * c.in));
    for (int64_t b = 0; b < c.batch; ++b) {
      std::copy(xs.begin() + b * ldx, xs.begin() + b * ldx + c.in, x.begin() + b * c.in);
    }
    std::vector<float> full(static_cast<size_t>(c.batch * c.out));
    w->Forward(x.data(), c.batch, full.data(), 0, &pool);
    const int64_t r0 = 5, r1 = 29;
    std::vector<float> part(static_cast<size_t>(c.batch * ldy), -3.0f);
    w->ForwardRows(xs.data(), ldx, c.batch, r0, r1, part.data(), ldy, 0, &pool);
    for (int64_t b = 0; b < c.batch; ++b) {
      for (int64_t o = r0; o < r1; ++o) {
        EXPECT_EQ(part[b * ldy + o - r0], full[b * c.out + o]) << Name(c) << " b " << b << " o " << o;
      }
      EXPECT_EQ(part[b * ldy + (r1 - r0)], -3.0f) << "wrote past the row range";
    }
  }
}

// Byte-aligned groups (one pass over all terms), groups that start mid-byte (term by term), and
// more terms than one pass takes; every kernel table gives the same bits.
TEST(LowbitLinear, DequantizeIsTheSumOfTheFirstTerms) {
  ThreadPool pool(2);
  for (const Case& c : {Case{23, 70, 1, 4, 3, Grid::kAsym, ScaleGranularity::kGroup, 32},
                        Case{20, 60, 1, 1, 3, Grid::kMid, ScaleGranularity::kGroup, 12},
                        Case{9, 300, 1, 2, 11, Grid::kMid, ScaleGranularity::kChannel, 0},
                        Case{5, 9, 1, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0}}) {
    const TensorExpansion e = Expand(c, 77);
    auto w = LowbitLinear::FromExpansion(e);
    ASSERT_TRUE(w.ok());
    for (int k = 1; k <= c.terms; ++k) {
      std::vector<float> got(static_cast<size_t>(c.out * c.in));
      w->Dequantize(got.data(), k, &pool);
      EXPECT_LT(MaxRelErr(got, Reconstruct(e, k)), 1e-6) << Name(c) << " K'=" << k;
      for (const char* name : {"ref", "avx2", "avx512"}) {
        const LinearKernelTable* kt = LinearKernelsByName(name);
        if (kt == nullptr) continue;
        std::vector<float> other(got.size());
        w->Dequantize(other.data(), k, nullptr, kt);
        EXPECT_EQ(0, std::memcmp(got.data(), other.data(), got.size() * sizeof(float)))
            << name << " " << Name(c) << " K'=" << k;
      }
    }
  }
}

TEST(LowbitLinear, SerializeRoundTripsExactly) {
  ThreadPool pool(2);
  uint64_t seed = 500;
  for (const Case& c : kCases) {
    auto w = LowbitLinear::FromExpansion(Expand(c, seed++));
    ASSERT_TRUE(w.ok());
    const std::string image = w->Serialize();
    auto back = LowbitLinear::Deserialize(image);
    ASSERT_TRUE(back.ok()) << Name(c) << ": " << back.status();
    EXPECT_EQ(back->Serialize(), image);
    EXPECT_EQ(back->resident_bytes(), w->resident_bytes());
    std::vector<float> x = ::fpxint::testing::ToFloat(RandomValues(Dist::kGaussian, c.batch * c.in, seed++));
    std::vector<float> a(static_cast<size_t>(c.batch * c.out)), b(a.size());
    w->Forward(x.data(), c.batch, a.data(), 0, &pool);
    back->Forward(x.data(), c.batch, b.data(), 0, &pool);
    EXPECT_EQ(a, b) << Name(c);
  }
}

TEST(LowbitLinear, DeserializeRejectsDamagedImagesWithTheField) {
  auto w = LowbitLinear::FromExpansion(
      Expand(Case{8, 20, 1, 4, 2, Grid::kSym, ScaleGranularity::kChannel, 0}, 3));
  ASSERT_TRUE(w.ok());
  const std::string good = w->Serialize();
  auto expect_error = [](const std::string& image, const std::string& needle) {
    auto r = LowbitLinear::Deserialize(image);
    ASSERT_FALSE(r.ok()) << "accepted an image that should say: " << needle;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(r.status().message()).find(needle), std::string::npos) << r.status();
  };
  expect_error("", "truncated at 'magic'");
  expect_error("NOTMAGIC" + good.substr(8), "magic");
  for (size_t cut : {size_t{20}, size_t{48}, size_t{60}, good.size() - 1}) {
    expect_error(good.substr(0, cut), "truncated");
  }
  expect_error(good + "x", "after the last term");
  auto with_i64 = [&](size_t at, int64_t v) {
    std::string s = good;
    std::memcpy(&s[at], &v, 8);
    return s;
  };
  expect_error(with_i64(8, -1), "out of range");            // rows
  expect_error(with_i64(16, int64_t{1} << 50), "out of range");  // cols
  expect_error(with_i64(24, 7), "do not tile");             // group_len
  expect_error(with_i64(40, 0), "terms 0");                 // terms
  expect_error(with_i64(40, 1000), "terms 1000");
  std::string bad_bits = good;
  const int32_t nine = 9;
  std::memcpy(&bad_bits[48], &nine, 4);
  expect_error(bad_bits, "bits 9");
}

TEST(LowbitLinear, RejectsAnExpansionWithoutTerms) {
  TensorExpansion e;
  EXPECT_FALSE(LowbitLinear::FromExpansion(e).ok());
}

}  // namespace
}  // namespace fpxint::core
