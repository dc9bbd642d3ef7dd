#include "core/lowbit_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/internal/lowbit_linear_inl.h"
#include "core/kernels.h"
#include "core/packing.h"
#include "core/runtime.h"
#include "core/sha256.h"
#include "core/status_macros.h"

namespace fpxint::core {

// Defined in lowbit_linear_avx2.cc / lowbit_linear_avx512.cc (compiled with those ISAs).
const LinearKernelTable& LinearKernelsAvx2();
const LinearKernelTable& LinearKernelsAvx512();

namespace {

void DecodeRef(const uint8_t* packed, int64_t n, int bits, bool is_signed, float* out) {
  std::vector<int32_t> q(static_cast<size_t>(n));
  UnpackCodes(packed, n, bits, is_signed, q.data());
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]);
}

float DotRef(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void DotCodesRef(const uint8_t* packed, int bits, bool is_signed, const float* x, int64_t ldx,
                 int B, int64_t n, float* acc) {
  std::vector<float> c(static_cast<size_t>(n));
  DecodeRef(packed, n, bits, is_signed, c.data());
  for (int b = 0; b < B; ++b) acc[b] += DotRef(c.data(), x + b * ldx, n);
}

void GemmXtRef(const float* w, int64_t ldw, int R, const float* xt, int64_t ldxt, int64_t B,
               int64_t n, float* out, int64_t rs, int64_t bs) {
  for (int r = 0; r < R; ++r) {
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.0f;
      for (int64_t i = 0; i < n; ++i) acc = std::fma(w[r * ldw + i], xt[i * ldxt + b], acc);
      out[r * rs + b * bs] = acc;
    }
  }
}

void DecodeTermsRef(const uint8_t* const* packed, const int* bits, const bool* is_signed,
                    const float* s, const float* off, int K, int64_t n, bool accumulate, float* y) {
  internal::DecodeTermsScalar(packed, bits, is_signed, s, off, K, 0, n, accumulate, y);
}

void DecodeRowsRef(const uint8_t* const* codes, const float* const* scale, const float* const* off,
                   const bool* is_signed, int K, int bits, int64_t rows, int64_t row_bytes,
                   int64_t n, float* out, int64_t ldo) {
  internal::DecodeRowsByRow(DecodeTermsRef, codes, scale, off, is_signed, K, bits, rows, row_bytes,
                            n, out, ldo);
}

void GemmWrRef(const float* w, int64_t ldw, int R, const float* x, int64_t ldx, int64_t B,
               int64_t n, float* out, int64_t ldo) {
  for (int64_t b = 0; b < B; ++b) {
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t i = 0; i < n; ++i) acc = std::fma(w[r * ldw + i], x[b * ldx + i], acc);
      out[b * ldo + r] = acc;
    }
  }
}

void DepthwiseRowRef(const float* const* rows, const float* w, int kh, int kw, int64_t n,
                     float* out) {
  for (int64_t o = 0; o < n; ++o) {
    float acc = 0.0f;
    for (int i = 0; i < kh; ++i) {
      for (int j = 0; j < kw; ++j) acc = std::fma(w[i * kw + j], rows[i][o + j], acc);
    }
    out[o] = acc;
  }
}

constexpr LinearKernelTable kRef = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  LinearKernelTable t{};
  t.name = "ref";
  t.decode = DecodeRef;
  t.dot = DotRef;
  t.dot_codes = DotCodesRef;
  t.gemm_xt = GemmXtRef;
  t.decode_terms = DecodeTermsRef;
  t.decode_rows = DecodeRowsRef;
  t.gemm_wr = GemmWrRef;
  t.depthwise_row = DepthwiseRowRef;
  return t;
}();
constexpr int kTermsPerPass = 4;

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kSmallBatchPerm = kCodesMaxRowsTableLookup;  // the codes schedule's buffers

}  // namespace

const LinearKernelTable* LinearKernelsByName(absl::string_view name) {
  // Supported exactly when the expansion kernels of that ISA are.
  if (KernelsByName(name) == nullptr) return nullptr;
  if (name == "ref") return &kRef;
  if (name == "avx2") return &LinearKernelsAvx2();
  if (name == "avx512") return &LinearKernelsAvx512();
  return nullptr;
}

