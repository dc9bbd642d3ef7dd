// File: core/lowbit_linear.h
//
// Low-bit inference for a linear layer whose weight W [out, in] is an FP=xINT expansion:
//
//     y = x · (Σ_{k<K'} Ŵ_k)ᵀ,   Ŵ_k[o, i] = s_k[o, g] · (C_k[o, i] + off_k[o, g])
//
// with off = 0 (sym), 0.5 (mid) or -z (asym), g = i / group_len. The weights stay packed in
// memory (b-bit codes, 8/b per byte for b ∈ {1, 2, 4}): resident bytes ≈ K·b/32 of FP32 plus the
// scales. Activations stay fp32 (weight-only serving). Any-precision: K' ≤ K terms per call.
//
// Schedules (chosen by core::ChooseSchedule, core/schedule.h, for every caller):
//   codes (≤ 4 activation rows, or ≤ 8 with the AVX-512 table-lookup path): per row and term,
//     dot products straight on the codes with every activation row; the scale and offset are
//     applied per group after the dot (Σ s·(C + off)·x = s·(C·x + off·Σx)), so all K terms make
//     one pass over the activations.
//   transposed (more rows; ForwardTransposed): per task of 16 rows, decode and sum the K terms
//     into fp32 rows (dequantize on the fly, in L1), then multiply them with the activations
//     transposed ([in, batch]: one decoded weight broadcast against 16 or 32 activation rows per
//     fused multiply-add, no horizontal sums): the FLOPs no longer grow with K. Convolutions
//     hand their im2col columns, which are already in that layout, to ForwardTransposed and get
//     the [out, pixels] output directly.
//   panels (17–48 rows of a linear layer, AVX-512; ForwardPanels): 32 decoded rows transposed
//     in L1 so the weight rows sit in the vector lanes, each activation value broadcast against
//     them; no transposed activations and no scattered output.
// DepthwiseConv2d runs a depthwise convolution on these weights (one row per channel) straight
// on the image.
// Rows are split across the thread pool. Each variant (ref, avx2, avx512, chosen at run time like
// core/kernels.h) is tested against the scalar reference (fp32, within 1e-5 relative).
#ifndef FPXINT_CORE_LOWBIT_LINEAR_H_
#define FPXINT_CORE_LOWBIT_LINEAR_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/expansion.h"
#include "core/schedule.h"
#include "core/thread_pool.h"

