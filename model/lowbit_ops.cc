// fpxint::linear / conv2d / dequantize and the PackedWeight class (model/lowbit_ops.h).
#include "model/lowbit_ops.h"

#include "core/runtime.h"

#include "core/int_linear.h"
#include "model/act_expand_op.h"
#include "model/aten_pool.h"

#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/script.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

namespace fpxint::model {
namespace {

// A form of a packed weight built from it on first use (thread-safe): the object, or nullptr
// with the reason in error(). ready() reads it without waiting, for the memory accounting.
template <typename T>
class LazyView {
 public:
  template <typename Build>  // Build() -> absl::StatusOr<T>
  const T* Get(const Build& build) const {
    std::call_once(once_, [&] {
      absl::StatusOr<T> v = build();
      if (v.ok()) {
        value_ = std::make_unique<T>(*std::move(v));
        ready_.store(value_.get(), std::memory_order_release);
      } else {
        error_ = std::string(v.status().message());
      }
    });
    return value_.get();
  }
  const std::string& error() const { return error_; }
  size_t resident_bytes() const {
    const T* v = ready_.load(std::memory_order_acquire);
    return v != nullptr ? v->resident_bytes() : 0;
  }

 private:
  mutable std::atomic<const T*> ready_{nullptr};
  mutable std::once_flag once_;
  mutable std::unique_ptr<T> value_;
  mutable std::string error_;
};

struct PackedWeight : torch::CustomClassHolder {
  PackedWeight(core::LowbitLinear w_in, std::vector<int64_t> shape_in)
      : w(std::move(w_in)), shape(std::move(shape_in)) {}
  core::LowbitLinear w;
  std::vector<int64_t> shape;  // the dense weight's shape, [out, ...] with prod(...) = in

  // The integer W×A view of w's codes (no copy), built on first use; nullptr with the reason in
  // int_error when the weights do not qualify (core::IntLinear::ViewOf).
  const core::IntLinear* Int() const {
    return int_.Get([this] { return core::IntLinear::ViewOf(w); });
  }
  const std::string& int_error() const { return int_.error(); }
  // The folded W×A form of w (core::FoldedIntLinear::FromLowbit: variant D codes, K·b <= 8),
  // built on first use; nullptr with the reason in folded_error when w does not fold.
  const core::FoldedIntLinear* Folded() const {
    return folded_.Get([this] { return core::FoldedIntLinear::FromLowbit(w); });
  }
  const std::string& folded_error() const { return folded_.error(); }
  // What the W×A views hold beside w's codes (per-row scales and sums, the GEMM panels once a
  // many-row call has built them, the folded panels); 0 before the first W×A call.
  size_t int_bytes() const { return int_.resident_bytes() + folded_.resident_bytes(); }