const LinearKernelTable& ActiveLinearKernels() {
  static const LinearKernelTable* t = [] {
    const LinearKernelTable* k = LinearKernelsByName(IsaName(Runtime().isa));
    return k != nullptr ? k : &kRef;
  }();
  return *t;
}

absl::StatusOr<LowbitLinear> LowbitLinear::FromExpansion(const TensorExpansion& e) {
  if (e.terms.empty()) return absl::InvalidArgumentError("expansion has no terms");
  const TensorLayout& l = e.layout;
  LowbitLinear w;
  w.rows_ = l.rows;
  w.cols_ = l.row_len;
  w.group_len_ = e.spec.scale == ScaleGranularity::kGroup ? l.group_len : l.row_len;
  w.groups_ = e.spec.scale == ScaleGranularity::kGroup ? l.groups_per_row : 1;
  w.row_bytes_ = l.packed_row_bytes;
  for (size_t k = 0; k < e.terms.size(); ++k) {
    const TermData& td = e.terms[k];
    Term t;
    t.bits = e.spec.bits;
    t.is_signed = !e.spec.term_is_unsigned(static_cast<int>(k) + 1);
    t.codes = td.codes;
    const int64_t n = w.rows_ * w.groups_;
    t.scale.resize(static_cast<size_t>(n));
    t.off.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const size_t si = e.spec.scale == ScaleGranularity::kTensor ? 0 : static_cast<size_t>(i);
      if (si >= td.scale.size()) {
        return absl::InvalidArgumentError(absl::StrCat("term ", k + 1, ": too few scales"));
      }
      t.scale[i] = td.scale[si];
      t.off[i] = e.spec.grid == Grid::kSym ? 0.0f : e.spec.grid == Grid::kMid ? 0.5f : -td.zero[si];
    }
    if (static_cast<int64_t>(t.codes.size()) != w.rows_ * w.row_bytes_) {
      return absl::InvalidArgumentError(absl::StrCat("term ", k + 1, ": code buffer size"));
    }
    w.terms_.push_back(std::move(t));
  }
  return w;
}

std::string PackedTermsSha256(absl::Span<const LowbitLinear* const> layers) {
  Sha256 h;
  int max_terms = 0;
  for (const LowbitLinear* l : layers) max_terms = std::max(max_terms, l->terms());
  for (int k = 0; k < max_terms; ++k) {
    for (const LowbitLinear* l : layers) {
      if (k >= l->terms()) continue;
      const LowbitLinear::TermView t = l->term(k);
      const size_t n = static_cast<size_t>(l->out_features() * l->groups());
      h.Update(absl::MakeConstSpan(t.codes, static_cast<size_t>(l->out_features() * l->row_bytes())));
      h.Update(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(t.scale), n * sizeof(float)));
      h.Update(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(t.off), n * sizeof(float)));
    }
  }
  return h.HexDigest();
}

size_t LowbitLinear::resident_bytes() const {
  size_t n = 0;
  for (const Term& t : terms_) {
    n += t.codes.size() + (t.scale.size() + t.off.size()) * sizeof(float);
  }
  return n;
}

void LowbitLinear::Forward(const float* x, int64_t batch, float* y, int terms_used,
                           ThreadPool* pool, const LinearKernelTable* kernels) const {
  ForwardRows(x, cols_, batch, 0, rows_, y, rows_, terms_used, pool, kernels);
}

Schedule LowbitLinear::ChooseSchedule(int64_t rows, LayerShape shape, int64_t max_packed_rows,
                                      const LinearKernelTable* kernels,
                                      bool depthwise_geometry) const {
  const LinearKernelTable& kt = kernels != nullptr ? *kernels : ActiveLinearKernels();
  ScheduleQuery q;
  q.shape = shape;
  q.rows = rows;
  q.in_features = cols_;
  q.table_lookup = TableLookupFits(kt);
  q.panels = kt.gemm_wr != nullptr;
  q.depthwise = depthwise_geometry && kt.depthwise_row != nullptr;
  q.max_packed_rows = max_packed_rows;
  return core::ChooseSchedule(q);
}

