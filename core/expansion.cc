#include "core/expansion.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/packing.h"
#include "core/status_macros.h"

// One copy of a function per ISA, picked at load time by an ifunc resolver. Resolvers run before
// ThreadSanitizer's runtime has started (a crash at startup), so sanitized builds get one plain
// copy.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define FPXINT_ISA_CLONES
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define FPXINT_ISA_CLONES
#endif
#endif
#ifndef FPXINT_ISA_CLONES
#define FPXINT_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

namespace fpxint::core {
namespace {

constexpr int64_t kMaxElements = int64_t{1} << 40;

// The smallest float >= x (x > 0, finite, <= FLT_MAX).
float RoundUpToFloat(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, INFINITY);
  return f;
}

// The largest float <= x when that is a normal float, else RoundUpToFloat(x). For sym and asym a
// scale rounded down keeps every element's error within s/2 <= m·r (the hard bound of docs/ALGORITHM.md §7, C2),
// and still never clips: x/s <= qmax·(1 + 2^-23) rounds to qmax for qmax < 2^22. Subnormal
// scales are too coarse for that, so they round up instead.
float RoundDownToFloat(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) > x) f = std::nextafter(f, 0.0f);
  return f >= FLT_MIN ? f : RoundUpToFloat(x);
}

// Scale, zero point and code range of one term on one group, from the statistics of the
// group's current residual. `prev_scale` is the group's scale in term k-1 (variant D).
struct GroupParams {
  TermParams p;
  float scale = 1;
  float zero = 0;
  bool skip = false;  // mid grid, zero group: codes 0, residual unchanged
};

GroupParams ParamsFor(const ExpansionSpec& spec, const SegmentStats& st, float prev_scale, int k) {
  GroupParams g;
  g.p.lo = spec.code_min();
  g.p.hi = spec.code_max();
  const double mn = st.min + 0.0;  // + 0.0 turns -0 into +0 so all variants agree bitwise
  const double mx = st.max + 0.0;
  const double m = std::max(std::fabs(mn), std::fabs(mx));
  if (spec.unsigned_first && k == 1) {  // non-negative input: codes [0, 2^b-1], value s·C
    g.p.lo = 0;
    g.p.hi = (1 << spec.bits) - 1;
    g.scale = m == 0 ? 1.0f : RoundDownToFloat(m / g.p.hi);
    g.p.scale = g.scale;
    return g;
  }
  switch (spec.grid) {
    case Grid::kSym:
      g.scale = m == 0 ? 1.0f : RoundDownToFloat(m / spec.code_max());
      break;
    case Grid::kAsym:
      if (mx == mn) {
        g.scale = 1.0f;
        g.zero = static_cast<float>(-mn) + 0.0f;
      } else {
        g.scale = RoundDownToFloat((mx - mn) / spec.code_max());
        g.zero = static_cast<float>(-mn / g.scale) + 0.0f;
      }
      break;
    case Grid::kMid:
      if (spec.variant == Variant::kDigits && k > 1) {
        g.scale = prev_scale == 0 ? 0.0f : RoundUpToFloat(std::ldexp(double{prev_scale}, -spec.bits));
      } else {
        // Rounded up (exact for float inputs): floor(x/s) then stays below 2^(b-1), no clipping.
        g.scale = m == 0 ? 0.0f : RoundUpToFloat(std::ldexp(m, -(spec.bits - 1)));
      }
      g.skip = g.scale == 0;
      break;
  }
  g.p.scale = g.scale;
  g.p.zero = g.zero;
  return g;
}

QuantizeFn QuantizerOf(const KernelTable& kt, Grid grid) {
  switch (grid) {
    case Grid::kSym: return kt.quantize_sym;
    case Grid::kAsym: return kt.quantize_asym;
    case Grid::kMid: return kt.quantize_mid;
  }
  return kt.quantize_sym;
}

void ToDouble(const KernelTable& kt, DType dtype, const uint8_t* src, int64_t n, double* dst) {
  switch (dtype) {
    case DType::kF32: return kt.f32_to_f64(src, n, dst);
    case DType::kBF16: return kt.bf16_to_f64(src, n, dst);
    case DType::kF16: return kt.f16_to_f64(src, n, dst);
    default: return ConvertToDouble(dtype, src, n, dst);
  }
}

double MaxAbs(const SegmentStats& s) { return std::max(std::fabs(s.min), std::fabs(s.max)); }

// The range of a whole tensor from its rows' statistics (what a tensor scale is computed from).
SegmentStats GlobalRange(absl::Span<const SegmentStats> rows) {
  SegmentStats g{INFINITY, -INFINITY, 0};
  for (const SegmentStats& s : rows) {
    g.min = std::min(g.min, s.min);
    g.max = std::max(g.max, s.max);
  }
  return g;
}

// Values a stored float scale can cover; also keeps sums of squares finite.
bool RowIsFinite(const SegmentStats& s) { return std::isfinite(s.sumsq) && MaxAbs(s) <= FLT_MAX; }