 private:
  LazyView<core::IntLinear> int_;
  LazyView<core::FoldedIntLinear> folded_;
};
using PackedPtr = c10::intrusive_ptr<PackedWeight>;

// Pickled state: (image version, dense shape, packed image as a uint8 tensor).
using PackedState = std::tuple<int64_t, std::vector<int64_t>, at::Tensor>;
constexpr int64_t kStateVersion = 1;

void CheckShape(const core::LowbitLinear& w, const std::vector<int64_t>& shape) {
  TORCH_CHECK(shape.size() >= 2 && shape[0] == w.out_features(),
              "fpxint.PackedWeight: shape must be [out, ...] with out = ", w.out_features());
  int64_t in = 1;
  for (size_t i = 1; i < shape.size(); ++i) {
    TORCH_CHECK(shape[i] >= 1 && shape[i] <= w.in_features() && in <= w.in_features(),
                "fpxint.PackedWeight: shape dim ", i, " = ", shape[i], " out of range");
    in *= shape[i];
  }
  TORCH_CHECK(in == w.in_features(), "fpxint.PackedWeight: shape holds ", in,
              " inputs per row, the packed weight ", w.in_features());
}

PackedState GetState(const PackedPtr& p) {
  const std::string image = p->w.Serialize();
  at::Tensor t = at::empty({static_cast<int64_t>(image.size())}, at::kByte);
  std::memcpy(t.data_ptr<uint8_t>(), image.data(), image.size());
  return {kStateVersion, p->shape, t};
}

PackedPtr SetState(PackedState s) {
  TORCH_CHECK(std::get<0>(s) == kStateVersion, "fpxint.PackedWeight: state version ",
              std::get<0>(s), " is not the one this fpxint op library reads (", kStateVersion, ")");
  const at::Tensor t = std::get<2>(s).contiguous();
  TORCH_CHECK(t.scalar_type() == at::kByte && t.dim() == 1,
              "fpxint.PackedWeight: the packed image must be a 1-D uint8 tensor");
  absl::StatusOr<core::LowbitLinear> w = core::LowbitLinear::Deserialize(absl::string_view(
      reinterpret_cast<const char*>(t.data_ptr<uint8_t>()), static_cast<size_t>(t.numel())));
  TORCH_CHECK(w.ok(), "fpxint.PackedWeight: ", std::string(w.status().message()));
  CheckShape(*w, std::get<1>(s));
  return c10::make_intrusive<PackedWeight>(*std::move(w), std::move(std::get<1>(s)));
}

int TermsArg(int64_t terms) {
  return terms <= 0 || terms > 64 ? 0 : static_cast<int>(terms);
}

// Schedule::kCodes: output rows [r0, r1) of y = x · Wᵀ on the packed codes, split over
// LibTorch's intra-op pool.
void RunCodes(const core::LowbitLinear& w, const float* x, int64_t ldx, int64_t m, int64_t r0,
              int64_t r1, float* y, int64_t ldy, int terms) {
  constexpr int64_t kGrain = 16;
  at::parallel_for(r0, r1, kGrain, [&](int64_t b, int64_t e) {
    w.ForwardCodes(x, ldx, m, b, e, y + (b - r0), ldy, terms);
  });
}

// The many-row schedule: y[(o - r0)·rs + b·bs] = Σ_i W[o, i]·xt[i·ldxt + b] for output rows
// [r0, r1), b < m, on transposed activations (im2col columns), rows split over the intra-op pool.
void RunTransposed(const core::LowbitLinear& w, const float* xt, int64_t ldxt, int64_t m,
                   int64_t r0, int64_t r1, float* y, int64_t rs, int64_t bs, int terms) {
  constexpr int64_t kGrain = 16;
  if ((r1 - r0 + kGrain - 1) / kGrain < at::get_num_threads() && m >= 64) {
    // Too few weight rows to give every thread some (a first 3x3 convolution with 16 output
    // channels over 3840 pixels): split the activation columns instead, every thread decoding
    // the same few rows.
    at::parallel_for(0, m, 32, [&](int64_t b, int64_t e) {
      w.ForwardTransposed(xt + b, ldxt, e - b, r0, r1, y + b * bs, rs, bs, terms);
    });
    return;
  }
  at::parallel_for(r0, r1, kGrain, [&](int64_t b, int64_t e) {
    w.ForwardTransposed(xt, ldxt, m, b, e, y + (b - r0) * rs, rs, bs, terms);
  });
}

// The activation rows beyond which a call takes the dense path (a transient fp32 copy of Σ Ŵ_k
// and LibTorch's GEMM or convolution). Weight-only: none by default, since the packed schedules
// are ahead of decode + OpenBLAS/oneDNN at every size measured (docs/BENCHMARKS.md). W×A: none
// either where core::IntLinear takes its register-blocked GEMM (VNNI kernels); kernels without
// it beyond 16 rows, where K_w'·K_a' dot-product passes lose to one fp32 GEMM.
// FPXINT_PACKED_MAX_ROWS / SetPackedMaxRows set one bound for both.
constexpr int64_t kIntDotMaxRows = 16;
int64_t WeightOnlyMaxRows() {
  const int64_t v = PackedMaxRows();
  return v < 0 ? std::numeric_limits<int64_t>::max() : v;
}
bool IntTakesDense(const core::IntLinear& iw, int64_t rows) {
  const int64_t v = PackedMaxRows();
  if (v >= 0) return rows > v;
  return rows > kIntDotMaxRows && !iw.UsesGemm(rows);
}

// Σ_{k<=terms} Ŵ_k for rows [r0, r1) into `out` (row-major, (r1 - r0) × in), rows split over
// LibTorch's intra-op pool.
void DequantizeInto(const core::LowbitLinear& w, int64_t r0, int64_t r1, float* out, int terms) {
  const int64_t cols = w.in_features();
  // Small weights decode on the calling thread: a fork/join costs more than they do.
  constexpr int64_t kSerialElements = int64_t{1} << 16;
  if ((r1 - r0) * cols * std::max(1, terms) <= kSerialElements) {
    w.DequantizeRows(r0, r1, out, terms);
    return;
  }
  at::parallel_for(r0, r1, 8, [&](int64_t b, int64_t e) {
    w.DequantizeRows(b, e, out + (b - r0) * cols, terms);
  });
}

// A per-thread fp32 buffer of at least n floats, reused across calls: the dense path's transient
// weights then cost neither an allocation nor fresh-page faults per call (which cost more than the
// decoding itself). Each interpreter thread runs one op at a time, and the callees (at::mm_out,
// at::conv2d) do not keep their inputs.
at::Tensor Scratch(int64_t n) {
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.numel() < n) buf = at::empty({n}, at::kFloat);
  return buf.narrow(0, 0, n);
}

// Rows per dequantized panel: the whole weight when it has at most kPanelFloats elements,
// otherwise panels of that size, so the transient stays small for large layers.
constexpr int64_t kPanelFloats = int64_t{1} << 20;  // 4 MiB
int64_t PanelRows(const core::LowbitLinear& w) {
  return std::max<int64_t>(1, std::min(w.out_features(), kPanelFloats / w.in_features()));
}

// y[:, r] = a · W[r, :]ᵀ for every output row r, a transient panel of W at a time:
// `y` is [m, out] (row-major, any row stride), `a` is [m, in].
void DenseLinear(const core::LowbitLinear& w, const at::Tensor& a, at::Tensor y, int terms) {
  const int64_t in = w.in_features(), out = w.out_features(), panel = PanelRows(w);
  at::Tensor buf = Scratch(panel * in);
  for (int64_t r0 = 0; r0 < out; r0 += panel) {
    const int64_t p = std::min(panel, out - r0);
    DequantizeInto(w, r0, r0 + p, buf.data_ptr<float>(), terms);
    at::Tensor y_panel = y.narrow(1, r0, p);
    at::mm_out(y_panel, a, buf.narrow(0, 0, p * in).view({p, in}).t());
  }
}

// The whole Σ Ŵ_k in the dense shape, in the per-thread buffer (for general convolutions).
at::Tensor Dense(const PackedWeight& p, int terms) {
  at::Tensor d = Scratch(p.w.out_features() * p.w.in_features());
  DequantizeInto(p.w, 0, p.w.out_features(), d.data_ptr<float>(), terms);
  return d.view(p.shape);
}

// x of a linear op, contiguous: float32 with `in` values in its last dim.
at::Tensor LinearInput(const at::Tensor& x, int64_t in, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": input must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, op, ": input's last dim is ",
              x.dim() >= 1 ? x.size(-1) : 0, "; this weight takes ", in);
  return x.contiguous();
}

