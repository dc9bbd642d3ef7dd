#include "core/lowbit_linear.h"

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "core/kernels.h"
#include "core/packing.h"

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

void AxpbyRef(const float* c, float s, float off, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += s * (c[i] + off);
}

void DotCodesRef(const uint8_t* packed, int bits, bool is_signed, const float* x, int64_t ldx,
                 int B, int64_t n, float* acc) {
  std::vector<float> c(static_cast<size_t>(n));
  DecodeRef(packed, n, bits, is_signed, c.data());
  for (int b = 0; b < B; ++b) acc[b] += DotRef(c.data(), x + b * ldx, n);
}

void TileDotsRef(const float* w, int64_t ldw, int R, const float* x, int64_t ldx, int B, int64_t n,
                 float* out) {
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) out[r * B + b] = DotRef(w + r * ldw, x + b * ldx, n);
  }
}

const LinearKernelTable kRef = {"ref",       DecodeRef, DotRef,  AxpbyRef, DotCodesRef,
                                 TileDotsRef, nullptr,   nullptr, nullptr,  nullptr};
constexpr int kTermsPerPass = 4;

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kSmallBatch = 4;      // activation rows per dot_codes call
constexpr int64_t kSmallBatchPerm = 8;  // ... per dot_codes_perm call
constexpr int kTile = 4;  // rows and activation rows per register tile

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
    const LinearKernelTable* k = LinearKernelsByName(ActiveKernels().name);
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
      t.off[i] = e.spec.grid == Grid::kSym    ? 0.0f
                 : e.spec.grid == Grid::kMid ? 0.5f
                                             : -td.zero[si];
    }
    if (static_cast<int64_t>(t.codes.size()) != w.rows_ * w.row_bytes_) {
      return absl::InvalidArgumentError(absl::StrCat("term ", k + 1, ": code buffer size"));
    }
    w.terms_.push_back(std::move(t));
  }
  return w;
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
  const LinearKernelTable& kt = kernels != nullptr ? *kernels : ActiveLinearKernels();
  const int K = terms_used <= 0 || terms_used > terms() ? terms() : terms_used;
  const int bits = terms_[0].bits;
  const int64_t pb = kt.perm_block != nullptr ? kt.perm_block(bits) : 0;
  // The table-lookup path needs every scale group to start on a block boundary.
  const bool perm_ok = pb > 0 && (groups_ == 1 || group_len_ % pb == 0);
  const bool small = batch <= (perm_ok ? kSmallBatchPerm : kSmallBatch);
  // Σx per activation row and scale group: the small-batch path applies the offsets after the
  // dot products (the large-batch path folds them into the dequantized rows).
  std::vector<float> xsum(small ? static_cast<size_t>(batch * groups_) : 0);
  for (int64_t b = 0; small && b < batch; ++b) {
    for (int64_t g = 0; g < groups_; ++g) {
      float s = 0;
      const float* xg = x + b * cols_ + g * group_len_;
      for (int64_t i = 0; i < group_len_; ++i) s += xg[i];
      xsum[static_cast<size_t>(b * groups_ + g)] = s;
    }
  }
  // Groups start on a byte boundary when group_len·b is a multiple of 8 (always for channel
  // scales); otherwise the small-batch path decodes whole rows first.
  const bool packed = CodesPerByte(bits) > 1;
  const bool fused = !packed || groups_ == 1 || (group_len_ * bits) % 8 == 0;
  auto byte_offset = [&](int64_t code_index) { return packed ? code_index * bits / 8 : code_index; };
  const bool perm = small && perm_ok;
  std::vector<float> xperm;
  if (perm) {
    xperm.resize(static_cast<size_t>(batch * cols_));
    for (int64_t b = 0; b < batch; ++b) {
      if (groups_ == 1) {
        kt.permute_x(x + b * cols_, cols_, bits, xperm.data() + b * cols_);
      } else {
        for (int64_t g = 0; g < groups_; ++g) {
          kt.permute_x(x + b * cols_ + g * group_len_, group_len_, bits,
                       xperm.data() + b * cols_ + g * group_len_);
        }
      }
    }
  }
  const int64_t tasks = (rows_ + kRowsPerTask - 1) / kRowsPerTask;
  auto run = [&](int64_t task) {
    const int64_t r0 = task * kRowsPerTask, r1 = std::min(rows_, r0 + kRowsPerTask);
    std::vector<float> buf(static_cast<size_t>(small ? (fused ? 0 : cols_) : kTile * cols_));
    if (small) {
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
              kt.dot_codes_perm_terms(rows, sign, kn, bits, xperm.data() + g * group_len_,
                                      group_len_, d);
              for (int j = 0; j < kn; ++j) {
                const Term& t = terms_[static_cast<size_t>(k0 + j)];
                const size_t si = static_cast<size_t>(o * groups_ + g);
                yb[0] += t.scale[si] * (d[j] + t.off[si] * xsum[static_cast<size_t>(g)]);
              }
            }
          }
          y[o] = yb[0];
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
                                group_len_, d);
            } else if (fused) {
              kt.dot_codes(row + byte_offset(g * group_len_), t.bits, t.is_signed,
                           x + g * group_len_, cols_, static_cast<int>(batch), group_len_, d);
            } else {
              for (int64_t b = 0; b < batch; ++b) {
                d[b] = kt.dot(buf.data() + g * group_len_, x + b * cols_ + g * group_len_, group_len_);
              }
            }
            for (int64_t b = 0; b < batch; ++b) {
              yb[b] += t.scale[si] * (d[b] + t.off[si] * xsum[static_cast<size_t>(b * groups_ + g)]);
            }
          }
        }
        for (int64_t b = 0; b < batch; ++b) y[b * rows_ + o] = yb[b];
      }
      return;
    }
    // Larger batches: dequantize kTile rows (all K' terms summed) into buf, then register tiles
    // of kTile rows × kTile activation rows.
    std::vector<float> code(static_cast<size_t>(cols_));
    for (int64_t o0 = r0; o0 < r1; o0 += kTile) {
      const int R = static_cast<int>(std::min<int64_t>(kTile, r1 - o0));
      std::fill(buf.begin(), buf.end(), 0.0f);
      for (int r = 0; r < R; ++r) {
        float* wrow = buf.data() + r * cols_;
        for (int k = 0; k < K; ++k) {
          const Term& t = terms_[static_cast<size_t>(k)];
          kt.decode(t.codes.data() + (o0 + r) * row_bytes_, cols_, t.bits, t.is_signed, code.data());
          for (int64_t g = 0; g < groups_; ++g) {
            const size_t si = static_cast<size_t>((o0 + r) * groups_ + g);
            kt.axpby(code.data() + g * group_len_, t.scale[si], t.off[si], wrow + g * group_len_,
                     group_len_);
          }
        }
      }
      float out[kTile * kTile];
      for (int64_t b0 = 0; b0 < batch; b0 += kTile) {
        const int B = static_cast<int>(std::min<int64_t>(kTile, batch - b0));
        kt.tile_dots(buf.data(), cols_, R, x + b0 * cols_, cols_, B, cols_, out);
        for (int r = 0; r < R; ++r) {
          for (int b = 0; b < B; ++b) y[(b0 + b) * rows_ + o0 + r] = out[r * B + b];
        }
      }
    }
  };
  if (pool != nullptr && tasks > 1) {
    pool->ParallelFor(tasks, run);
  } else {
    for (int64_t t = 0; t < tasks; ++t) run(t);
  }
}

}  // namespace fpxint::core