// Per-row results, reduced in row order afterwards so that sums do not depend on threads.
struct RowResults {
  explicit RowResults(int64_t rows, int k) : k(k), sumsq0(rows), max0(rows), bad(rows),
      sumsq(rows * k), max_abs(rows * k), ratio(rows * k), tiny(rows * k), tiny_max(rows * k) {}
  int k;
  std::vector<double> sumsq0, max0;
  std::vector<uint8_t> bad;
  std::vector<double> sumsq, max_abs, ratio;  // [row * k + (term - 1)]
  std::vector<int64_t> tiny;
  std::vector<double> tiny_max;
};

// A nonzero scale below the normal float range: its group leaves the ratio statistics.
bool IsTinyScale(float s) { return s != 0 && s < FLT_MIN; }

// Describes the first non-finite or out-of-range element of row `row`.
absl::Status BadValueError(DType dtype, absl::Span<const uint8_t> data, const TensorLayout& l,
                           int64_t row, bool unsigned_first) {
  std::vector<double> v(l.row_len);
  ConvertToDouble(dtype, data.data() + row * l.row_len * DTypeSize(dtype), l.row_len, v.data());
  for (int64_t i = 0; i < l.row_len; ++i) {
    if (!std::isfinite(v[i]) || std::fabs(v[i]) > FLT_MAX) {
      return absl::InvalidArgumentError(absl::StrCat(
          "value ", v[i], " at flat index ", row * l.row_len + i,
          std::isfinite(v[i]) ? " is beyond the float32 range that scales are stored in"
                              : " is not finite; only finite values can be expanded"));
    }
    if (unsigned_first && v[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "value ", v[i], " at flat index ", row * l.row_len + i,
          " is negative; unsigned_first needs a non-negative tensor"));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "row ", row, " has a sum of squares beyond the double range; values are too large"));
}

void ParallelRows(const ExpandOptions& o, int64_t rows, int64_t row_len,
                  const std::function<void(int64_t, int64_t)>& fn) {
  const int threads = o.pool == nullptr ? 1 : o.pool->size();
  // At least ~64K elements per chunk, and several chunks per thread for balance.
  int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, row_len));
  chunk = std::max<int64_t>(1, std::min(chunk, rows / (threads * 4) + 1));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  auto body = [&](int64_t c) {
    if (o.cancel != nullptr && o.cancel->load(std::memory_order_relaxed)) return;
    fn(c * chunk, std::min(rows, (c + 1) * chunk));
  };
  RunTasks(o.pool, chunks, body);
}

void FinishErrors(TensorExpansion* e, const RowResults& rr, int computed) {
  double s0 = 0, m0 = 0;
  for (size_t r = 0; r < rr.sumsq0.size(); ++r) {
    s0 += rr.sumsq0[r];
    m0 = std::max(m0, rr.max0[r]);
  }
  e->source_fro = std::sqrt(s0);
  e->source_max_abs = m0;
  for (int k = 1; k <= computed; ++k) {
    TermError t;
    t.k = k;
    double sq = 0;
    for (size_t r = 0; r < rr.sumsq0.size(); ++r) {
      const size_t i = r * rr.k + (k - 1);
      sq += rr.sumsq[i];
      t.max_abs = std::max(t.max_abs, rr.max_abs[i]);
      t.worst_ratio = std::max(t.worst_ratio, rr.ratio[i]);
      t.tiny_groups += rr.tiny[i];
      t.tiny_max_abs = std::max(t.tiny_max_abs, rr.tiny_max[i]);
    }
    t.rel_fro = s0 > 0 ? std::sqrt(sq / s0) : 0;
    t.rel_max = m0 > 0 ? t.max_abs / m0 : 0;
    t.sqnr_db = sq > 0 ? 10 * std::log10(s0 / sq) : INFINITY;
    e->errors.push_back(t);
  }
}

// Number of terms to keep: spec.terms, or the first k that meets the eps stop.
int TermsToKeep(const ExpansionSpec& spec, const std::vector<TermError>& errors) {
  if (spec.eps > 0) {
    for (const TermError& t : errors) {
      if (t.worst_ratio <= spec.eps || t.max_abs == 0) return t.k;
    }
  }
  return static_cast<int>(errors.size());
}