at::Tensor Linear(const at::Tensor& x_in, const PackedPtr& p, const c10::optional<at::Tensor>& bias,
                  int64_t terms) {
  const core::LowbitLinear& w = p->w;
  const at::Tensor x = LinearInput(x_in, w.in_features(), "fpxint::linear");
  const int k = TermsArg(terms);
  const int64_t m = x.numel() / w.in_features();
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = w.out_features();
  at::Tensor y = at::empty(out_shape, x.options());
  switch (w.ChooseSchedule(m, core::LayerShape::kLinear, WeightOnlyMaxRows())) {
    case core::Schedule::kDense:
      DenseLinear(w, x.view({m, w.in_features()}), y.view({m, w.out_features()}), k);
      break;
    case core::Schedule::kPanels:
      w.ForwardPanels(x.data_ptr<float>(), w.in_features(), m, 0, w.out_features(),
                      y.data_ptr<float>(), w.out_features(), k, &AtenPool());
      break;
    case core::Schedule::kCodes:
      RunCodes(w, x.data_ptr<float>(), w.in_features(), m, 0, w.out_features(),
               y.data_ptr<float>(), w.out_features(), k);
      break;
    default: {  // transposed: the activations transposed once, for every row task
      const at::Tensor xt = x.view({m, w.in_features()}).t().contiguous();
      RunTransposed(w, xt.data_ptr<float>(), m, m, 0, w.out_features(), y.data_ptr<float>(), 1,
                    w.out_features(), k);
    }
  }
  if (bias && bias->defined()) y.add_(*bias);
  return y;
}

std::vector<int64_t> Pair(c10::IntArrayRef v, const char* what) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, "fpxint::conv2d: ", what, " must have 1 or 2 values");
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

// The geometry of one convolution call, checked: input [N, C, H, W] (an unbatched [C, H, W] gets
// N = 1), the output size, and the im2col view both the packed and the integer kernels take.
struct ConvCall {
  at::Tensor x;  // [N, C, H, W], contiguous
  bool unbatched = false;
  std::vector<int64_t> stride, padding, dilation;
  int64_t n = 0, out = 0, oh = 0, ow = 0;
  int64_t rows() const { return n * oh * ow; }  // output pixels: the GEMM's activation rows

  // [N·OH·OW, C·kh·kw]: one row per output pixel, columns ordered (c, kh, kw), so group g's
  // inputs are the columns [g·cpg, (g+1)·cpg).
  at::Tensor Patches(const std::vector<int64_t>& ws) const {
    return Columns(ws).transpose(1, 2).contiguous();
  }
  // [N, C·kh·kw, OH·OW], contiguous: the transposed schedule's layout (the input itself for a
  // 1x1 convolution with stride 1 and no padding).
  at::Tensor Columns(const std::vector<int64_t>& ws) const {
    if (ws[2] == 1 && ws[3] == 1 && stride[0] == 1 && stride[1] == 1 && padding[0] == 0 &&
        padding[1] == 0) {
      return x.view({n, x.size(1), oh * ow});
    }
    return at::im2col(x, {ws[2], ws[3]}, dilation, padding, stride).contiguous();
  }
  // From the GEMM's [N·OH·OW, out] to the convolution's output, bias added.
  at::Tensor FromRows(const at::Tensor& flat, const c10::optional<at::Tensor>& bias) const {
    at::Tensor y = flat.view({n, oh, ow, out}).permute({0, 3, 1, 2}).contiguous();
    if (bias && bias->defined()) y.add_(bias->view({1, out, 1, 1}));
    return Finish(y);
  }
  at::Tensor Finish(const at::Tensor& y) const { return unbatched ? y.squeeze(0) : y; }
};

ConvCall PrepareConv(const char* op, const at::Tensor& x_in, const std::vector<int64_t>& ws,
                     int64_t groups, c10::IntArrayRef stride, c10::IntArrayRef padding,
                     c10::IntArrayRef dilation) {
  TORCH_CHECK(ws.size() == 4, op, ": the packed weight is not a 2-D convolution's");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, op, ": input must be float32, got ",
              x_in.scalar_type());
  TORCH_CHECK(groups >= 1 && ws[0] % groups == 0, op, ": groups ", groups, " does not divide ",
              ws[0], " output channels");
  ConvCall c;
  c.unbatched = x_in.dim() == 3;
  c.x = (c.unbatched ? x_in.unsqueeze(0) : x_in).contiguous();
  TORCH_CHECK(c.x.dim() == 4 && c.x.size(1) == ws[1] * groups, op, ": input must be [N, ",
              ws[1] * groups, ", H, W]; got ", x_in.sizes());
  c.stride = Pair(stride, "stride");
  c.padding = Pair(padding, "padding");
  c.dilation = Pair(dilation, "dilation");
  int64_t out_hw[2];
  for (int d = 0; d < 2; ++d) {
    out_hw[d] = (c.x.size(2 + d) + 2 * c.padding[d] - c.dilation[d] * (ws[2 + d] - 1) - 1) /
                    c.stride[d] + 1;
    TORCH_CHECK(out_hw[d] >= 1, op, ": input ", c.x.sizes(), " is smaller than the kernel");
  }
  c.n = c.x.size(0);
  c.out = ws[0];
  c.oh = out_hw[0];
  c.ow = out_hw[1];
  return c;
}

at::Tensor ActExpand(const at::Tensor& x, int64_t bits, int64_t terms, core::Grid grid,
                     int64_t granularity, bool unsigned_first, core::Variant variant);
std::vector<core::PostStep> PostSteps(c10::IntArrayRef ops, c10::ArrayRef<double> values,
                                      const char* op);
void ApplyTail(at::Tensor& y, const std::vector<core::PostStep>& steps, const char* op);