bool LowbitLinear::TableLookupFits(const LinearKernelTable& kt) const {
  if (terms_.empty() || kt.perm_block == nullptr) return false;
  // The table-lookup path needs every scale group to start on a block boundary.
  const int64_t pb = kt.perm_block(terms_[0].bits);
  return pb > 0 && (groups_ == 1 || group_len_ % pb == 0);
}

void LowbitLinear::ForwardRows(const float* x, int64_t ldx, int64_t batch, int64_t row_begin,
                               int64_t row_end, float* y_out, int64_t ldy, int terms_used,
                               ThreadPool* pool, const LinearKernelTable* kernels) const {
  if (batch <= 0 || row_end <= row_begin) return;
  const LinearKernelTable& kt = kernels != nullptr ? *kernels : ActiveLinearKernels();
  switch (ChooseSchedule(batch, LayerShape::kLinear, std::numeric_limits<int64_t>::max(), &kt)) {
    case Schedule::kCodes:
      ForwardCodes(x, ldx, batch, row_begin, row_end, y_out, ldy, terms_used, pool, &kt);
      return;
    case Schedule::kPanels:
      ForwardPanels(x, ldx, batch, row_begin, row_end, y_out, ldy, terms_used, pool, &kt);
      return;
    default: {
      // The activations transposed once ([in, batch]), then the transposed schedule, which
      // folds the offsets into the dequantized rows.
      std::vector<float> xt(static_cast<size_t>(batch * cols_));
      for (int64_t b = 0; b < batch; ++b) {
        const float* xb = x + b * ldx;
        for (int64_t i = 0; i < cols_; ++i) xt[static_cast<size_t>(i * batch + b)] = xb[i];
      }
      ForwardTransposed(xt.data(), batch, batch, row_begin, row_end, y_out, 1, ldy, terms_used,
                        pool, &kt);
    }
  }
}