// Channel and group scales: every row is independent and runs all K terms while in cache.
absl::Status ExpandByRows(DType dtype, absl::Span<const uint8_t> data, const ExpandOptions& o,
                          const KernelTable& kt, TensorExpansion* e) {
  const ExpansionSpec& spec = e->spec;
  const TensorLayout& l = e->layout;
  const int K = spec.terms;
  const int64_t gpr = l.groups_per_row;
  const QuantizeFn quantize = QuantizerOf(kt, spec.grid);
  RowResults rr(l.rows, K);
  const int isize = DTypeSize(dtype);

  ParallelRows(o, l.rows, l.row_len, [&](int64_t row_begin, int64_t row_end) {
    std::vector<double> r(l.row_len);
    std::vector<uint8_t> codes(l.row_len);
    std::vector<SegmentStats> st(gpr);
    std::vector<double> m0(gpr);
    std::vector<float> prev(gpr);
    for (int64_t row = row_begin; row < row_end; ++row) {
      ToDouble(kt, dtype, data.data() + row * l.row_len * isize, l.row_len, r.data());
      double sq0 = 0, mx0 = 0;
      bool bad = false;
      for (int64_t g = 0; g < gpr; ++g) {
        const int64_t b = g * l.group_len, n = std::min(l.group_len, l.row_len - b);
        kt.stats(r.data() + b, n, &st[g]);
        bad |= !RowIsFinite(st[g]) || (spec.unsigned_first && st[g].min < 0);
        m0[g] = MaxAbs(st[g]);
        sq0 += st[g].sumsq;
        mx0 = std::max(mx0, m0[g]);
      }
      rr.sumsq0[row] = sq0;
      rr.max0[row] = mx0;
      if (bad) {
        rr.bad[row] = 1;
        continue;
      }
      for (int k = 1; k <= K; ++k) {
        TermData& term = e->terms[k - 1];
        double sq = 0, mx = 0, ratio = 0, tiny_max = 0;
        int64_t tiny = 0;
        for (int64_t g = 0; g < gpr; ++g) {
          const int64_t b = g * l.group_len, n = std::min(l.group_len, l.row_len - b);
          const GroupParams gp = ParamsFor(spec, st[g], prev[g], k);
          prev[g] = gp.scale;
          term.scale[row * gpr + g] = gp.scale;
          if (spec.grid == Grid::kAsym) term.zero[row * gpr + g] = gp.zero;
          if (gp.skip) {
            std::memset(codes.data() + b, 0, static_cast<size_t>(n));
          } else {
            quantize(gp.p, r.data() + b, codes.data() + b, n, &st[g]);
          }
          const double gm = MaxAbs(st[g]);
          sq += st[g].sumsq;
          mx = std::max(mx, gm);
          if (IsTinyScale(gp.scale) || (m0[g] > 0 && m0[g] < FLT_MIN)) {
            ++tiny;
            tiny_max = std::max(tiny_max, gm);
          } else if (m0[g] > 0) {
            ratio = std::max(ratio, gm / m0[g]);
          }
        }
        kt.pack(codes.data(), l.row_len, spec.bits, term.codes.data() + row * l.packed_row_bytes);
        const size_t i = row * K + (k - 1);
        rr.sumsq[i] = sq;
        rr.max_abs[i] = mx;
        rr.ratio[i] = ratio;
        rr.tiny[i] = tiny;
        rr.tiny_max[i] = tiny_max;
      }
    }
  });
  if (o.cancel != nullptr && o.cancel->load()) return absl::CancelledError("expansion cancelled");
  for (int64_t row = 0; row < l.rows; ++row) {
    if (rr.bad[row]) return BadValueError(dtype, data, l, row, spec.unsigned_first);
  }
  FinishErrors(e, rr, K);
  return absl::OkStatus();
}