namespace fpxint::core {

// The vector primitives the schedules are built from; one table per ISA.
struct LinearKernelTable {
  const char* name;  // "ref" | "avx2" | "avx512"
  // n codes of `bits` bits (core/packing.h layout) -> their integer values as floats.
  void (*decode)(const uint8_t* packed, int64_t n, int bits, bool is_signed, float* out);
  // Σ a[i]·b[i].
  float (*dot)(const float* a, const float* b, int64_t n);
  // acc[b] += Σ_{i<n} C[i]·x[b·ldx + i] for b < B ≤ 4, decoding the n codes on the fly (no
  // buffer): the small-batch inner loop. `packed` starts on a byte boundary.
  void (*dot_codes)(const uint8_t* packed, int bits, bool is_signed, const float* x, int64_t ldx,
                    int B, int64_t n, float* acc);
  // out[r·rs + b·bs] = Σ_{i<n} w[r·ldw + i]·xt[i·ldxt + b] for r < R ≤ kGemmRows, b < B: the
  // large-batch inner loop on transposed activations (xt is [n, B], an im2col layout). Every
  // output is one chain of fused multiply-adds over i in order from 0, so every variant gives
  // the same bits.
  void (*gemm_xt)(const float* w, int64_t ldw, int R, const float* xt, int64_t ldxt, int64_t B,
                  int64_t n, float* out, int64_t rs, int64_t bs);
  // Optional (nullptr when the ISA has no such path): packed codes decoded through a 16-entry
  // table lookup (one permute per 16 codes), which reads the codes of a block of
  // perm_block(bits) in bit-plane order. The activations are reordered once per call to match
  // (permute_x); dot_codes_perm then takes the reordered activations.
  int (*perm_block)(int bits);  // codes per block, 0 when this width has no such path
  void (*permute_x)(const float* x, int64_t n, int bits, float* out);
  // B ≤ 8.
  void (*dot_codes_perm)(const uint8_t* packed, int bits, bool is_signed, const float* xp,
                         int64_t ldx, int B, int64_t n, float* acc);
  // One activation row, K ≤ 4 terms in one pass over it: acc[k] += Σ C_k[i]·xp[i].
  void (*dot_codes_perm_terms)(const uint8_t* const* packed, const bool* is_signed, int K, int bits,
                               const float* xp, int64_t n, float* acc);
  // y[i] = Σ_{k<K} s[k]·(C_k[i] + off[k]) for i < n and K ≤ kMaxDecodeTerms (added to y[i]
  // when `accumulate`): K terms decoded and summed in one pass, one fused multiply-add per term
  // in term order, so every variant gives the same bits. packed[k] starts on a byte boundary.
  void (*decode_terms)(const uint8_t* const* packed, const int* bits, const bool* is_signed,
                       const float* s, const float* off, int K, int64_t n, bool accumulate,
                       float* y);
  // decode_terms over `rows` rows with one scale group per row and every term `bits` bits wide:
  // out[r·ldo + i] = Σ_{k<K} scale[k][r]·(C_k[r, i] + off[k][r]) for i < n, term k's row r at
  // codes[k] + r·row_bytes; the same bits as decode_terms row by row. The per-row set-up (code
  // tables, scales, the call) is what short rows cost (a depthwise 5x5 row has 25 codes), so
  // the variants hoist it out of the row loop.
  void (*decode_rows)(const uint8_t* const* codes, const float* const* scale,
                      const float* const* off, const bool* is_signed, int K, int bits,
                      int64_t rows, int64_t row_bytes, int64_t n, float* out, int64_t ldo);
  // out[b·ldo + r] = Σ_{i<n} w[r·ldw + i]·x[b·ldx + i] for r < R ≤ kPanelRows, b < B: the
  // moderate-batch inner loop on row-major activations and a linear layer's [batch, out] output,
  // the weight rows in the vector lanes (no transposed activations, no scattered output). Every
  // output is one chain of fused multiply-adds over i in order from 0, as in gemm_xt. Optional
  // (nullptr: the transposed schedule serves those batches).
  void (*gemm_wr)(const float* w, int64_t ldw, int R, const float* x, int64_t ldx, int64_t B,
                  int64_t n, float* out, int64_t ldo);
  // One output row of a depthwise convolution: out[o] = Σ_{i<kh} Σ_{j<kw} w[i·kw + j]·rows[i][o + j]
  // for o < n, rows[i] the (zero-padded) input row under kernel row i. Every output is one chain
  // of fused multiply-adds in (i, j) order from 0, so every variant gives the same bits. Optional
  // (nullptr: depthwise convolutions take the dense path).
  void (*depthwise_row)(const float* const* rows, const float* w, int kh, int kw, int64_t n,
                        float* out);
};
inline constexpr int kMaxDecodeTerms = 8;
inline constexpr int kGemmRows = 8;
inline constexpr int kPanelRows = 32;

// The table for this CPU (avx512 > avx2 > ref; FPXINT_KERNEL forces one, as in core/kernels.h).
const LinearKernelTable& ActiveLinearKernels();
// nullptr when unknown or unsupported here.
const LinearKernelTable* LinearKernelsByName(absl::string_view name);

class LowbitLinear {
 public:
  // From the expansion of a weight of shape [out, d1, d2, ...] (flattened to [out, in]). Keeps
  // the packed codes as they are; InvalidArgument for an expansion without terms.
  static absl::StatusOr<LowbitLinear> FromExpansion(const TensorExpansion& e);