// `tail`: the elementwise ops after the layer (the op's tail_ops / tail_values), applied after
// the bias: on the depthwise schedule per channel while its outputs are in cache, otherwise as
// one pass over the result.
at::Tensor Conv2d(const at::Tensor& x_in, const PackedPtr& p, const c10::optional<at::Tensor>& bias,
                  c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                  int64_t groups, int64_t terms, int64_t act_bits = 0, int64_t act_terms = 0,
                  int64_t act_grid = 0, int64_t act_granularity = 0, int64_t act_variant = 0,
                  const std::vector<core::PostStep>& tail = {}) {
  const char* op = "fpxint::conv2d";
  const core::LowbitLinear& w = p->w;
  const ConvCall c = PrepareConv(op, x_in, p->shape, groups, stride, padding, dilation);
  const bool has_bias = bias && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->numel() == c.out), op,
              ": the bias must be float32 with one value per output channel (", c.out, "); got ",
              has_bias ? bias->scalar_type() : at::kFloat, " with ", has_bias ? bias->numel() : 0,
              " values");
  const int k = TermsArg(terms);
  const std::vector<int64_t>& ws = p->shape;
  const bool depthwise = groups > 1 && groups == c.out && ws[1] == 1;
  const core::Schedule schedule = w.ChooseSchedule(
      c.rows(),
      depthwise ? core::LayerShape::kDepthwiseConv
                : groups > 1 ? core::LayerShape::kGroupedConv : core::LayerShape::kConv,
      WeightOnlyMaxRows(), nullptr,
      /*depthwise_geometry=*/c.dilation[0] == 1 && c.dilation[1] == 1 && c.stride[1] == 1);
  // With act_bits > 0 the op convolves x's activation expansion, fpxint::act_expand(x, act_bits,
  // act_terms, act_grid, act_granularity, unsigned_first = false, act_variant): inside the
  // depthwise schedule for variant D with one scale per (image, channel), channel by channel
  // while each is in cache; otherwise as a separate pass first.
  const bool fused_expansion =
      act_bits > 0 && schedule == core::Schedule::kDepthwise &&
      act_grid == static_cast<int64_t>(core::Grid::kMid) &&
      act_variant == static_cast<int64_t>(core::Variant::kDigits) &&
      act_granularity == static_cast<int64_t>(ActGranularity::kChannel) && act_bits <= 8 &&
      act_terms >= 1 && act_terms <= core::kMaxTerms;
  if (act_bits > 0 && !fused_expansion) {
    return Conv2d(ActExpand(x_in, act_bits, act_terms, static_cast<core::Grid>(act_grid),
                            act_granularity, false, static_cast<core::Variant>(act_variant)),
                  p, bias, stride, padding, dilation, groups, terms, 0, 0, 0, 0, 0, tail);
  }
  if (schedule == core::Schedule::kDepthwise) {
    // Depthwise (one input channel per output channel): straight on the image, no im2col.
    const int64_t H = c.x.size(2), W = c.x.size(3);
    at::Tensor y = at::empty({c.n, c.out, c.oh, c.ow}, c.x.options());
    std::atomic<bool> bad_row{false};
    const core::LowbitLinear::ChannelFn expand = [&](int64_t, const float* xc, float* out) {
      if (!core::ExpandDigitsRowF32(xc, H * W, static_cast<int>(act_bits),
                                    static_cast<int>(act_terms), out)) {
        bad_row.store(true, std::memory_order_relaxed);
        std::fill(out, out + H * W, 0.0f);
      }
    };
    // The bias and the tail run per channel as its outputs are written: the bias as a first
    // add step (y + b in float, as add_ computes it).
    const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
    const float* bp = has_bias ? b.data_ptr<float>() : nullptr;
    const core::LowbitLinear::ChannelOutFn finish = [&](int64_t ch, float* yc, int64_t n) {
      core::PostStep steps[core::kMaxPostSteps + 1];
      int count = 0;
      if (bp != nullptr) steps[count++] = {core::PostOp::kAdd, bp[ch]};
      for (const core::PostStep& st : tail) steps[count++] = st;
      core::ApplyPostSteps(steps, count, yc, n);
    };
    const bool per_channel = bp != nullptr || !tail.empty();
    for (int64_t i = 0; i < c.n; ++i) {
      w.DepthwiseConv2d(c.x.data_ptr<float>() + i * c.out * H * W, H, W, static_cast<int>(ws[2]),
                        static_cast<int>(ws[3]), static_cast<int>(c.stride[0]),
                        static_cast<int>(c.padding[0]), static_cast<int>(c.padding[1]), c.oh,
                        y.data_ptr<float>() + i * c.out * c.oh * c.ow, k, &AtenPool(), nullptr,
                        fused_expansion ? &expand : nullptr, per_channel ? &finish : nullptr);
    }
    if (bad_row.load()) {  // the expansion's own error for the row it rejects
      ActExpand(x_in, act_bits, act_terms, core::Grid::kMid, act_granularity, false,
                core::Variant::kDigits);
      TORCH_CHECK(false, op, ": internal: a row was rejected, the tensor not");
    }
    return c.Finish(y);
  }
  // Dense path, LibTorch's convolution (oneDNN on the same OpenMP threads).
  if (schedule == core::Schedule::kDense) {
    at::Tensor y = at::conv2d(c.x, Dense(*p, k), bias, c.stride, c.padding, c.dilation, groups);
    ApplyTail(y, tail, op);
    return c.Finish(y);
  }
  if (schedule == core::Schedule::kTransposed) {
    // Transposed schedule (groups == 1 here): the im2col columns [N, C·kh·kw, OH·OW] are
    // already [in, pixels] per image, and the output [N, out, OH·OW] is what the kernel writes:
    // no transposes.
    const int64_t px = c.oh * c.ow;
    const at::Tensor cols = c.Columns(p->shape);
    at::Tensor y = at::empty({c.n, c.out, c.oh, c.ow}, c.x.options());
    for (int64_t i = 0; i < c.n; ++i) {
      RunTransposed(w, cols.data_ptr<float>() + i * cols.stride(0), px, px, 0, c.out,
                    y.data_ptr<float>() + i * c.out * px, px, 1, k);
    }
    if (has_bias) y.add_(bias->view({1, c.out, 1, 1}));
    ApplyTail(y, tail, op);
    return c.Finish(y);
  }
  const at::Tensor cols = c.Patches(p->shape);
  const int64_t ldx = cols.size(2), cpg = w.in_features(), opg = c.out / groups;
  at::Tensor flat = at::empty({c.rows(), c.out}, c.x.options());
  for (int64_t g = 0; g < groups; ++g) {
    RunCodes(w, cols.data_ptr<float>() + g * cpg, ldx, c.rows(), g * opg, (g + 1) * opg,
             flat.data_ptr<float>() + g * opg, c.out, k);
  }
  at::Tensor y = c.FromRows(flat, bias);
  ApplyTail(y, tail, op);
  return y;
}