// Tensor scale: one scale per term needs the whole residual, so it is kept in memory (fp64).
absl::Status ExpandWholeTensor(DType dtype, absl::Span<const uint8_t> data, const ExpandOptions& o,
                               const KernelTable& kt, TensorExpansion* e) {
  const ExpansionSpec& spec = e->spec;
  const TensorLayout& l = e->layout;
  const int K = spec.terms;
  const QuantizeFn quantize = QuantizerOf(kt, spec.grid);
  RowResults rr(l.rows, K);
  std::vector<SegmentStats> row_stats(l.rows);
  std::vector<double> r(l.numel());
  const int isize = DTypeSize(dtype);

  ParallelRows(o, l.rows, l.row_len, [&](int64_t b, int64_t end) {
    for (int64_t row = b; row < end; ++row) {
      double* rp = r.data() + row * l.row_len;
      ToDouble(kt, dtype, data.data() + row * l.row_len * isize, l.row_len, rp);
      kt.stats(rp, l.row_len, &row_stats[row]);
      rr.bad[row] = !RowIsFinite(row_stats[row]) || (spec.unsigned_first && row_stats[row].min < 0);
      rr.sumsq0[row] = row_stats[row].sumsq;
      rr.max0[row] = MaxAbs(row_stats[row]);
    }
  });
  if (o.cancel != nullptr && o.cancel->load()) return absl::CancelledError("expansion cancelled");
  for (int64_t row = 0; row < l.rows; ++row) {
    if (rr.bad[row]) return BadValueError(dtype, data, l, row, spec.unsigned_first);
  }
  const double m0 = MaxAbs(GlobalRange(row_stats));
  float prev = 0;
  int computed = 0;
  for (int k = 1; k <= K; ++k) {
    const GroupParams gp = ParamsFor(spec, GlobalRange(row_stats), prev, k);
    prev = gp.scale;
    TermData& term = e->terms[k - 1];
    term.scale[0] = gp.scale;
    if (spec.grid == Grid::kAsym) term.zero[0] = gp.zero;
    ParallelRows(o, l.rows, l.row_len, [&](int64_t b, int64_t end) {
      std::vector<uint8_t> codes(l.row_len);
      for (int64_t row = b; row < end; ++row) {
        double* rp = r.data() + row * l.row_len;
        if (gp.skip) {
          std::memset(codes.data(), 0, codes.size());
        } else {
          quantize(gp.p, rp, codes.data(), l.row_len, &row_stats[row]);
        }
        kt.pack(codes.data(), l.row_len, spec.bits, term.codes.data() + row * l.packed_row_bytes);
        const size_t i = row * K + (k - 1);
        rr.sumsq[i] = row_stats[row].sumsq;
        rr.max_abs[i] = MaxAbs(row_stats[row]);
        if (IsTinyScale(gp.scale) || (m0 > 0 && m0 < FLT_MIN)) {
          rr.tiny[i] = 1;
          rr.tiny_max[i] = rr.max_abs[i];
        } else {
          rr.ratio[i] = m0 > 0 ? rr.max_abs[i] / m0 : 0;
        }
      }
    });
    if (o.cancel != nullptr && o.cancel->load()) return absl::CancelledError("expansion cancelled");
    computed = k;
    if (spec.eps > 0) {
      const double mk = MaxAbs(GlobalRange(row_stats));
      if (mk == 0 || mk <= spec.eps * m0 || IsTinyScale(gp.scale)) break;
    }
  }
  FinishErrors(e, rr, computed);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TensorLayout> TensorLayout::Make(absl::Span<const int64_t> shape,
                                                const ExpansionSpec& spec) {
  if (shape.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat("shape [", absl::StrJoin(shape, ","),
                                                   "] has rank ", shape.size(),
                                                   "; expansion needs rank >= 2"));
  }
  TensorLayout l;
  l.shape.assign(shape.begin(), shape.end());
  l.rows = shape[0];
  l.row_len = 1;
  for (size_t i = 1; i < shape.size(); ++i) {
    if (shape[i] < 0 || (shape[i] > 0 && l.row_len > kMaxElements / shape[i])) {
      return absl::InvalidArgumentError("shape is too large to expand (more than 2^40 elements)");
    }
    l.row_len *= shape[i];
  }
  if (l.rows <= 0 || l.row_len <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape [", absl::StrJoin(shape, ","), "] has no elements"));
  }
  if (l.rows > kMaxElements / l.row_len) {
    return absl::InvalidArgumentError("shape is too large to expand (more than 2^40 elements)");
  }
  if (spec.scale == ScaleGranularity::kGroup) {
    l.group_len = std::min(spec.group_size, l.row_len);
    l.groups_per_row = (l.row_len + l.group_len - 1) / l.group_len;
  } else {
    l.group_len = l.row_len;
    l.groups_per_row = 1;
  }
  l.packed_row_bytes = PackedRowBytes(l.row_len, spec.bits);
  return l;
}

int64_t TensorLayout::num_scales(const ExpansionSpec& spec) const {
  switch (spec.scale) {
    case ScaleGranularity::kTensor: return 1;
    case ScaleGranularity::kChannel: return rows;
    case ScaleGranularity::kGroup: return rows * groups_per_row;
  }
  return 1;
}

std::vector<int64_t> TensorLayout::scale_shape(const ExpansionSpec& spec) const {
  switch (spec.scale) {
    case ScaleGranularity::kTensor: return {1, 1};
    case ScaleGranularity::kChannel: return {rows, 1};
    case ScaleGranularity::kGroup: return {rows, groups_per_row};
  }
  return {1, 1};
}

absl::StatusOr<TensorExpansion> ExpandTensor(DType dtype, absl::Span<const int64_t> shape,
                                             absl::Span<const uint8_t> data,
                                             const ExpansionSpec& spec,
                                             const ExpandOptions& options) {
  FPX_RETURN_IF_ERROR(spec.Validate());
  if (!IsFloating(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("dtype ", DTypeName(dtype),
                                                   " cannot be expanded; accepted F16, BF16, F32, F64"));
  }
  TensorExpansion e;
  e.spec = spec;
  FPX_ASSIGN_OR_RETURN(e.layout, TensorLayout::Make(shape, spec));
  const TensorLayout& l = e.layout;
  if (data.size() != static_cast<uint64_t>(l.numel()) * DTypeSize(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("data holds ", data.size(), " bytes; shape needs ",
                                                   l.numel() * DTypeSize(dtype)));
  }
  const KernelTable& kt = options.kernels != nullptr ? *options.kernels : ActiveKernels();
  e.terms.resize(spec.terms);
  for (TermData& t : e.terms) {
    t.codes.resize(l.rows * l.packed_row_bytes);  // every byte is written below
    t.scale.assign(l.num_scales(spec), 0.0f);
    if (spec.grid == Grid::kAsym) t.zero.assign(l.num_scales(spec), 0.0f);
  }
  if (spec.scale == ScaleGranularity::kTensor) {
    FPX_RETURN_IF_ERROR(ExpandWholeTensor(dtype, data, options, kt, &e));
  } else {
    FPX_RETURN_IF_ERROR(ExpandByRows(dtype, data, options, kt, &e));
  }
  const int keep = TermsToKeep(spec, e.errors);
  e.terms.resize(keep);
  e.errors.resize(keep);
  return e;
}