void LowbitLinear::ForwardCodes(const float* x, int64_t ldx, int64_t batch, int64_t row_begin,
                                int64_t row_end, float* y_out, int64_t ldy, int terms_used,
                                ThreadPool* pool, const LinearKernelTable* kernels) const {
  if (batch <= 0 || row_end <= row_begin) return;
  // y[b * ldy + o] for absolute row o.
  float* y = y_out - row_begin;
  const LinearKernelTable& kt = kernels != nullptr ? *kernels : ActiveLinearKernels();
  const int K = terms_used <= 0 || terms_used > terms() ? terms() : terms_used;
  const int bits = terms_[0].bits;
  // The last group of a row may be shorter (row length not a multiple of the group size).
  auto glen = [this](int64_t g) { return std::min(group_len_, cols_ - g * group_len_); };
  const bool perm_ok = TableLookupFits(kt);
  if (batch > (perm_ok ? kCodesMaxRowsTableLookup : kCodesMaxRows)) {
    std::fprintf(stderr, "fpxint: LowbitLinear::ForwardCodes called with %lld rows\n",
                 static_cast<long long>(batch));
    std::abort();  // a caller bug: the buffers below hold at most 8 rows
  }
  // Σx per activation row and scale group: the small-batch path applies the offsets after the
  // dot products.
  std::vector<float> xsum(static_cast<size_t>(batch * groups_));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < groups_; ++g) {
      float s = 0;
      const float* xg = x + b * ldx + g * group_len_;
      for (int64_t i = 0; i < glen(g); ++i) s += xg[i];
      xsum[static_cast<size_t>(b * groups_ + g)] = s;
    }
  }
  // Groups start on a byte boundary when group_len·b is a multiple of 8 (always for channel
  // scales); otherwise the small-batch path decodes whole rows first.
  const bool packed = CodesPerByte(bits) > 1;
  const bool fused = !packed || groups_ == 1 || (group_len_ * bits) % 8 == 0;
  auto byte_offset = [&](int64_t code_index) {
    return packed ? code_index * bits / 8 : code_index;
  };
  const bool perm = perm_ok;
  std::vector<float> xperm;
  if (perm) {
    xperm.resize(static_cast<size_t>(batch * cols_));
    for (int64_t b = 0; b < batch; ++b) {
      if (groups_ == 1) {
        kt.permute_x(x + b * ldx, cols_, bits, xperm.data() + b * cols_);
      } else {
        for (int64_t g = 0; g < groups_; ++g) {
          kt.permute_x(x + b * ldx + g * group_len_, glen(g), bits,
                       xperm.data() + b * cols_ + g * group_len_);
        }
      }
    }
  }
  const int64_t tasks = (row_end - row_begin + kRowsPerTask - 1) / kRowsPerTask;
  auto run = [&](int64_t task) {
    const int64_t r0 = row_begin + task * kRowsPerTask, r1 = std::min(row_end, r0 + kRowsPerTask);
    std::vector<float> buf(static_cast<size_t>(fused ? 0 : cols_));
    for (int64_t o = r0; o < r1; ++o) {
      float yb[kSmallBatchPerm] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (perm && batch == 1 && K > 1 && kt.dot_codes_perm_terms != nullptr) {
        // All K' terms in one pass over the activations (up to 4 at a time).
        for (int64_t g = 0; g < groups_; ++g) {
          for (int k0 = 0; k0 < K; k0 += kTermsPerPass) {
            const int kn = std::min(kTermsPerPass, K - k0);
            const uint8_t* rows[kTermsPerPass];
            bool sign[kTermsPerPass];
            float d[kTermsPerPass] = {0, 0, 0, 0};
            for (int j = 0; j < kn; ++j) {
              const Term& t = terms_[static_cast<size_t>(k0 + j)];
              rows[j] = t.codes.data() + o * row_bytes_ + byte_offset(g * group_len_);
              sign[j] = t.is_signed;
            }
            kt.dot_codes_perm_terms(rows, sign, kn, bits, xperm.data() + g * group_len_, glen(g),
                                    d);
            for (int j = 0; j < kn; ++j) {
              const Term& t = terms_[static_cast<size_t>(k0 + j)];
              const size_t si = static_cast<size_t>(o * groups_ + g);
              yb[0] += t.scale[si] * (d[j] + t.off[si] * xsum[static_cast<size_t>(g)]);
            }
          }
        }
        y[o] = yb[0];  // batch == 1
        continue;
      }
      for (int k = 0; k < K; ++k) {
        const Term& t = terms_[static_cast<size_t>(k)];
        const uint8_t* row = t.codes.data() + o * row_bytes_;
        if (!fused) kt.decode(row, cols_, t.bits, t.is_signed, buf.data());
        for (int64_t g = 0; g < groups_; ++g) {
          const size_t si = static_cast<size_t>(o * groups_ + g);
          float d[kSmallBatchPerm] = {0, 0, 0, 0, 0, 0, 0, 0};
          if (perm) {
            kt.dot_codes_perm(row + byte_offset(g * group_len_), t.bits, t.is_signed,
                              xperm.data() + g * group_len_, cols_, static_cast<int>(batch),
                              glen(g), d);
          } else if (fused) {
            kt.dot_codes(row + byte_offset(g * group_len_), t.bits, t.is_signed, x + g * group_len_,
                         ldx, static_cast<int>(batch), glen(g), d);
          } else {
            for (int64_t b = 0; b < batch; ++b) {
              d[b] = kt.dot(buf.data() + g * group_len_, x + b * ldx + g * group_len_, glen(g));
            }
          }
          for (int64_t b = 0; b < batch; ++b) {
            yb[b] += t.scale[si] * (d[b] + t.off[si] * xsum[static_cast<size_t>(b * groups_ + g)]);
          }
        }
      }
      for (int64_t b = 0; b < batch; ++b) y[b * ldy + o] = yb[b];
    }
  };
  RunTasks(pool, tasks, run);
}

