// File: core/int_linear.h
//
// Integer inference for a linear layer whose weight AND input are expanded (W×A,
// docs/ALGORITHM.md §3):
//
//     y[b, o] = Σ_{(i, j) ∈ P} sw_i[o] · sx_j[b] · Σ_c Cw_i[o, c] · Cx_j[b, c]
//
// Cw_i are the weight's b-bit codes (sym grid; per-tensor or per-output-channel scales sw_i),
// Cx_j the activation's codes, expanded dynamically from x itself with one scale per row
// (core::ExpandTensor, channel scales over [batch, in]: the same expansion the model layer's
// fpxint::act_expand applies to linear inputs; an unsigned first term when x >= 0). P is every
// pair i <= K_w', j <= K_a', or with order truncation only i + j <= max(K_w', K_a') + 1.
//
// The inner sums are exact int32 arithmetic (u8 activations × s8 weights: the signed activation
// codes carry a bias of 2^(b-1) that is taken out with Σ_c Cw_i[o, c]); every variant (ref,
// avx2, avx512-VNNI) computes the same integers and shares the float epilogue, so the outputs are
// bit-for-bit equal to the scalar reference.
//
// Two schedules, chosen per call:
// - few activation rows (below kIntGemmMinRows, or kernels without a panel product): per tile of
//   4 output rows, the K_w' packed weight terms are unpacked once into s8 (in L1), then every
//   4-row tile of activations runs all pairs against them as dot products; the weights are read
//   from memory once per call, the activation codes from cache.
// - many rows: a register-blocked GEMM. The weights are repacked once, on the first such call,
//   into panels of kIntPanelRows output rows. b = 4: each 32-bit word holds 8 packed codes of one
//   row (still 4 bits per code, unpacked in registers); other widths: 4 codes as s8. Each product
//   broadcasts 4 activation codes against 16 rows × 4 codes (vpdpbusd), kIntGemmRows activation
//   rows at a time.
#ifndef FPXINT_CORE_INT_LINEAR_H_
#define FPXINT_CORE_INT_LINEAR_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/call_once.h"

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/expansion.h"
#include "core/lowbit_linear.h"
#include "core/thread_pool.h"