  int64_t out_features() const { return rows_; }
  int64_t in_features() const { return cols_; }
  int terms() const { return static_cast<int>(terms_.size()); }
  // Bytes held for the weights: codes, scales and offsets of every term.
  size_t resident_bytes() const;

  // Read access to term k's storage (for kernels that run on the same packed codes, such as
  // core::IntLinear): codes rows × row_bytes(), scale and off rows × groups().
  struct TermView {
    int bits;
    bool is_signed;
    const uint8_t* codes;
    const float* scale;
    const float* off;
  };
  TermView term(int k) const {
    const Term& t = terms_[static_cast<size_t>(k)];
    return {t.bits, t.is_signed, t.codes.data(), t.scale.data(), t.off.data()};
  }
  int64_t groups() const { return groups_; }
  int64_t row_bytes() const { return row_bytes_; }

  // y[b, o] for b < batch (row-major [batch, out]) from x (row-major [batch, in]). terms_used:
  // 0 or > terms() means all. `pool` may be null (calling thread only).
  void Forward(const float* x, int64_t batch, float* y, int terms_used = 0,
               ThreadPool* pool = nullptr, const LinearKernelTable* kernels = nullptr) const;
  // The schedule core::ChooseSchedule picks for a call of `rows` activation rows on this weight
  // with `kernels` (nullptr: the active table). `depthwise_geometry`: the call is a depthwise
  // convolution the table's depthwise_row can run (dilation 1, horizontal stride 1).
  Schedule ChooseSchedule(int64_t rows, LayerShape shape, int64_t max_packed_rows,
                          const LinearKernelTable* kernels = nullptr,
                          bool depthwise_geometry = false) const;

  // The general form: output rows [row_begin, row_end) only, activation row b at x + b·ldx
  // (ldx >= in_features()), y[b·ldy + o - row_begin]. Grouped convolutions run one call per
  // group on that group's rows and im2col patches. Requires 0 <= row_begin <= row_end <= out.
  // Runs the schedule ChooseSchedule gives for a linear layer (codes, panels or transposed).
  void ForwardRows(const float* x, int64_t ldx, int64_t batch, int64_t row_begin, int64_t row_end,
                   float* y, int64_t ldy, int terms_used = 0, ThreadPool* pool = nullptr,
                   const LinearKernelTable* kernels = nullptr) const;

  // Schedule::kCodes, as ForwardRows but requiring batch ≤ the schedule's bound (4, or 8 when
  // the table-lookup path fits): dot products on the packed codes, the offsets applied after the
  // dots, all K' terms in one pass over the activations.
  void ForwardCodes(const float* x, int64_t ldx, int64_t batch, int64_t row_begin,
                    int64_t row_end, float* y, int64_t ldy, int terms_used = 0,
                    ThreadPool* pool = nullptr, const LinearKernelTable* kernels = nullptr) const;

  // The large-batch schedule on transposed activations: for b < batch and o in
  // [row_begin, row_end), y[(o - row_begin)·y_row_stride + b·y_batch_stride] =
  // Σ_i W[o, i]·xt[i·ldxt + b] (ldxt >= batch). A convolution passes its im2col columns
  // [in, pixels] and its output [out, pixels] (y_row_stride = pixels, y_batch_stride = 1);
  // ForwardRows passes its transposed activations and y_row_stride = 1, y_batch_stride = ldy.
  void ForwardTransposed(const float* xt, int64_t ldxt, int64_t batch, int64_t row_begin,
                         int64_t row_end, float* y, int64_t y_row_stride, int64_t y_batch_stride,
                         int terms_used = 0, ThreadPool* pool = nullptr,
                         const LinearKernelTable* kernels = nullptr) const;

  // The moderate-batch schedule on row-major activations (LinearKernelTable::gemm_wr; requires a
  // table that has it): per task, kPanelRows output rows dequantized (all K' terms summed) into a
  // per-thread buffer, then multiplied with every activation row: y[b·ldy + o - row_begin] for
  // b < batch and o in [row_begin, row_end), activation row b at x + b·ldx.
  void ForwardPanels(const float* x, int64_t ldx, int64_t batch, int64_t row_begin,
                     int64_t row_end, float* y, int64_t ldy, int terms_used = 0,
                     ThreadPool* pool = nullptr, const LinearKernelTable* kernels = nullptr) const;