namespace {

// fn(r0, r1, w) for the blocks [r0, r1) of `block` rows of [row_begin, row_end), w their first
// `terms_used` terms dequantized and summed into a per-thread buffer (row-major, in_features()
// floats per row); the blocks split over `pool`.
template <typename Fn>
void ForEachDecodedBlock(const LowbitLinear& lw, int64_t row_begin, int64_t row_end,
                         int64_t block, int terms_used, const LinearKernelTable& kt,
                         ThreadPool* pool, const Fn& fn) {
  const int64_t tasks = (row_end - row_begin + block - 1) / block;
  RunTasks(pool, tasks, [&](int64_t task) {
    const int64_t r0 = row_begin + task * block, r1 = std::min(row_end, r0 + block);
    thread_local std::vector<float> buf;
    const size_t need = static_cast<size_t>((r1 - r0) * lw.in_features());
    if (buf.size() < need) buf.resize(need);
    lw.DequantizeRows(r0, r1, buf.data(), terms_used, &kt);
    fn(r0, r1, buf.data());
  });
}

}  // namespace

void LowbitLinear::ForwardTransposed(const float* xt, int64_t ldxt, int64_t batch,
                                     int64_t row_begin, int64_t row_end, float* y,
                                     int64_t y_row_stride, int64_t y_batch_stride, int terms_used,
                                     ThreadPool* pool, const LinearKernelTable* kernels) const {
  if (batch <= 0 || row_end <= row_begin) return;
  const LinearKernelTable& kt = kernels != nullptr ? *kernels : ActiveLinearKernels();
  // Per task, kRowsPerTask rows dequantized (L1/L2-sized for the layers this serves), then
  // register tiles of kGemmRows rows against every activation row.
  ForEachDecodedBlock(*this, row_begin, row_end, kRowsPerTask, terms_used, kt, pool,
                      [&](int64_t r0, int64_t r1, const float* w) {
                        for (int64_t o0 = r0; o0 < r1; o0 += kGemmRows) {
                          const int R = static_cast<int>(std::min<int64_t>(kGemmRows, r1 - o0));
                          kt.gemm_xt(w + (o0 - r0) * cols_, cols_, R, xt, ldxt, batch, cols_,
                                     y + (o0 - row_begin) * y_row_stride, y_row_stride,
                                     y_batch_stride);
                        }
                      });
}

void LowbitLinear::ForwardPanels(const float* x, int64_t ldx, int64_t batch, int64_t row_begin,
                                 int64_t row_end, float* y, int64_t ldy, int terms_used,
                                 ThreadPool* pool, const LinearKernelTable* kernels) const {
  if (batch <= 0 || row_end <= row_begin) return;
  const LinearKernelTable& kt = kernels != nullptr ? *kernels : ActiveLinearKernels();
  // Per task, kPanelRows rows dequantized (kPanelRows·in floats: L1 or L2), then one gemm_wr
  // against every activation row.
  ForEachDecodedBlock(*this, row_begin, row_end, kPanelRows, terms_used, kt, pool,
                      [&](int64_t r0, int64_t r1, const float* w) {
                        kt.gemm_wr(w, cols_, static_cast<int>(r1 - r0), x, ldx, batch, cols_,
                                   y + (r0 - row_begin), ldy);
                      });
}