namespace fpxint::core {

// Codes in "plane order": per block of 64 codes, the codes sharing a position within their
// packed byte come together (b = 4: the 32 even codes, then the 32 odd ones; b = 2: four planes
// of 16; b = 1: eight of 8; b = 3 and 8: natural order). Weights unpack to it with two masks per
// 32 bytes; activations are written in it once per call.
inline constexpr int64_t kIntBlock = 64;

// The many-row schedule: output rows per weight panel, activation rows per panel product, and
// the activation rows from which a call takes it.
inline constexpr int kIntPanelRows = 32;
inline constexpr int kIntGemmRows = 8;
inline constexpr int64_t kIntGemmMinRows = 8;

struct PostStep;  // below

struct IntKernelTable {
  const char* name;  // "ref" | "avx2" | "avx512vnni"
  // The first n codes of one packed row (core/packing.h layout, b-bit two's complement), as s8 in
  // plane order, zero-padded to a multiple of kIntBlock. `packed` holds ⌈n·b/8⌉ bytes.
  void (*unpack_row)(const uint8_t* packed, int64_t n, int bits, int8_t* out);
  // out[r·B + b] = Σ_{c<n} w[r·ldw + c] · x[b·ldx + c] for r < R ≤ 4, b < B ≤ 4; n % 64 == 0.
  void (*dot_tile)(const int8_t* w, int64_t ldw, int R, const uint8_t* x, int64_t ldx, int B,
                   int64_t n, int32_t* out);
  // The panel product (nullptr: the variant has none and takes the dot schedule at every size).
  // `panel` holds `groups` blocks of kIntPanelRows 32-bit words: word r of block g is the 4 packed
  // bytes of output row r for input codes 8g..8g+7 (b = 4, lsb_first, two's complement). The
  // activation rows are u8 in "group order": per 8 codes, the even ones then the odd ones, so
  // byte 8g+q pairs with the low nibble of byte q and byte 8g+4+q with its high nibble.
  //   out[b·kIntPanelRows + r] = Σ_g Σ_q lo(g,r,q)·x[b·ldx + 8g + q] + hi(g,r,q)·x[b·ldx + 8g+4+q]
  // for b < B ≤ kIntGemmRows.
  void (*gemm_panel)(const uint8_t* panel, int64_t groups, const uint8_t* x, int64_t ldx, int B,
                     int32_t* out);
  // The s8 panel product of FoldedIntLinear: `panel` holds `groups` blocks of kIntPanelRows
  // words, word r of block g the s8 codes of output row r for inputs 4g..4g+3; the activation
  // rows are u8 in natural order.
  //   out[b·kIntPanelRows + r] = Σ_g Σ_q w(g,r,q)·x[b·ldx + 4g + q]     (b < B ≤ kIntGemmRows)
  void (*gemm_panel_s8)(const int8_t* panel, int64_t groups, const uint8_t* x, int64_t ldx,
                        int B, int32_t* out);
  // The float outputs of one activation row of a FoldedIntLinear panel product, r < R ≤
  // kIntPanelRows, in doubles (every step exact but the three products and the final rounding):
  //   out[r] = (float)(ws[r] · sx · (4·acc[r] − wpart[r] + xpart) · 0.25)
  // nullptr: the variant takes the reference one (same bits).
  void (*folded_outputs)(const int32_t* acc, int R, const double* wpart, const double* ws,
                         double xpart, double sx, float* out);
  // ApplyPostSteps (below) compiled for the variant (nullptr: the reference table's baseline
  // loops; same bits).
  void (*post_steps)(const PostStep* steps, int n, float* out, int64_t count);
};

const IntKernelTable& ActiveIntKernels();                 // avx512vnni > avx2 > ref

// What the float epilogue applies to each output after the scales, while the accumulators are
// still in cache: a bias per output feature, then an elementwise op (the layer's following
// ReLU or hardswish, fused into it), then an optional tail of further elementwise steps. Every
// schedule applies it to the same floats.
enum class PostOp : uint8_t {
  kNone = 0,
  kRelu = 1,       // max(y, 0), as at::relu
  kHardswish = 2,  // y · min(max(y + 3, 0), 6) / 6, as at::hardswish and its decomposed form
  kMul = 3,        // y · value
  kAdd = 4,        // y + value
  kDiv = 5,        // y / value
};
inline constexpr int kMaxPostOp = 5;

// One elementwise step of a tail: what a LibTorch op would do in its own pass over the tensor,
// with the same float rounding (each step one IEEE operation per value, in order; no
// contraction: core builds with -ffp-contract=off).
struct PostStep {
  PostOp op = PostOp::kNone;
  float value = 0;  // kMul, kAdd, kDiv
};
inline constexpr int kMaxPostSteps = 16;

// steps[0..n) on out[0..count), in place.
void ApplyPostSteps(const PostStep* steps, int n, float* out, int64_t count);

struct Epilogue {
  const float* bias = nullptr;  // out_features values, or none
  PostOp op = PostOp::kNone;
  const PostStep* tail = nullptr;  // applied after `op`
  int tail_steps = 0;
  // out[r] += bias[o0 + r] for r < n (outputs o0 .. o0+n-1), in place.
  void ApplyBias(int64_t o0, int n, float* out) const {
    if (bias != nullptr) {
      for (int r = 0; r < n; ++r) out[r] += bias[o0 + r];
    }
  }
  // The op and the tail on out[0..n), whichever outputs they are: the schedules call it once
  // per tile of outputs (the per-call cost is a few steps' dispatch).
  void ApplyElementwise(float* out, int64_t n) const {
    if (elementwise()) ApplyElementwiseTo(out, n);
  }
  void ApplyElementwiseTo(float* out, int64_t n) const;
  bool elementwise() const { return op != PostOp::kNone || tail_steps > 0; }
};
const IntKernelTable* IntKernelsByName(absl::string_view name);  // nullptr when unsupported

class IntLinear {
 public:
  // From a weight expansion with the sym grid, tensor or channel scales, b ∈ {2, 3, 4, 8}.
  // InvalidArgument otherwise (other grids and group scales run on LowbitLinear).
  static absl::StatusOr<IntLinear> FromExpansion(const TensorExpansion& e);
  // On the codes of a LowbitLinear without copying them: `w` must outlive the result. The same
  // conditions (sym: every offset 0, signed codes, one scale per row, b in 2..8).
  static absl::StatusOr<IntLinear> ViewOf(const LowbitLinear& w);
  IntLinear(IntLinear&&) = default;
  IntLinear& operator=(IntLinear&&) = default;
  IntLinear(const IntLinear&) = delete;
  IntLinear& operator=(const IntLinear&) = delete;

