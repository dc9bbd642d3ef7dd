// File: core/expansion.h
//
// FP=xINT tensor expansion (docs/ALGORITHM.md §2): W = Σ_{k=1..K} s_k·(C_k − z_k) + R_K, each
// term quantizing the residual the previous terms left.
//
// A tensor of rank ≥ 2 is viewed as a matrix: rows = dim 0 (output channels), row_len = the
// product of the other dims. Scales are per tensor, per row, or per group of g consecutive
// elements of a row (the last group of a row may be shorter).
//
// Numerics (documented choice): residuals are kept in fp64. The input (F16/BF16/F32/F64) converts
// to fp64 exactly, and every dequantized term s·C is exact in fp64 for sym and mid, so the
// residual is the exact difference for fp32 inputs until it falls below 2^-53 of the input. Scales
// are stored as F32: sym and asym round the exact scale down to a float (every error then stays
// within s/2 <= m·r and no code clips), mid rounds up (exact for float inputs). The same float
// scale is used for quantizing and for reconstruction, so a reader of the artifact reproduces the
// in-memory result bit for bit.
//
// Hard bound (docs/ALGORITHM.md §7, C2): for sym and asym, max|R_k| <= m·r^k in every group. For
// mid the float scale is rounded up, so the bound carries a factor (1 + 2^-24) per term whenever a
// group max is not itself a float (fp64 inputs, or residuals of later terms).
//
// Zero groups: sym/asym use s = 1, C = 0 (value 0). mid uses s = 0, C = 0 (value 0); with s = 1
// the mid-rise grid could not represent 0 (its levels are ±s/2, ...).
//
// Deterministic: the same input and spec give identical codes and scales for any thread count and
// any kernel variant. No data other than the tensor itself is read (no calibration).
#ifndef FPXINT_CORE_EXPANSION_H_
#define FPXINT_CORE_EXPANSION_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/dtype.h"
#include "core/kernels.h"
#include "core/quant_spec.h"
#include "core/thread_pool.h"

namespace fpxint::core {

// How a tensor of a given shape is cut into rows and scale groups.
struct TensorLayout {
  std::vector<int64_t> shape;
  int64_t rows = 0;            // dim 0
  int64_t row_len = 0;         // product of the other dims
  int64_t group_len = 0;       // elements per scale group within a row (tensor: row_len)
  int64_t groups_per_row = 0;  // 1 for tensor and channel
  int64_t packed_row_bytes = 0;