void LowbitLinear::DepthwiseConv2d(const float* x, int64_t H, int64_t W, int kh, int kw, int sh,
                                   int ph, int pw, int64_t OH, float* y, int terms_used,
                                   ThreadPool* pool, const LinearKernelTable* kernels,
                                   const ChannelFn* prepare, const ChannelOutFn* finish) const {
  const LinearKernelTable& kt = kernels != nullptr ? *kernels : ActiveLinearKernels();
  const int64_t OW = W + 2 * pw - kw + 1, PW = W + 2 * pw;
  if (rows_ <= 0 || OH <= 0 || OW <= 0) return;
  constexpr int64_t kChannelsPerTask = 8;
  ForEachDecodedBlock(*this, 0, rows_, kChannelsPerTask, terms_used, kt, pool,
                      [&](int64_t c0, int64_t c1, const float* w) {
    // One channel at a time zero-padded left and right (rows above and below the image point
    // at a zero row).
    thread_local std::vector<float> pad, zero, prepared;
    pad.assign(static_cast<size_t>(H * PW), 0.0f);
    zero.assign(static_cast<size_t>(PW), 0.0f);
    if (prepare != nullptr) prepared.resize(static_cast<size_t>(H * W));
    std::vector<const float*> rows(static_cast<size_t>(kh));
    for (int64_t c = c0; c < c1; ++c) {
      const float* xc = x + c * H * W;
      if (prepare != nullptr) {
        (*prepare)(c, xc, prepared.data());
        xc = prepared.data();
      }
      for (int64_t h = 0; h < H; ++h) {
        std::copy(xc + h * W, xc + (h + 1) * W, pad.data() + h * PW + pw);
      }
      for (int64_t oh = 0; oh < OH; ++oh) {
        for (int i = 0; i < kh; ++i) {
          const int64_t ih = oh * sh + i - ph;
          rows[static_cast<size_t>(i)] = ih >= 0 && ih < H ? pad.data() + ih * PW : zero.data();
        }
        kt.depthwise_row(rows.data(), w + (c - c0) * cols_, kh, kw, OW, y + (c * OH + oh) * OW);
      }
      if (finish != nullptr) (*finish)(c, y + c * OH * OW, OH * OW);
    }
  });
}

}  // namespace fpxint::core