  struct ActSpec {
    int bits = 4;          // 2..8
    int terms = 2;         // K_a'
    bool unsigned_first = true;
    bool truncate = false;  // order truncation of the pairs
    // One activation scale for a block of rows instead of one per row: the block is
    // `rows_per_scale` consecutive rows (one sample of a batch), or all of x when that is 0.
    // Each block is expanded on its own, so its result does not depend on the other blocks.
    bool per_tensor = false;
    int64_t rows_per_scale = 0;
  };

  int64_t out_features() const { return rows_; }
  int64_t in_features() const { return cols_; }
  int terms() const { return static_cast<int>(terms_.size()); }
  // The codes plus, once a call has taken the many-row schedule, the repacked panels.
  size_t resident_bytes() const;
  // Whether `batch` activation rows take the register-blocked GEMM with these kernels (default:
  // the active ones). Callers that would otherwise prefer a dense fp32 route for many rows ask.
  bool UsesGemm(int64_t batch, const IntKernelTable* kernels = nullptr) const;

  // y [batch, out] from x [batch, in]; weight_terms 0 (or > terms()) = all. InvalidArgument for
  // a bad ActSpec, or when the int32 sums could overflow (in · 2^(b_x) · 2^(b_w - 1) >= 2^31).
  absl::Status Forward(const float* x, int64_t batch, float* y, const ActSpec& act,
                       int weight_terms = 0, ThreadPool* pool = nullptr,
                       const IntKernelTable* kernels = nullptr, const Epilogue& post = {}) const;

 private:
  IntLinear() = default;
  // The panels of every term, built on the first many-row call (const, thread-safe).
  struct Panels {
    absl::once_flag once;
    int64_t groups = 0;  // input codes / 8 (b = 4) or / 4 (s8 panels), padded like x
    std::vector<std::vector<uint8_t>> term;  // per term: ⌈rows/kIntPanelRows⌉ × groups × 128 bytes
    std::atomic<size_t> bytes{0};            // their total, once built (read without the once)
  };
  const Panels& PanelsBuilt() const;
  void ForwardGemm(const IntKernelTable& kt, int64_t batch, int64_t npad,
                   const std::vector<std::pair<int, int>>& pairs,
                   const std::vector<std::vector<uint8_t>>& xu,
                   const std::vector<std::vector<float>>& sx, const std::vector<int32_t>& bias,
                   float* y, ThreadPool* pool, const Epilogue& post) const;
  struct Term {
    CodeBuffer owned;           // the codes when this object holds them (FromExpansion)
    const uint8_t* codes = nullptr;  // rows × row_bytes (owned's data, or a LowbitLinear's)
    std::vector<float> scale;   // per row
    std::vector<int32_t> wsum;  // Σ_c codes per row
  };
  int bits_ = 4;
  int64_t rows_ = 0, cols_ = 0, row_bytes_ = 0;
  std::vector<Term> terms_;
  std::unique_ptr<Panels> panels_ = std::make_unique<Panels>();
};

// W×A with folded terms: weights and activations both expanded with variant D (grid mid,
// s_{k+1} = s_k / 2^b), whose K b-bit codes are the base-2^b digits of one (K·b)-bit code
// (docs/ALGORITHM.md §3a). With K·b ≤ 8 on each side, all K_w·K_a term products are ONE
// u8 × s8 product:
//
//   W = s_w·(F − z_w),  F = Σ_i 2^{b(K_w−i)}·C_i + 2^{b−1}·S_w − 128 ∈ [−128, 127]   (s8)
//   X = s_x·(U − z_x),  U = Σ_j 2^{b(K_a−j)}·C_j + 2^{b−1}·S_a        ∈ [0, 2^{K_a·b} − 1] (u8)
//
// with S = Σ_k 2^{b(K−k)}, s_w, s_x the last term's scales, 2·z_w = 2^{K_w·b} − 257 and
// 2·z_x = 2^{K_a·b} − 1. Then 4·Σ_c (F − z_w)(U − z_x) = 4·ΣFU − 2·(2z_x)·ΣF − 2·(2z_w)·ΣU +
// n·(2z_w)(2z_x), an exact integer equal to Σ_{i,j} 2^{b(K_w−i) + b(K_a−j)}·Σ_c (2C_i + 1)
// (2C_j + 1): the unfolded term products' own integers (tested). y = s_w·s_x·that / 4.
// Activations: one scale per row (tensor for one row), expanded from x at every call.
class FoldedIntLinear {
 public:
  // From a weight expansion with variant D (grid mid), tensor or channel scales, K·b ≤ 8.
  static absl::StatusOr<FoldedIntLinear> FromExpansion(const TensorExpansion& e);
  // From a LowbitLinear's codes, which must be variant D by content: one width, signed, offset ½
  // (mid grid), one scale per row with s_{k+1} = s_k / 2^b exactly, K·b <= 8. The panels are a
  // copy (one byte per weight); `w` may go away afterwards.
  static absl::StatusOr<FoldedIntLinear> FromLowbit(const LowbitLinear& w);
  FoldedIntLinear(FoldedIntLinear&&) = default;
  FoldedIntLinear& operator=(FoldedIntLinear&&) = default;