absl::StatusOr<TensorExpansion> ExpandTensor(absl::Span<const double> values,
                                             absl::Span<const int64_t> shape,
                                             const ExpansionSpec& spec,
                                             const ExpandOptions& options) {
  return ExpandTensor(
      DType::kF64, shape,
      absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(values.data()), values.size() * 8), spec,
      options);
}

void AccumulateTerm(const ExpansionSpec& spec, const TensorLayout& l, const TermData& term, int k,
                    double* acc) {
  AccumulateTermRows(spec, l, term, k, 0, l.rows, acc);
}

void AccumulateTermRows(const ExpansionSpec& spec, const TensorLayout& l, const TermData& term,
                        int k, int64_t row_begin, int64_t row_end, double* acc) {
  std::vector<int32_t> q(l.row_len);
  const int64_t gpr = l.groups_per_row;
  for (int64_t row = row_begin; row < row_end; ++row) {
    UnpackCodes(term.codes.data() + row * l.packed_row_bytes, l.row_len, spec.bits,
                !spec.term_is_unsigned(k), q.data());
    double* out = acc + row * l.row_len;
    for (int64_t i = 0; i < l.row_len; ++i) {
      const int64_t si = spec.scale == ScaleGranularity::kTensor ? 0 : row * gpr + i / l.group_len;
      const double s = term.scale[si];
      const double c = q[i];
      double d;
      switch (spec.grid) {
        case Grid::kSym: d = c * s; break;
        case Grid::kAsym: d = s * (c - static_cast<double>(term.zero[si])); break;
        default: d = (c + 0.5) * s; break;
      }
      out[i] += d;
    }
  }
}

std::vector<double> Reconstruct(const TensorExpansion& e, int num_terms, ThreadPool* pool) {
  std::vector<double> acc(e.layout.numel(), 0.0);
  const int K = std::min(num_terms, static_cast<int>(e.terms.size()));
  ExpandOptions o;
  o.pool = pool;
  // Every row sums its terms in order k = 1, 2, ...: the same result for any split.
  ParallelRows(o, e.layout.rows, e.layout.row_len, [&](int64_t b, int64_t end) {
    for (int k = 0; k < K; ++k) {
      AccumulateTermRows(e.spec, e.layout, e.terms[k], k + 1, b, end, acc.data());
    }
  });
  return acc;
}

namespace {

// Term k of one row: quantizes the residual r in place (updating its statistics), adds the
// dequantized values to acc (which term 1 starts from 0.0, as Reconstruct's accumulator does;
// nullptr: not wanted) and writes term k alone to term_out (nullptr: not wanted).
// Cloned per ISA so that the byte-to-double loops vectorize (the core is built without FMA
// contraction, so every clone computes the same bits).
FPXINT_ISA_CLONES void TermRow(const ExpansionSpec& spec, QuantizeFn quantize, const GroupParams& gp, int k,
             double* r, uint8_t* codes, int64_t n, SegmentStats* st, double* acc,
             float* term_out) {
  if (gp.skip) {
    std::memset(codes, 0, static_cast<size_t>(n));
  } else {
    quantize(gp.p, r, codes, n, st);
  }
  const bool is_unsigned = spec.term_is_unsigned(k);
  const double s = gp.scale, z = gp.zero;
  // Each code's dequantized value exactly as AccumulateTermRows computes it, with the grid and
  // signedness outside the loops so that they vectorize (the dynamic activation expansion of W×A
  // serving runs this on every input).
  auto rows = [&](auto grid, auto is_u) {
    constexpr Grid G = decltype(grid)::value;
    constexpr bool U = decltype(is_u)::value;
    auto deq = [=](uint8_t code) {  // implicit: z only where the grid reads it
      const double c =
          U ? static_cast<double>(code) : static_cast<double>(static_cast<int8_t>(code));
      if constexpr (G == Grid::kSym) return c * s;
      if constexpr (G == Grid::kAsym) return s * (c - z);
      return (c + 0.5) * s;
    };
    if (acc != nullptr && k == 1) {
      for (int64_t i = 0; i < n; ++i) acc[i] = 0.0 + deq(codes[i]);
    } else if (acc != nullptr) {
      for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + deq(codes[i]);
    }
    if (term_out != nullptr) {
      for (int64_t i = 0; i < n; ++i) term_out[i] = static_cast<float>(0.0 + deq(codes[i]));
    }
  };
  using Sym = std::integral_constant<Grid, Grid::kSym>;
  using Asym = std::integral_constant<Grid, Grid::kAsym>;
  using Mid = std::integral_constant<Grid, Grid::kMid>;
  using U = std::true_type;
  using S = std::false_type;
  switch (spec.grid) {
    case Grid::kSym:
      return is_unsigned ? rows(Sym{}, U{}) : rows(Sym{}, S{});
    case Grid::kAsym:
      return is_unsigned ? rows(Asym{}, U{}) : rows(Asym{}, S{});
    default:
      return is_unsigned ? rows(Mid{}, U{}) : rows(Mid{}, S{});
  }
}

bool BadRow(const ExpansionSpec& spec, const SegmentStats& st) {
  return !RowIsFinite(st) || (spec.unsigned_first && st.min < 0);
}

// A row had a bad value: ExpandTensor on the same input fails with the message that names it.
absl::Status RejectedRowError(const float* x, int64_t rows, int64_t cols,
                              const ExpansionSpec& spec, const ExpandOptions& o) {
  absl::StatusOr<TensorExpansion> e =
      ExpandTensor(DType::kF32, {rows, cols},
                   absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(x),
                                       static_cast<size_t>(rows * cols) * sizeof(float)),
                   spec, o);
  return e.ok() ? absl::InternalError("a row was rejected, the tensor not") : e.status();
}