  // InvalidArgument for rank < 2, an empty tensor, or more than 2^40 elements.
  static absl::StatusOr<TensorLayout> Make(absl::Span<const int64_t> shape,
                                           const ExpansionSpec& spec);
  int64_t numel() const { return rows * row_len; }
  // Number of stored scales: 1 (tensor), rows (channel), rows*groups_per_row (group).
  int64_t num_scales(const ExpansionSpec& spec) const;
  // Shape of the stored scale tensor: [1,1], [rows,1] or [rows, groups_per_row].
  std::vector<int64_t> scale_shape(const ExpansionSpec& spec) const;
};

// A byte vector whose resize() leaves new bytes uninitialized: code buffers are written in full
// by the (parallel) expansion, so zero-filling them first would be a serial pass for nothing.
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using CodeBuffer = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;

// One term k: packed codes (rows × packed_row_bytes), scales, and zero points (asym only).
struct TermData {
  CodeBuffer codes;
  std::vector<float> scale;
  std::vector<float> zero;
};

// Error of the partial sum Σ_{j≤k} against the source tensor W.
struct TermError {
  int k = 0;
  double rel_fro = 0;      // ‖R_k‖_F / ‖W‖_F (0 when W = 0)
  double rel_max = 0;      // max|R_k| / max|W|
  double sqnr_db = 0;      // 10·log10(‖W‖² / ‖R_k‖²); +inf when R_k = 0
  double max_abs = 0;      // max|R_k|
  double worst_ratio = 0;  // max over groups of max|R_k,g| / m_g: what eps is tested against
  // Groups whose term-k scale fell below FLT_MIN (2^-126): float32 cannot hold such a scale
  // precisely, so they are left out of worst_ratio and count as converged for eps. Real weights
  // do have them (dead channels of subnormal values). tiny_max_abs is their largest residual.
  int64_t tiny_groups = 0;
  double tiny_max_abs = 0;
};

struct TensorExpansion {
  ExpansionSpec spec;
  TensorLayout layout;
  std::vector<TermData> terms;  // terms.size() ≤ spec.terms (fewer after an eps stop)
  std::vector<TermError> errors;
  double source_fro = 0;      // ‖W‖_F
  double source_max_abs = 0;  // max|W|
};

struct ExpandOptions {
  const KernelTable* kernels = nullptr;  // nullptr: ActiveKernels()
  ThreadPool* pool = nullptr;            // nullptr: run on the calling thread
  const std::atomic<bool>* cancel = nullptr;  // polled between rows: returns Cancelled
};

// Expands a tensor given as raw little-endian bytes of a floating dtype.
// InvalidArgument: bad spec, non-floating dtype, rank < 2, size mismatch, a NaN/Inf value or a
// magnitude beyond the float32 range the scales are stored in (the message gives the index).
absl::StatusOr<TensorExpansion> ExpandTensor(DType dtype, absl::Span<const int64_t> shape,
                                             absl::Span<const uint8_t> data,
                                             const ExpansionSpec& spec,
                                             const ExpandOptions& options = {});

// Convenience for callers holding doubles.
absl::StatusOr<TensorExpansion> ExpandTensor(absl::Span<const double> values,
                                             absl::Span<const int64_t> shape,
                                             const ExpansionSpec& spec,
                                             const ExpandOptions& options = {});

// Adds the dequantized term `term`, which is term k (1-based), to acc[0..numel).
void AccumulateTerm(const ExpansionSpec& spec, const TensorLayout& layout, const TermData& term,
                    int k, double* acc);
// Rows [row_begin, row_end) only (acc still indexes the whole tensor).
void AccumulateTermRows(const ExpansionSpec& spec, const TensorLayout& layout, const TermData& term,
                        int k, int64_t row_begin, int64_t row_end, double* acc);
// Σ_{k=1..num_terms} of the dequantized terms, summed in order k = 1, 2, ... in fp64 (rows split
// over `pool` when given; the same bits either way).
// REQUIRES: num_terms ≤ e.terms.size().
std::vector<double> Reconstruct(const TensorExpansion& e, int num_terms,
                                ThreadPool* pool = nullptr);

// Dynamic activation expansion at inference: the float32 values of the expansion of x (rows ×
// cols, float32) without keeping its codes. `sum_out` (rows × cols, or nullptr) receives
// Σ_{k=1..K} of the dequantized terms and `term_out[k-1]` (each rows × cols, or an empty span)
// term k alone, bit for bit what Reconstruct / AccumulateTerm give after ExpandTensor with the same
// spec, shape {rows, cols} and kernels; but codes are neither packed nor unpacked and no error
// statistics are kept, and every row's K terms run while the row is in cache.
// spec.scale must be kTensor or kChannel (one scale per row) and spec.eps 0. Errors as
// ExpandTensor's (the same messages). With kTensor, `blocks` splits the rows into that many
// equal consecutive blocks, each expanded with scales of its own: the bits of one call per block
// (the samples of a batch), in one pass over the pool. REQUIRES: blocks divides rows.
absl::Status ExpandReconstructF32(const float* x, int64_t rows, int64_t cols,
                                  const ExpansionSpec& spec, const ExpandOptions& options,
                                  float* sum_out, absl::Span<float* const> term_out,
                                  int64_t blocks = 1);

// The codes of a per-row expansion of x (rows × cols, float32) handed over row by row, for
// callers that build their own operand from them (the folded W×A product): emit(row, codes,
// scales) receives codes[k-1], the cols unpacked code bytes of term k (the low 8 bits of each
// code, as ExpandTensor's before packing), and scales[k-1], term k's scale. The codes and scales
// are bit for bit those of ExpandTensor with the same spec, shape {rows, cols} and kernels;
// nothing is packed and no error statistics are kept. spec.scale must be kChannel and spec.eps 0.
// Rows are split over options.pool: emit runs on its threads, once per row, and is only valid
// for the duration of the call. Errors as ExpandTensor's (the same messages); emit may have seen
// rows before a bad one is reported.
using RowCodesFn =
    std::function<void(int64_t row, const uint8_t* const* codes, const float* scales)>;
absl::Status ExpandRowCodesF32(const float* x, int64_t rows, int64_t cols,
                               const ExpansionSpec& spec, const ExpandOptions& options,
                               const RowCodesFn& emit);

// One row of ExpandReconstructF32 with variant D on the mid grid and one scale per row: out[i] =
// the float of the sum of x[i]'s `terms` terms of `bits` bits, the same bits, for callers that
// expand rows inside their own loops (no spec validation, no allocation). False, with out
// untouched, when the row holds a NaN or an infinity. REQUIRES: 1 <= bits <= 8,
// 1 <= terms <= kMaxTerms. kernels: nullptr for the active table.
bool ExpandDigitsRowF32(const float* x, int64_t n, int bits, int terms, float* out,
                        const KernelTable* kernels = nullptr);

// Variant D on the mid grid, one scale per row, with each value's K = terms digits folded into
// one byte: folded[row·ld + c] = Σ_k 2^{b(K−k)}·C_k + 2^{b−1}·Σ_k 2^{b(K−k)} ∈ [0, 2^{K·b}), with
// C_k the codes ExpandRowCodesF32 gives for the same spec (mid grid, kDigits, kChannel, b = bits);
// folded_sum[row] the sum of a row's bytes and last_scale[row] its term-K scale. Needs K·b <= 8
// and ld >= cols; bytes past cols are not written. Errors as ExpandTensor's for bad rows.
absl::Status ExpandRowFoldedF32(const float* x, int64_t rows, int64_t cols, int bits, int terms,
                                const ExpandOptions& options, uint8_t* folded, int64_t ld,
                                int64_t* folded_sum, float* last_scale);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_EXPANSION_H_