  struct ActSpec {
    int bits = 4;
    int terms = 2;  // bits · terms ≤ 8
  };
  int64_t out_features() const { return rows_; }
  int64_t in_features() const { return cols_; }
  int weight_bits() const { return code_bits_; }  // K_w·b of the folded codes
  size_t resident_bytes() const;

  // y [batch, out] from x [batch, in]. With rows_per_image > 0 the rows are the pixels of
  // batch / rows_per_image images and y is [images, out, rows_per_image] instead: a 1x1
  // convolution's NCHW output, written without a transpose.
  absl::Status Forward(const float* x, int64_t batch, float* y, const ActSpec& act,
                       ThreadPool* pool = nullptr, const IntKernelTable* kernels = nullptr,
                       const Epilogue& post = {}, int64_t rows_per_image = 0) const;
  // The exact integers 4·Σ_c (F − z_w)(U − z_x), [batch, out] (what Forward scales).
  absl::Status ForwardIntegers(const float* x, int64_t batch, int64_t* out, const ActSpec& act,
                               ThreadPool* pool = nullptr,
                               const IntKernelTable* kernels = nullptr) const;

 private:
  FoldedIntLinear() = default;
  // The panels from K code planes (`codes(k)`: rows × row_bytes, b-bit two's complement) and the
  // last term's scale per row.
  static FoldedIntLinear Build(int64_t rows, int64_t cols, int bits, int K, int64_t row_bytes,
                               const std::function<const uint8_t*(int)>& codes,
                               const std::function<float(int64_t)>& last_scale);
  // One panel product's results: rows b0 .. b0+B-1 × outputs o0 .. o0+R-1, acc[b·kIntPanelRows
  // + r]; usum[b] = Σ_c U and sx[b] the activation scale of row b0 + b.
  struct Tile {
    int64_t b0;
    int B;
    int64_t o0;
    int R;
    const int32_t* acc;
    const int64_t* usum;
    const float* sx;
    int64_t zx2;
  };
  using TileFn = std::function<void(const Tile&)>;
  // Runs the product, handing every tile to `emit` (on the pool's threads).
  absl::Status Run(const float* x, int64_t batch, const ActSpec& act, ThreadPool* pool,
                   const IntKernelTable* kernels, const TileFn& emit) const;
  // A tile's outputs, epilogue applied: out[b·kIntPanelRows + r] for b < B, r < R.
  void Outputs(const Tile& t, const Epilogue& post, const IntKernelTable& kt, float* out) const;
  int64_t Numerator(int64_t o, int32_t acc, int64_t usum, int64_t zx2) const;
  int code_bits_ = 8;
  int64_t rows_ = 0, cols_ = 0, groups_ = 0;  // groups_: inputs / 4, padded to kIntBlock
  std::vector<int8_t> panels_;   // ⌈rows/kIntPanelRows⌉ × groups_ × kIntPanelRows × 4
  std::vector<float> scale_;     // s_w per row
  std::vector<int64_t> fsum_;    // Σ_c F per row
  int64_t zw2_ = 0;              // 2·z_w
};

}  // namespace fpxint::core

#endif  // FPXINT_CORE_INT_LINEAR_H_