// The registered fpxint::conv2d: Conv2d with the tail from its schema arguments.
at::Tensor Conv2dOp(const at::Tensor& x_in, const PackedPtr& p,
                    const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                    int64_t terms, int64_t act_bits, int64_t act_terms, int64_t act_grid,
                    int64_t act_granularity, int64_t act_variant, c10::IntArrayRef tail_ops,
                    c10::ArrayRef<double> tail_values) {
  return Conv2d(x_in, p, bias, stride, padding, dilation, groups, terms, act_bits, act_terms,
                act_grid, act_granularity, act_variant,
                PostSteps(tail_ops, tail_values, "fpxint::conv2d"));
}

// ---- W×A: integer products of expanded weights and dynamically expanded activations ----

// fpxint::post_'s steps, and the tail of the integer ops (their tail_ops / tail_values).
std::vector<core::PostStep> PostSteps(c10::IntArrayRef ops, c10::ArrayRef<double> values,
                                      const char* op) {
  TORCH_CHECK(ops.size() == values.size(), op, ": ", ops.size(), " steps but ", values.size(),
              " values; give one value per step (0 for relu and hardswish)");
  TORCH_CHECK(ops.size() <= static_cast<size_t>(core::kMaxPostSteps), op, ": ", ops.size(),
              " steps; accepted at most ", core::kMaxPostSteps);
  std::vector<core::PostStep> steps(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    TORCH_CHECK(ops[i] >= 1 && ops[i] <= core::kMaxPostOp, op, ": step ", i, " op ", ops[i],
                " unknown; accepted 1 (relu), 2 (hardswish), 3 (mul), 4 (add), 5 (div)");
    steps[i] = {static_cast<core::PostOp>(ops[i]), static_cast<float>(values[i])};
  }
  return steps;
}

// The steps on y in place, one pass on LibTorch's intra-op threads (float32 only).
void ApplyTail(at::Tensor& y, const std::vector<core::PostStep>& steps, const char* op) {
  if (steps.empty()) return;
  TORCH_CHECK(y.scalar_type() == at::kFloat, op, ": takes float32 tensors; got ",
              y.scalar_type());
  at::Tensor c = y.is_contiguous() ? y : y.contiguous();
  float* data = c.data_ptr<float>();
  at::parallel_for(0, c.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    core::ApplyPostSteps(steps.data(), static_cast<int>(steps.size()), data + begin, end - begin);
  });
  if (!c.is_same(y)) y.copy_(c);
}

// What the integer ops apply after the bias: `post` (0 none, 1 ReLU, 2 hardswish), then the
// tail's steps.
struct Post {
  core::PostOp op = core::PostOp::kNone;
  std::vector<core::PostStep> tail;
};

Post PostArgs(int64_t post, c10::IntArrayRef tail_ops, c10::ArrayRef<double> tail_values,
              const char* op) {
  TORCH_CHECK(post >= 0 && post <= 2, op, ": post ", post,
              " unknown; accepted 0 (none), 1 (relu), 2 (hardswish)");
  return {static_cast<core::PostOp>(post), PostSteps(tail_ops, tail_values, op)};
}

// The post op and tail on a result the op's integer epilogue did not produce (the fallback
// routes).
at::Tensor ApplyPost(at::Tensor y, const Post& post, const char* op) {
  if (post.op == core::PostOp::kRelu) y.relu_();
  if (post.op == core::PostOp::kHardswish) at::hardswish_(y);
  ApplyTail(y, post.tail, op);
  return y;
}

// The bias (contiguous float32, one per output), post op and tail for a kernel epilogue; `post`
// must outlive it.
core::Epilogue EpilogueOf(const c10::optional<at::Tensor>& bias, int64_t out, const Post& post,
                          at::Tensor* keep, const char* op) {
  core::Epilogue e;
  e.op = post.op;
  e.tail = post.tail.data();
  e.tail_steps = static_cast<int>(post.tail.size());
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->numel() == out && bias->scalar_type() == at::kFloat, op,
                ": bias must be float32 with ", out, " values; got ", bias->sizes());
    *keep = bias->contiguous();
    e.bias = keep->data_ptr<float>();
  }
  return e;
}

// `rows` activation rows of x's x.size(0) samples (ActGranularity::kSample: one scale per
// sample, as fpxint::act_expand).
core::IntLinear::ActSpec ActArgs(const at::Tensor& x, int64_t rows, int64_t bits, int64_t terms,
                                 bool unsigned_first, bool truncate, int64_t granularity) {
  TORCH_CHECK(terms >= 1 && terms <= 16, "fpxint: activation terms ", terms, "; accepted 1..16");
  core::IntLinear::ActSpec a;
  a.bits = static_cast<int>(bits);
  a.terms = static_cast<int>(terms);
  // Decided on the whole input, as fpxint::act_expand does (im2col may not see every element).
  a.unsigned_first = unsigned_first && x.numel() > 0 && x.min().item<float>() >= 0;
  a.truncate = truncate;
  const auto g = static_cast<ActGranularity>(granularity);
  a.per_tensor = g == ActGranularity::kTensor || g == ActGranularity::kSample;
  const int64_t blocks = SampleBlocks(g, x.dim(), x.dim() >= 1 ? x.size(0) : 1, rows);
  if (blocks > 1) a.rows_per_scale = rows / blocks;
  return a;
}