// Variant D on the mid grid with one scale per row: every term's scale follows from the row's
// largest |x| (ParamsFor), so every kernel table's fused digits kernel runs all terms in one pass.
bool FusedDigits(const ExpansionSpec& spec) {
  return spec.grid == Grid::kMid && spec.variant == Variant::kDigits && !spec.unsigned_first &&
         spec.scale == ScaleGranularity::kChannel;
}

ExpansionSpec RowDigitsSpec(int bits, int terms) {
  ExpansionSpec spec;
  spec.bits = bits;
  spec.terms = terms;
  spec.grid = Grid::kMid;
  spec.variant = Variant::kDigits;
  spec.scale = ScaleGranularity::kChannel;
  return spec;
}

// One row of n values through the fused digits kernel, outputs as DigitsRowFn's (sum, folded
// with fold_shift and *folded_sum; each optional) and the row's term-K scale in *last_scale
// (optional). A row of zeros has scales 0 and every code 0. False, with nothing written, when
// the row holds a NaN or an infinity (BadRow's verdict on its statistics).
bool DigitsRow(const ExpansionSpec& spec, const KernelTable& kt, const float* x, int64_t n,
               int32_t fold_shift, float* sum, uint8_t* folded, int64_t* folded_sum,
               float* last_scale) {
  float m = 0;
  if (!kt.f32_abs_max(x, n, &m)) return false;
  SegmentStats st;  // the mid grid's first scale reads max(|min|, |max|) alone
  st.max = m;
  double s[kMaxTerms];
  DigitsParams p;
  float prev = 0;
  for (int k = 1; k <= spec.terms; ++k) {
    const GroupParams gp = ParamsFor(spec, st, prev, k);
    prev = gp.scale;
    s[k - 1] = gp.scale;
    p.lo = gp.p.lo;
    p.hi = gp.p.hi;
  }
  if (last_scale != nullptr) *last_scale = prev;
  if (s[0] == 0) {
    if (sum != nullptr) std::fill(sum, sum + n, 0.0f);
    if (folded != nullptr) {
      std::memset(folded, fold_shift, static_cast<size_t>(n));
      *folded_sum = int64_t{fold_shift} * n;
    }
    return true;
  }
  p.scale = s;
  p.terms = spec.terms;
  p.bits = spec.bits;
  p.fold_shift = fold_shift;
  kt.digits_mid(x, n, p, sum, nullptr, folded, folded_sum);
  return true;
}

}  // namespace