  // A depthwise 2-D convolution of one image on these weights, one row per channel of a
  // [C, 1, kh, kw] kernel (requires a table with depthwise_row): x [C, H, W] -> y [C, OH, OW]
  // with OW = W + 2·pw - kw + 1, stride (sh, 1), dilation 1, zero padding (ph, pw):
  // y[c, oh, ow] = Σ_{i,j} W[c, i·kw + j]·x[c, oh·sh + i - ph, ow + j - pw]. Channels are split
  // over `pool`. With `prepare`, each channel's H·W inputs are first passed through
  // prepare(c, x_c, out) (out: H·W floats, the values convolved instead; e.g. the activation's
  // expansion), on the channel's thread, while they are in cache. With `finish`, each channel's
  // OH·OW outputs are passed through finish(c, y_c, OH·OW) in place as soon as they are written
  // (e.g. its bias and the elementwise ops after the layer).
  using ChannelFn = std::function<void(int64_t c, const float* xc, float* out)>;
  using ChannelOutFn = std::function<void(int64_t c, float* yc, int64_t n)>;
  void DepthwiseConv2d(const float* x, int64_t H, int64_t W, int kh, int kw, int sh, int ph,
                       int pw, int64_t OH, float* y, int terms_used = 0,
                       ThreadPool* pool = nullptr, const LinearKernelTable* kernels = nullptr,
                       const ChannelFn* prepare = nullptr,
                       const ChannelOutFn* finish = nullptr) const;

  // The weight the first `terms_used` terms stand for, Σ_k Ŵ_k in fp32, row-major [out, in]
  // (out must hold out·in floats): for compute-bound calls (many activation rows) that hand a
  // transient fp32 copy to a dense GEMM or convolution while the resident weights stay packed.
  void Dequantize(float* out, int terms_used = 0, ThreadPool* pool = nullptr,
                  const LinearKernelTable* kernels = nullptr) const;
  // Rows [row_begin, row_end) only, out pointing at row row_begin's first element.
  void DequantizeRows(int64_t row_begin, int64_t row_end, float* out, int terms_used = 0,
                      const LinearKernelTable* kernels = nullptr) const;

  // A self-describing byte image (versioned, little-endian) for saving inside model files, and
  // its inverse. Deserialize treats the bytes as untrusted: every count, size and code width is
  // checked against the bytes present before use (InvalidArgument says which field).
  std::string Serialize() const;
  static absl::StatusOr<LowbitLinear> Deserialize(absl::string_view bytes);

 private:
  struct Term {
    int bits = 4;
    bool is_signed = true;
    CodeBuffer codes;          // rows × row_bytes
    std::vector<float> scale;  // rows × groups (tensor scales broadcast to every row)
    std::vector<float> off;    // rows × groups: 0 (sym), 0.5 (mid) or -zero (asym)
  };
  // Whether the table's table-lookup code path (perm_block) fits this weight's groups.
  bool TableLookupFits(const LinearKernelTable& kt) const;
  int64_t rows_ = 0, cols_ = 0, group_len_ = 0, groups_ = 0, row_bytes_ = 0;
  std::vector<Term> terms_;
};

// SHA-256 (lower-case hex) of the packed terms `layers` hold, in the artifact's data order
// (docs/FORMAT.md: term-major, then layer order): for k = 1..max terms, for each layer with a
// term k, its codes (rows × row_bytes bytes as stored), then rows × groups scales and the same
// number of offsets (0 sym, 0.5 mid, −zero asym) as little-endian float32. A reader recomputes it
// from an artifact's tensors, so it shows that a served network holds exactly an artifact's terms.
std::string PackedTermsSha256(absl::Span<const LowbitLinear* const> layers);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_LOWBIT_LINEAR_H_