// fpxint::act_expand (the model layer's own activation expansion) on x.
at::Tensor ActExpand(const at::Tensor& x, int64_t bits, int64_t terms, core::Grid grid,
                     int64_t granularity, bool unsigned_first, core::Variant variant) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kActExpandOp, "")
          .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, bool,
                            int64_t)>();
  return op.call(x, bits, terms, static_cast<int64_t>(grid), granularity, unsigned_first,
                 static_cast<int64_t>(variant));
}

// The W×A ops' route for many activation rows when the integer products run as dot products
// (IntTakesDense): the activation's expansion (fpxint::act_expand[_terms], the model layer's
// own) times the packed weight's dequantized sums through the weight-only op `layer(xq, weight_terms, with_bias)`. Truncated: Σ_j
// (Σ_{i <= min(K_w', K+1-j)} W_i) X_j with K = max(K_w', K_a'), the bias once.
at::Tensor DenseWA(const at::Tensor& x, int kw, int64_t act_bits, int64_t act_terms,
                   bool unsigned_first, bool truncate, int64_t granularity,
                   const std::function<at::Tensor(const at::Tensor&, int, bool)>& layer) {
  const int64_t sym = static_cast<int64_t>(core::Grid::kSym);
  const int64_t kRescaled = static_cast<int64_t>(core::Variant::kRescaled);
  if (!truncate) {
    return layer(ActExpand(x, act_bits, act_terms, core::Grid::kSym, granularity, unsigned_first,
                           core::Variant::kRescaled),
                 kw, true);
  }
  static const auto expand_terms =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kActExpandTermsOp, "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, int64_t, int64_t, int64_t, int64_t,
                                         bool, int64_t)>();
  const std::vector<at::Tensor> xs =
      expand_terms.call(x, act_bits, act_terms, sym, granularity, unsigned_first, kRescaled);
  const int k_max = std::max<int>(kw, static_cast<int>(act_terms));
  at::Tensor y;
  for (int j = 1; j <= static_cast<int>(xs.size()); ++j) {
    const int nw = std::min(kw, k_max + 1 - j);
    if (nw < 1) continue;
    at::Tensor t = layer(xs[static_cast<size_t>(j - 1)], nw, j == 1);
    y = y.defined() ? y.add_(t) : t;
  }
  return y;
}

const core::IntLinear& IntOf(const PackedPtr& p, const char* op) {
  const core::IntLinear* iw = p->Int();
  TORCH_CHECK(iw != nullptr, op, ": ", p->int_error());
  return *iw;
}

at::Tensor LinearWA(const at::Tensor& x_in, const PackedPtr& p,
                    const c10::optional<at::Tensor>& bias, int64_t terms, int64_t act_bits,
                    int64_t act_terms, bool unsigned_first, bool truncate, int64_t granularity,
                    int64_t post_in, c10::IntArrayRef tail_ops, c10::ArrayRef<double> tail_values) {
  const core::IntLinear& iw = IntOf(p, "fpxint::linear_wa");
  const Post post = PostArgs(post_in, tail_ops, tail_values, "fpxint::linear_wa");
  const at::Tensor x = LinearInput(x_in, iw.in_features(), "fpxint::linear_wa");
  const int64_t m = x.numel() / iw.in_features();
  if (IntTakesDense(iw, m)) {
    const int kw = TermsArg(terms) == 0 ? p->w.terms() : TermsArg(terms);
    return ApplyPost(DenseWA(x, kw, act_bits, act_terms, unsigned_first, truncate, granularity,
                             [&](const at::Tensor& xq, int nw, bool with_bias) {
                               return Linear(xq, p, with_bias ? bias : c10::nullopt, nw);
                             }),
                     post, "fpxint::linear_wa");
  }
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = iw.out_features();
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor keep;
  const absl::Status s =
      iw.Forward(x.data_ptr<float>(), m, y.data_ptr<float>(),
                 ActArgs(x, m, act_bits, act_terms, unsigned_first, truncate, granularity),
                 TermsArg(terms), &AtenPool(), nullptr,
                 EpilogueOf(bias, iw.out_features(), post, &keep, "fpxint::linear_wa"));
  TORCH_CHECK(s.ok(), "fpxint::linear_wa: ", std::string(s.message()));
  return y;
}