absl::Status ExpandReconstructF32(const float* x, int64_t rows, int64_t cols,
                                  const ExpansionSpec& spec, const ExpandOptions& o,
                                  float* sum_out, absl::Span<float* const> term_out,
                                  int64_t blocks) {
  FPX_RETURN_IF_ERROR(spec.Validate());
  if (blocks < 1 || rows % blocks != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExpandReconstructF32: ", blocks, " blocks do not divide ", rows, " rows"));
  }
  if (spec.eps != 0 ||
      (spec.scale != ScaleGranularity::kTensor && spec.scale != ScaleGranularity::kChannel)) {
    return absl::InvalidArgumentError(
        "ExpandReconstructF32: needs tensor or channel scales and no eps stop");
  }
  const int K = spec.terms;
  if (!term_out.empty() && static_cast<int>(term_out.size()) != K) {
    return absl::InvalidArgumentError(absl::StrCat("ExpandReconstructF32: ", term_out.size(),
                                                   " term outputs for ", K, " terms"));
  }
  const std::vector<int64_t> shape = {rows, cols};
  FPX_ASSIGN_OR_RETURN(const TensorLayout l, TensorLayout::Make(shape, spec));
  if (l.groups_per_row != 1 || l.row_len != cols) {
    return absl::InternalError("ExpandReconstructF32: unexpected layout");
  }
  const KernelTable& kt = o.kernels != nullptr ? *o.kernels : ActiveKernels();
  const QuantizeFn quantize = QuantizerOf(kt, spec.grid);
  const auto row_bytes = [&](int64_t row) {
    return reinterpret_cast<const uint8_t*>(x + row * cols);
  };
  auto term_row = [&](int k, int64_t row) {
    return term_out.empty() ? nullptr : term_out[k - 1] + row * cols;
  };
  std::vector<uint8_t> bad(static_cast<size_t>(rows), 0);
  auto bad_value_error = [&] { return RejectedRowError(x, rows, cols, spec, o); };
  auto cancelled = [&] { return o.cancel != nullptr && o.cancel->load(); };

  if (term_out.empty() && sum_out != nullptr && FusedDigits(spec)) {
    // Every row in one pass of the fused digits kernel.
    ParallelRows(o, rows, cols, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t row = row_begin; row < row_end; ++row) {
        if (!DigitsRow(spec, kt, x + row * cols, cols, 0, sum_out + row * cols, nullptr, nullptr,
                       nullptr)) {
          bad[static_cast<size_t>(row)] = 1;
        }
      }
    });
    if (cancelled()) return absl::CancelledError("expansion cancelled");
    for (uint8_t b : bad) {
      if (b) return bad_value_error();
    }
    return absl::OkStatus();
  }
  if (spec.scale == ScaleGranularity::kChannel) {
    // Every row on its own: its K terms run while it is in cache.
    ParallelRows(o, rows, cols, [&](int64_t row_begin, int64_t row_end) {
      std::vector<double> r(static_cast<size_t>(cols)), acc(static_cast<size_t>(cols));
      std::vector<uint8_t> codes(static_cast<size_t>(cols));
      for (int64_t row = row_begin; row < row_end; ++row) {
        kt.f32_to_f64(row_bytes(row), cols, r.data());
        SegmentStats st;
        kt.stats(r.data(), cols, &st);
        if (BadRow(spec, st)) {
          bad[static_cast<size_t>(row)] = 1;
          continue;
        }
        float prev = 0;
        for (int k = 1; k <= K; ++k) {
          const GroupParams gp = ParamsFor(spec, st, prev, k);
          prev = gp.scale;
          TermRow(spec, quantize, gp, k, r.data(), codes.data(), cols, &st, acc.data(),
                  term_row(k, row));
        }
        if (sum_out != nullptr) {
          float* out = sum_out + row * cols;
          for (int64_t i = 0; i < cols; ++i) out[i] = static_cast<float>(acc[i]);
        }
      }
    });
    if (cancelled()) return absl::CancelledError("expansion cancelled");
    for (uint8_t b : bad) {
      if (b) return bad_value_error();
    }
    return absl::OkStatus();
  }

  // One scale per term for the whole tensor: term k's scale needs the global range of the
  // residual the first k-1 terms leave. Pass 0 takes the range of x; pass k < K runs terms 1..k
  // on every row for the range after term k; pass K runs all K terms and writes the outputs.
  // Each pass recomputes its rows' residuals from x, in a row-sized buffer that stays in cache,
  // instead of keeping the whole tensor's fp64 residual and sum in memory between the terms:
  // K(K+1)/2 term quantizations instead of K, but only x and the outputs cross the memory bus.
  // Every row runs the same kernels on the same values, so the bits are those of ExpandTensor.
  // Each block of rows_per_block rows has its own scales (params[block][k - 1]).
  const int64_t rows_per_block = rows / blocks;
  std::vector<SegmentStats> row_stats(static_cast<size_t>(rows));
  std::vector<std::vector<GroupParams>> params(static_cast<size_t>(blocks));
  std::vector<float> prev(static_cast<size_t>(blocks), 0.0f);
  for (int pass = 0; pass <= K; ++pass) {
    ParallelRows(o, rows, cols, [&](int64_t b, int64_t end) {
      std::vector<double> r(static_cast<size_t>(cols));
      std::vector<double> acc(pass == K && sum_out != nullptr ? static_cast<size_t>(cols) : 0);
      std::vector<uint8_t> codes(static_cast<size_t>(cols));
      for (int64_t row = b; row < end; ++row) {
        SegmentStats& rs = row_stats[static_cast<size_t>(row)];
        kt.f32_to_f64(row_bytes(row), cols, r.data());
        if (pass == 0) {
          kt.stats(r.data(), cols, &rs);
          bad[static_cast<size_t>(row)] = BadRow(spec, rs);
          continue;
        }
        const std::vector<GroupParams>& gp = params[static_cast<size_t>(row / rows_per_block)];
        SegmentStats scratch;
        for (int k = 1; k <= pass; ++k) {
          const bool out = pass == K;
          TermRow(spec, quantize, gp[static_cast<size_t>(k - 1)], k, r.data(), codes.data(), cols,
                  k == pass && !out ? &rs : &scratch, out && !acc.empty() ? acc.data() : nullptr,
                  out ? term_row(k, row) : nullptr);
        }
        if (pass == K && sum_out != nullptr) {
          float* out = sum_out + row * cols;
          for (int64_t i = 0; i < cols; ++i) out[i] = static_cast<float>(acc[i]);
        }
      }
    });
    if (cancelled()) return absl::CancelledError("expansion cancelled");
    if (pass == 0) {
      for (uint8_t b : bad) {
        if (b) return bad_value_error();
      }
    }
    if (pass == K) break;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const SegmentStats range = GlobalRange(absl::MakeConstSpan(row_stats).subspan(
          static_cast<size_t>(blk * rows_per_block), static_cast<size_t>(rows_per_block)));
      params[static_cast<size_t>(blk)].push_back(
          ParamsFor(spec, range, prev[static_cast<size_t>(blk)], pass + 1));
      prev[static_cast<size_t>(blk)] = params[static_cast<size_t>(blk)].back().scale;
    }
  }
  return absl::OkStatus();
}

