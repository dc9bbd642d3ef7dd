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

const LinearKernelTable kRef = {"ref", DecodeRef, DotRef, AxpbyRef};

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kSmallBatch = 4;

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
  // Σx per activation row and scale group (for the offsets).
  std::vector<float> xsum(static_cast<size_t>(batch * groups_));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < groups_; ++g) {
      float s = 0;
      const float* xg = x + b * cols_ + g * group_len_;
      for (int64_t i = 0; i < group_len_; ++i) s += xg[i];
      xsum[static_cast<size_t>(b * groups_ + g)] = s;
    }
  }
  const bool small = batch <= kSmallBatch;
  const int64_t tasks = (rows_ + kRowsPerTask - 1) / kRowsPerTask;
  auto run = [&](int64_t task) {
    std::vector<float> buf(static_cast<size_t>(cols_));
    std::vector<float> wrow(small ? 0 : static_cast<size_t>(cols_));
    const int64_t r0 = task * kRowsPerTask, r1 = std::min(rows_, r0 + kRowsPerTask);
    for (int64_t o = r0; o < r1; ++o) {
      if (small) {
        for (int64_t b = 0; b < batch; ++b) y[b * rows_ + o] = 0;
        for (int k = 0; k < K; ++k) {
          const Term& t = terms_[static_cast<size_t>(k)];
          kt.decode(t.codes.data() + o * row_bytes_, cols_, t.bits, t.is_signed, buf.data());
          for (int64_t b = 0; b < batch; ++b) {
            float acc = 0;
            for (int64_t g = 0; g < groups_; ++g) {
              const size_t si = static_cast<size_t>(o * groups_ + g);
              const float d = kt.dot(buf.data() + g * group_len_, x + b * cols_ + g * group_len_,
                                     group_len_);
              acc += t.scale[si] * (d + t.off[si] * xsum[static_cast<size_t>(b * groups_ + g)]);
            }
            y[b * rows_ + o] += acc;
          }
        }
      } else {
        std::fill(wrow.begin(), wrow.end(), 0.0f);
        for (int k = 0; k < K; ++k) {
          const Term& t = terms_[static_cast<size_t>(k)];
          kt.decode(t.codes.data() + o * row_bytes_, cols_, t.bits, t.is_signed, buf.data());
          for (int64_t g = 0; g < groups_; ++g) {
            const size_t si = static_cast<size_t>(o * groups_ + g);
            kt.axpby(buf.data() + g * group_len_, t.scale[si], t.off[si],
                     wrow.data() + g * group_len_, group_len_);
          }
        }
        for (int64_t b = 0; b < batch; ++b) {
          y[b * rows_ + o] = kt.dot(wrow.data(), x + b * cols_, cols_);
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