// groups == 1; im2col rows are output pixels, so per-pixel scales (1x1) and per-tensor scales
// (stride 1: every input element is in some patch) are those of the whole input.
at::Tensor Conv2dWA(const at::Tensor& x_in, const PackedPtr& p,
                    const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                    int64_t terms, int64_t act_bits, int64_t act_terms, bool unsigned_first,
                    bool truncate, int64_t granularity, int64_t post_in,
                    c10::IntArrayRef tail_ops, c10::ArrayRef<double> tail_values) {
  const core::IntLinear& iw = IntOf(p, "fpxint::conv2d_wa");
  const Post post = PostArgs(post_in, tail_ops, tail_values, "fpxint::conv2d_wa");
  const std::vector<int64_t>& ws = p->shape;
  TORCH_CHECK(groups == 1, "fpxint::conv2d_wa: takes ungrouped 2-D convolutions");
  const ConvCall c = PrepareConv("fpxint::conv2d_wa", x_in, ws, groups, stride, padding,
                                 dilation);
  const auto g = static_cast<ActGranularity>(granularity);
  TORCH_CHECK((g == ActGranularity::kPixel && ws[2] == 1 && ws[3] == 1 && c.padding[0] == 0 &&
               c.padding[1] == 0) ||
                  ((g == ActGranularity::kTensor || g == ActGranularity::kSample) &&
                   c.stride[0] == 1 && c.stride[1] == 1),
              "fpxint::conv2d_wa: activation scales per pixel need a 1x1 convolution without "
              "padding, per tensor or per sample a stride of 1");
  if (IntTakesDense(iw, c.rows())) {
    const int kw = TermsArg(terms) == 0 ? p->w.terms() : TermsArg(terms);
    return c.Finish(ApplyPost(
        DenseWA(c.x, kw, act_bits, act_terms, unsigned_first, truncate, granularity,
                [&](const at::Tensor& xq, int nw, bool with_bias) {
                  return Conv2d(xq, p, with_bias ? bias : c10::nullopt, stride, padding, dilation,
                                groups, nw);
                }),
        post, "fpxint::conv2d_wa"));
  }
  const at::Tensor cols = c.Patches(ws);
  at::Tensor flat = at::empty({c.rows(), c.out}, c.x.options());
  at::Tensor keep;
  const absl::Status s =
      iw.Forward(cols.data_ptr<float>(), c.rows(), flat.data_ptr<float>(),
                 ActArgs(c.x, c.rows(), act_bits, act_terms, unsigned_first, truncate,
                         granularity),
                 TermsArg(terms), &AtenPool(), nullptr,
                 EpilogueOf(bias, c.out, post, &keep, "fpxint::conv2d_wa"));
  TORCH_CHECK(s.ok(), "fpxint::conv2d_wa: ", std::string(s.message()));
  return c.FromRows(flat, c10::nullopt);
}

// ---- Folded W×A: variant D weights and activations, every term product in one u8 × s8 product ----

// Whether a call runs the fold: all K_w terms (the fold holds them all) and K_a·b_a <= 8.
// Otherwise the layer's own expansion of x (variant D, grid mid, per row / pixel) times the packed
// weight's first K_w' terms, which is what the fold computes when it applies.
const core::FoldedIntLinear* FoldFor(const PackedPtr& p, int64_t terms, int64_t act_bits,
                                     int64_t act_terms, const char* op) {
  TORCH_CHECK(act_terms >= 1 && act_terms <= 16 && act_bits >= 1 && act_bits <= 8, op,
              ": activation bits ", act_bits, ", terms ", act_terms,
              "; accepted bits 1..8, terms 1..16");
  const int k = TermsArg(terms);
  if ((k != 0 && k != p->w.terms()) || act_bits * act_terms > 8) return nullptr;
  const core::FoldedIntLinear* f = p->Folded();
  TORCH_CHECK(f != nullptr, op, ": ", p->folded_error());
  return f;
}

at::Tensor ExpandDigits(const at::Tensor& x, int64_t act_bits, int64_t act_terms,
                        ActGranularity g) {
  return ActExpand(x, act_bits, act_terms, core::Grid::kMid, static_cast<int64_t>(g), false,
                   core::Variant::kDigits);
}

at::Tensor LinearFolded(const at::Tensor& x_in, const PackedPtr& p,
                        const c10::optional<at::Tensor>& bias, int64_t terms, int64_t act_bits,
                        int64_t act_terms, int64_t post_in, c10::IntArrayRef tail_ops,
                        c10::ArrayRef<double> tail_values) {
  const char* op = "fpxint::linear_folded";
  const Post post = PostArgs(post_in, tail_ops, tail_values, op);
  const at::Tensor x = LinearInput(x_in, p->w.in_features(), op);
  const core::FoldedIntLinear* f = FoldFor(p, terms, act_bits, act_terms, op);
  if (f == nullptr) {
    return ApplyPost(
        Linear(ExpandDigits(x, act_bits, act_terms, ActGranularity::kRow), p, bias, terms), post,
        op);
  }
  const int64_t m = x.numel() / p->w.in_features();
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = f->out_features();
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor keep;
  const absl::Status s = f->Forward(x.data_ptr<float>(), m, y.data_ptr<float>(),
                                    {static_cast<int>(act_bits), static_cast<int>(act_terms)},
                                    &AtenPool(), nullptr,
                                    EpilogueOf(bias, f->out_features(), post, &keep, op));
  TORCH_CHECK(s.ok(), op, ": ", std::string(s.message()));
  return y;
}

// Ungrouped 1x1 convolutions without padding: the output pixels are the rows, and per-pixel
// activation scales are the fold's per-row ones.
at::Tensor Conv2dFolded(const at::Tensor& x_in, const PackedPtr& p,
                        const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                        int64_t terms, int64_t act_bits, int64_t act_terms, int64_t post_in,
                        c10::IntArrayRef tail_ops, c10::ArrayRef<double> tail_values) {
  const char* op = "fpxint::conv2d_folded";
  const Post post = PostArgs(post_in, tail_ops, tail_values, op);
  const std::vector<int64_t>& ws = p->shape;
  TORCH_CHECK(groups == 1, op, ": takes ungrouped 2-D convolutions");
  const ConvCall c = PrepareConv(op, x_in, ws, groups, stride, padding, dilation);
  TORCH_CHECK(ws[2] == 1 && ws[3] == 1 && c.padding[0] == 0 && c.padding[1] == 0, op,
              ": takes 1x1 convolutions without padding (per-pixel activation scales)");
  const core::FoldedIntLinear* f = FoldFor(p, terms, act_bits, act_terms, op);
  if (f == nullptr) {
    return c.Finish(ApplyPost(Conv2d(ExpandDigits(c.x, act_bits, act_terms,
                                                  ActGranularity::kPixel),
                                     p, bias, stride, padding, dilation, groups, terms),
                              post, op));
  }
  const at::Tensor cols = c.Patches(ws);
  // Written as [N, out, OH·OW] by the product's epilogue: no transpose back.
  at::Tensor y = at::empty({c.n, c.out, c.oh, c.ow}, c.x.options());
  at::Tensor keep;
  const absl::Status s = f->Forward(cols.data_ptr<float>(), c.rows(), y.data_ptr<float>(),
                                    {static_cast<int>(act_bits), static_cast<int>(act_terms)},
                                    &AtenPool(), nullptr, EpilogueOf(bias, c.out, post, &keep, op),
                                    c.oh * c.ow);
  TORCH_CHECK(s.ok(), op, ": ", std::string(s.message()));
  return c.Finish(y);
}