namespace fpxint::core {

void LowbitLinear::DequantizeRows(int64_t row_begin, int64_t row_end, float* out, int terms_used,
                                  const LinearKernelTable* kernels) const {
  const LinearKernelTable& kt = kernels != nullptr ? *kernels : ActiveLinearKernels();
  const int K = terms_used <= 0 || terms_used > terms() ? terms() : terms_used;
  // One scale group per row and one code width (every expansion with channel or tensor scales):
  // the whole block of rows in one call.
  bool one_width = true;
  for (int k = 1; k < K; ++k) {
    one_width = one_width && terms_[static_cast<size_t>(k)].bits == terms_[0].bits;
  }
  if (groups_ == 1 && one_width && K <= kMaxDecodeTerms) {
    const uint8_t* codes[kMaxDecodeTerms];
    const float* scale[kMaxDecodeTerms];
    const float* off[kMaxDecodeTerms];
    bool sg[kMaxDecodeTerms];
    for (int k = 0; k < K; ++k) {
      const Term& t = terms_[static_cast<size_t>(k)];
      codes[k] = t.codes.data() + row_begin * row_bytes_;
      scale[k] = t.scale.data() + row_begin;
      off[k] = t.off.data() + row_begin;
      sg[k] = t.is_signed;
    }
    kt.decode_rows(codes, scale, off, sg, K, terms_[0].bits, row_end - row_begin, row_bytes_,
                   cols_, out, cols_);
    return;
  }
  // Every term's group starts on a byte boundary (always with one group per row): all K terms
  // of a segment are decoded and summed in one pass over it.
  bool aligned = true;
  for (int k = 0; k < K; ++k) {
    const int b = terms_[static_cast<size_t>(k)].bits;
    if (groups_ > 1 && CodesPerByte(b) > 1 && (group_len_ * b) % 8 != 0) aligned = false;
  }
  if (aligned) {
    const uint8_t* packed[kMaxDecodeTerms];
    int bits[kMaxDecodeTerms];
    bool sg[kMaxDecodeTerms];
    float s[kMaxDecodeTerms], off[kMaxDecodeTerms];
    for (int64_t o = row_begin; o < row_end; ++o) {
      float* wrow = out + (o - row_begin) * cols_;
      for (int64_t g = 0; g < groups_; ++g) {
        const int64_t c0 = g * group_len_, n = std::min(group_len_, cols_ - c0);
        const size_t si = static_cast<size_t>(o * groups_ + g);
        for (int k0 = 0; k0 < K; k0 += kMaxDecodeTerms) {
          const int kk = std::min(kMaxDecodeTerms, K - k0);
          for (int j = 0; j < kk; ++j) {
            const Term& t = terms_[static_cast<size_t>(k0 + j)];
            const int64_t byte0 = CodesPerByte(t.bits) > 1 ? c0 * t.bits / 8 : c0;
            packed[j] = t.codes.data() + o * row_bytes_ + byte0;
            bits[j] = t.bits;
            sg[j] = t.is_signed;
            s[j] = t.scale[si];
            off[j] = t.off[si];
          }
          kt.decode_terms(packed, bits, sg, s, off, kk, n, /*accumulate=*/k0 > 0, wrow + c0);
        }
      }
    }
    return;
  }
  thread_local std::vector<float> code;  // decoded codes of one row, reused across calls
  if (code.size() < static_cast<size_t>(cols_)) code.resize(static_cast<size_t>(cols_));
  for (int64_t o = row_begin; o < row_end; ++o) {
    float* wrow = out + (o - row_begin) * cols_;
    std::fill(wrow, wrow + cols_, 0.0f);
    for (int k = 0; k < K; ++k) {
      const Term& t = terms_[static_cast<size_t>(k)];
      kt.decode(t.codes.data() + o * row_bytes_, cols_, t.bits, t.is_signed, code.data());
      for (int64_t g = 0; g < groups_; ++g) {
        const size_t si = static_cast<size_t>(o * groups_ + g);
        const int64_t n = std::min(group_len_, cols_ - g * group_len_);
        const float sc = t.scale[si], of = t.off[si];
        const float* c = code.data() + g * group_len_;
        float* y = wrow + g * group_len_;
        for (int64_t i = 0; i < n; ++i) y[i] = std::fma(sc, c[i] + of, y[i]);  // as decode_terms
      }
    }
  }
}

void LowbitLinear::Dequantize(float* out, int terms_used, ThreadPool* pool,
                              const LinearKernelTable* kernels) const {
  const int64_t tasks = (rows_ + kRowsPerTask - 1) / kRowsPerTask;
  auto run = [&](int64_t task) {
    const int64_t r0 = task * kRowsPerTask, r1 = std::min(rows_, r0 + kRowsPerTask);
    DequantizeRows(r0, r1, out + r0 * cols_, terms_used, kernels);
  };
  RunTasks(pool, tasks, run);
}

// Image layout (all integers little-endian):
//   "FPXLL001"                                  8 bytes
//   rows, cols, group_len, groups, terms        5 × int64
//   per term: bits int32, signed int32, then rows·row_bytes code bytes, rows·groups f32 scales,
//             rows·groups f32 offsets, where row_bytes = ⌈cols·bits/8⌉ for bits ∈ {1,2,4}, else
//             cols.
namespace {

constexpr char kImageMagic[8] = {'F', 'P', 'X', 'L', 'L', '0', '0', '1'};
constexpr int64_t kMaxImageDim = int64_t{1} << 40;

void Put(std::string* s, const void* p, size_t n) { s->append(static_cast<const char*>(p), n); }

class Reader {
 public:
  explicit Reader(absl::string_view b) : b_(b) {}
  absl::Status Read(void* out, size_t n, absl::string_view field) {
    if (b_.size() - pos_ < n) {
      return absl::InvalidArgumentError(absl::StrCat("packed weight image truncated at '", field,
                                                     "' (needs ", n, " more bytes, has ",
                                                     b_.size() - pos_, ")"));
    }
    std::memcpy(out, b_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  size_t left() const { return b_.size() - pos_; }

 private:
  absl::string_view b_;
  size_t pos_ = 0;
};

}  // namespace

std::string LowbitLinear::Serialize() const {
  std::string s;
  Put(&s, kImageMagic, sizeof(kImageMagic));
  const int64_t head[5] = {rows_, cols_, group_len_, groups_, static_cast<int64_t>(terms_.size())};
  Put(&s, head, sizeof(head));
  for (const Term& t : terms_) {
    const int32_t ts[2] = {t.bits, t.is_signed ? 1 : 0};
    Put(&s, ts, sizeof(ts));
    Put(&s, t.codes.data(), t.codes.size());
    Put(&s, t.scale.data(), t.scale.size() * sizeof(float));
    Put(&s, t.off.data(), t.off.size() * sizeof(float));
  }
  return s;
}

absl::StatusOr<LowbitLinear> LowbitLinear::Deserialize(absl::string_view bytes) {
  Reader r(bytes);
  char magic[sizeof(kImageMagic)];
  FPX_RETURN_IF_ERROR(r.Read(magic, sizeof(magic), "magic"));
  if (std::memcmp(magic, kImageMagic, sizeof(magic)) != 0) {
    return absl::InvalidArgumentError("not a packed weight image (magic is not FPXLL001)");
  }
  int64_t head[5];
  FPX_RETURN_IF_ERROR(r.Read(head, sizeof(head), "header"));
  LowbitLinear w;
  w.rows_ = head[0];
  w.cols_ = head[1];
  w.group_len_ = head[2];
  w.groups_ = head[3];
  const int64_t nterms = head[4];
  if (w.rows_ < 1 || w.rows_ > kMaxImageDim || w.cols_ < 1 || w.cols_ > kMaxImageDim ||
      w.rows_ > kMaxImageDim / w.cols_) {
    return absl::InvalidArgumentError(
        absl::StrCat("packed weight image: shape [", w.rows_, ", ", w.cols_, "] out of range"));
  }
  if (w.group_len_ < 1 || w.group_len_ > w.cols_ ||
      w.groups_ != (w.cols_ + w.group_len_ - 1) / w.group_len_) {
    return absl::InvalidArgumentError(absl::StrCat("packed weight image: group_len ", w.group_len_,
                                                   " and groups ", w.groups_,
                                                   " do not tile a row of ", w.cols_));
  }
  if (nterms < 1 || nterms > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("packed weight image: terms ", nterms, "; accepted 1..64"));
  }
  int bits0 = 0;
  for (int64_t k = 0; k < nterms; ++k) {
    int32_t ts[2];
    FPX_RETURN_IF_ERROR(r.Read(ts, sizeof(ts), "term header"));
    Term t;
    t.bits = ts[0];
    t.is_signed = ts[1] != 0;
    if (t.bits < 1 || t.bits > 8 || (k > 0 && t.bits != bits0) || (ts[1] != 0 && ts[1] != 1)) {
      return absl::InvalidArgumentError(absl::StrCat("packed weight image: term ", k + 1, " bits ",
                                                     ts[0], " signed ", ts[1],
                                                     "; accepted bits 1..8, equal for every term"));
    }
    bits0 = t.bits;
    const int64_t row_bytes = PackedRowBytes(w.cols_, t.bits);
    w.row_bytes_ = row_bytes;
    const int64_t code_bytes = w.rows_ * row_bytes;
    const int64_t nscale = w.rows_ * w.groups_;
    if (static_cast<uint64_t>(code_bytes) + 8 * static_cast<uint64_t>(nscale) > r.left()) {
      return absl::InvalidArgumentError(absl::StrCat("packed weight image truncated in term ",
                                                     k + 1, " (needs ", code_bytes + 8 * nscale,
                                                     " bytes, has ", r.left(), ")"));
    }
    t.codes.resize(static_cast<size_t>(code_bytes));
    FPX_RETURN_IF_ERROR(r.Read(t.codes.data(), t.codes.size(), "codes"));
    t.scale.resize(static_cast<size_t>(nscale));
    t.off.resize(static_cast<size_t>(nscale));
    FPX_RETURN_IF_ERROR(r.Read(t.scale.data(), t.scale.size() * sizeof(float), "scales"));
    FPX_RETURN_IF_ERROR(r.Read(t.off.data(), t.off.size() * sizeof(float), "offsets"));
    w.terms_.push_back(std::move(t));
  }
  if (r.left() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("packed weight image: ", r.left(), " bytes after the last term"));
  }
  return w;
}

}  // namespace fpxint::core