absl::Status ExpandRowCodesF32(const float* x, int64_t rows, int64_t cols,
                               const ExpansionSpec& spec, const ExpandOptions& o,
                               const RowCodesFn& emit) {
  FPX_RETURN_IF_ERROR(spec.Validate());
  if (spec.eps != 0 || spec.scale != ScaleGranularity::kChannel) {
    return absl::InvalidArgumentError("ExpandRowCodesF32: needs channel scales and no eps stop");
  }
  FPX_ASSIGN_OR_RETURN(const TensorLayout l, TensorLayout::Make({rows, cols}, spec));
  if (l.groups_per_row != 1 || l.row_len != cols) {
    return absl::InternalError("ExpandRowCodesF32: unexpected layout");
  }
  const int K = spec.terms;
  const KernelTable& kt = o.kernels != nullptr ? *o.kernels : ActiveKernels();
  const QuantizeFn quantize = QuantizerOf(kt, spec.grid);
  std::atomic<bool> bad{false};
  ParallelRows(o, rows, cols, [&](int64_t row_begin, int64_t row_end) {
    std::vector<double> r(static_cast<size_t>(cols));
    std::vector<uint8_t> codes(static_cast<size_t>(K * cols));
    std::vector<const uint8_t*> term(static_cast<size_t>(K));
    std::vector<float> scales(static_cast<size_t>(K));
    for (int k = 0; k < K; ++k) term[static_cast<size_t>(k)] = codes.data() + k * cols;
    for (int64_t row = row_begin; row < row_end; ++row) {
      kt.f32_to_f64(reinterpret_cast<const uint8_t*>(x + row * cols), cols, r.data());
      SegmentStats st;
      kt.stats(r.data(), cols, &st);
      if (BadRow(spec, st)) {
        bad.store(true, std::memory_order_relaxed);
        continue;
      }
      float prev = 0;
      for (int k = 1; k <= K; ++k) {
        const GroupParams gp = ParamsFor(spec, st, prev, k);
        prev = scales[static_cast<size_t>(k - 1)] = gp.scale;
        uint8_t* c = codes.data() + (k - 1) * cols;
        if (gp.skip) {
          std::memset(c, 0, static_cast<size_t>(cols));
        } else {
          quantize(gp.p, r.data(), c, cols, &st);
        }
      }
      emit(row, term.data(), scales.data());
    }
  });
  if (o.cancel != nullptr && o.cancel->load()) return absl::CancelledError("expansion cancelled");
  if (bad.load()) return RejectedRowError(x, rows, cols, spec, o);
  return absl::OkStatus();
}

bool ExpandDigitsRowF32(const float* x, int64_t n, int bits, int terms, float* out,
                        const KernelTable* kernels) {
  const KernelTable& kt = kernels != nullptr ? *kernels : ActiveKernels();
  return DigitsRow(RowDigitsSpec(bits, terms), kt, x, n, 0, out, nullptr, nullptr, nullptr);
}

absl::Status ExpandRowFoldedF32(const float* x, int64_t rows, int64_t cols, int bits, int terms,
                                const ExpandOptions& o, uint8_t* folded, int64_t ld,
                                int64_t* folded_sum, float* last_scale) {
  const ExpansionSpec spec = RowDigitsSpec(bits, terms);
  FPX_RETURN_IF_ERROR(spec.Validate());
  if (bits * terms > 8 || ld < cols) {
    return absl::InvalidArgumentError(absl::StrCat("ExpandRowFoldedF32: ", terms, " terms of ",
                                                   bits, " bits (at most 8 in all), ld ", ld,
                                                   " for ", cols, " columns"));
  }
  const KernelTable& kt = o.kernels != nullptr ? *o.kernels : ActiveKernels();
  // U = Σ_k 2^{b(K−k)}·C_k + 2^{b−1}·Σ_k 2^{b(K−k)}: every digit shifted from [−2^{b−1}, 2^{b−1})
  // to [0, 2^b).
  int32_t shift = 0;
  for (int k = 0; k < terms; ++k) shift = (shift << bits) + (1 << (bits - 1));
  std::atomic<bool> bad{false};
  ParallelRows(o, rows, cols, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      if (!DigitsRow(spec, kt, x + row * cols, cols, shift, nullptr, folded + row * ld,
                     folded_sum + row, last_scale + row)) {
        bad.store(true, std::memory_order_relaxed);
      }
    }
  });
  if (o.cancel != nullptr && o.cancel->load()) return absl::CancelledError("expansion cancelled");
  if (bad.load()) return RejectedRowError(x, rows, cols, spec, o);
  return absl::OkStatus();
}

}  // namespace fpxint::core