// fpxint::post_: a packed layer's elementwise tail in one pass over y, in place.
at::Tensor& PostInPlace(at::Tensor& y, c10::IntArrayRef ops, c10::ArrayRef<double> values) {
  const char* op = "fpxint::post_";
  TORCH_CHECK(!ops.empty(), op, ": no steps; give 1..", core::kMaxPostSteps);
  ApplyTail(y, PostSteps(ops, values, op), op);
  return y;
}

at::Tensor DequantizeOp(const PackedPtr& p, int64_t terms) {
  return Dense(*p, TermsArg(terms)).clone();  // the caller keeps it: not the scratch buffer
}

}  // namespace

namespace {
std::atomic<int64_t>& MaxRows() {
  static std::atomic<int64_t> v(core::Runtime().packed_max_rows);
  return v;
}
}  // namespace

int64_t PackedMaxRows() { return MaxRows().load(std::memory_order_relaxed); }
void SetPackedMaxRows(int64_t rows) { MaxRows().store(rows, std::memory_order_relaxed); }

c10::IValue MakePackedWeight(core::LowbitLinear w, std::vector<int64_t> shape) {
  CheckShape(w, shape);
  return c10::IValue(c10::make_intrusive<PackedWeight>(std::move(w), std::move(shape)));
}

PackedWeightInfo InspectPackedWeight(const c10::IValue& v) {
  PackedWeightInfo info;
  if (!v.isObject() || v.type()->str() != kPackedWeightClass) return info;
  const PackedPtr p = v.toCustomClass<PackedWeight>();
  info.terms = p->w.terms();
  info.shape = p->shape;
  info.bytes = p->w.resident_bytes() + p->int_bytes();
  info.linear = &p->w;
  return info;
}

bool TakesFoldedOps(const c10::IValue& v) {
  return v.isObject() && v.type()->str() == kPackedWeightClass &&
         v.toCustomClass<PackedWeight>()->Folded() != nullptr;
}

bool TakesIntegerOps(const c10::IValue& v) {
  return v.isObject() && v.type()->str() == kPackedWeightClass &&
         v.toCustomClass<PackedWeight>()->Int() != nullptr;
}

TORCH_LIBRARY_FRAGMENT(fpxint, m) {
  m.class_<PackedWeight>("PackedWeight")
      .def("terms", [](const PackedPtr& p) { return static_cast<int64_t>(p->w.terms()); })
      .def("shape", [](const PackedPtr& p) { return p->shape; })
      .def("resident_bytes",
           [](const PackedPtr& p) { return static_cast<int64_t>(p->w.resident_bytes()); })
      .def_pickle([](const PackedPtr& p) { return GetState(p); },
                  [](PackedState s) { return SetState(std::move(s)); });
  m.def("linear(Tensor x, __torch__.torch.classes.fpxint.PackedWeight w, Tensor? bias, "
        "int terms) -> Tensor",
        &Linear);
  // act_*: the input's activation expansion inside the op (act_bits 0: none); tail_*: the
  // elementwise ops after it (as post_'s); defaults, so that networks saved before they existed
  // still load.
  m.def("conv2d(Tensor x, __torch__.torch.classes.fpxint.PackedWeight w, Tensor? bias, "
        "int[] stride, int[] padding, int[] dilation, int groups, int terms, int act_bits=0, "
        "int act_terms=0, int act_grid=0, int act_granularity=0, int act_variant=0, "
        "int[] tail_ops=[], float[] tail_values=[]) -> Tensor",
        &Conv2dOp);
  m.def("dequantize(__torch__.torch.classes.fpxint.PackedWeight w, int terms) -> Tensor",
        &DequantizeOp);
  m.def("linear_wa(Tensor x, __torch__.torch.classes.fpxint.PackedWeight w, Tensor? bias, "
        "int terms, int act_bits, int act_terms, bool unsigned_first, bool truncate, "
        "int granularity, int post=0, int[] tail_ops=[], float[] tail_values=[]) -> Tensor",
        &LinearWA);
  m.def("conv2d_wa(Tensor x, __torch__.torch.classes.fpxint.PackedWeight w, Tensor? bias, "
        "int[] stride, int[] padding, int[] dilation, int groups, int terms, int act_bits, "
        "int act_terms, bool unsigned_first, bool truncate, int granularity, int post=0, "
        "int[] tail_ops=[], float[] tail_values=[]) -> Tensor",
        &Conv2dWA);
  m.def("linear_folded(Tensor x, __torch__.torch.classes.fpxint.PackedWeight w, Tensor? bias, "
        "int terms, int act_bits, int act_terms, int post=0, int[] tail_ops=[], "
        "float[] tail_values=[]) -> Tensor",
        &LinearFolded);
  // A packed layer's following elementwise ops in one pass (model_graph.cc fuses them).
  m.def("post_(Tensor(a!) y, int[] ops, float[] values) -> Tensor(a!)", &PostInPlace);
  m.def("conv2d_folded(Tensor x, __torch__.torch.classes.fpxint.PackedWeight w, Tensor? bias, "
        "int[] stride, int[] padding, int[] dilation, int groups, int terms, int act_bits, "
        "int act_terms, int post=0, int[] tail_ops=[], float[] tail_values=[]) -> Tensor",
        &Conv2dFolded);
}

void EnsureLowbitOpsRegistered() {}

}  // namespace fpxint::model
