#include "core/int_linear.h"

#include "core/runtime.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/kernels.h"
#include "core/packing.h"
#include "core/status_macros.h"

namespace fpxint::core {

// Defined in int_linear_avx2.cc / int_linear_avx512.cc (compiled with those ISAs).
const IntKernelTable& IntKernelsAvx2();
const IntKernelTable& IntKernelsAvx512Vnni();

namespace {

int64_t RoundUp(int64_t n) { return (n + kIntBlock - 1) / kIntBlock * kIntBlock; }

// Position q of a block in plane order -> the code index within the block.
inline int64_t PlaneCode(int64_t q, int bits) {
  const int64_t per = CodesPerByte(bits);
  if (per == 1) return q;
  const int64_t bytes = kIntBlock / per;
  return (q % bytes) * per + q / bytes;
}

// Position q of a block in group order (the many-row schedule's activations) -> the code index:
// per 8 codes, the even ones then the odd ones.
inline int64_t GroupCode(int64_t q) {
  const int64_t t = q & 7;
  return (q & ~int64_t{7}) + (t < 4 ? 2 * t : 2 * (t - 4) + 1);
}

inline int32_t Nibble(uint8_t v) { return v < 8 ? v : int32_t{v} - 16; }

}  // namespace

void UnpackIntRowRef(const uint8_t* packed, int64_t n, int bits, int8_t* out) {
  std::vector<int32_t> q(static_cast<size_t>(n));
  UnpackCodes(packed, n, bits, /*is_signed=*/true, q.data());
  const int64_t npad = RoundUp(n);
  for (int64_t b0 = 0; b0 < npad; b0 += kIntBlock) {
    for (int64_t p = 0; p < kIntBlock; ++p) {
      const int64_t c = b0 + PlaneCode(p, bits);
      out[b0 + p] = c < n ? static_cast<int8_t>(q[static_cast<size_t>(c)]) : 0;
    }
  }
}

namespace {

void DotTileRef(const int8_t* w, int64_t ldw, int R, const uint8_t* x, int64_t ldx, int B,
                int64_t n, int32_t* out) {
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) {
      int32_t s = 0;
      for (int64_t c = 0; c < n; ++c) s += int32_t{w[r * ldw + c]} * int32_t{x[b * ldx + c]};
      out[r * B + b] = s;
    }
  }
}

void GemmPanelRef(const uint8_t* panel, int64_t groups, const uint8_t* x, int64_t ldx, int B,
                  int32_t* out) {
  for (int b = 0; b < B; ++b) {
    for (int r = 0; r < kIntPanelRows; ++r) {
      int32_t s = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* w = panel + (g * kIntPanelRows + r) * 4;
        const uint8_t* xg = x + b * ldx + 8 * g;
        for (int q = 0; q < 4; ++q) {
          s += Nibble(w[q] & 0x0F) * int32_t{xg[q]} + Nibble(w[q] >> 4) * int32_t{xg[4 + q]};
        }
      }
      out[b * kIntPanelRows + r] = s;
    }
  }
}

void GemmPanelS8Ref(const int8_t* panel, int64_t groups, const uint8_t* x, int64_t ldx, int B,
                    int32_t* out) {
  for (int b = 0; b < B; ++b) {
    for (int r = 0; r < kIntPanelRows; ++r) {
      int32_t s = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const int8_t* w = panel + (g * kIntPanelRows + r) * 4;
        const uint8_t* xg = x + b * ldx + 4 * g;
        for (int q = 0; q < 4; ++q) s += int32_t{w[q]} * int32_t{xg[q]};
      }
      out[b * kIntPanelRows + r] = s;
    }
  }
}

void FoldedOutputsRef(const int32_t* acc, int R, const double* wpart, const double* ws,
                      double xpart, double sx, float* out) {
  for (int r = 0; r < R; ++r) {
    const double num = 4.0 * static_cast<double>(acc[r]) - wpart[r] + xpart;
    out[r] = static_cast<float>(ws[r] * sx * num * 0.25);
  }
}

void PostStepsImpl(const PostStep* steps, int n, float* out, int64_t count);  // below

constexpr IntKernelTable kRef = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  IntKernelTable t{};
  t.name = "ref";
  t.unpack_row = UnpackIntRowRef;
  t.dot_tile = DotTileRef;
  t.gemm_panel = GemmPanelRef;
  t.gemm_panel_s8 = GemmPanelS8Ref;
  t.folded_outputs = FoldedOutputsRef;
  t.post_steps = PostStepsImpl;
  return t;
}();

constexpr int kTile = 4;
constexpr int64_t kRowsPerTask = 16;

}  // namespace

const IntKernelTable* IntKernelsByName(absl::string_view name) {
  if (name == "ref") return &kRef;
  if (name == "avx2") return KernelsByName("avx2") != nullptr ? &IntKernelsAvx2() : nullptr;
  if (name == "avx512vnni") {
    return Cpu().avx512vnni ? &IntKernelsAvx512Vnni() : nullptr;
  }
  return nullptr;
}

const IntKernelTable& ActiveIntKernels() {
  static const IntKernelTable* t = [] {
    // The ISA family core::Runtime() chose for every kernel set.
    const Isa isa = Runtime().isa;
    if (isa == Isa::kAvx512) {
      if (const IntKernelTable* k = IntKernelsByName("avx512vnni")) return k;
    }
    if (isa == Isa::kAvx512 || isa == Isa::kAvx2) {
      if (const IntKernelTable* k = IntKernelsByName("avx2")) return k;
    }
    return &kRef;
  }();
  return *t;
}

absl::StatusOr<IntLinear> IntLinear::FromExpansion(const TensorExpansion& e) {
  if (e.terms.empty()) return absl::InvalidArgumentError("expansion has no terms");
  const ExpansionSpec& s = e.spec;
  if (s.grid != Grid::kSym || s.unsigned_first || s.scale == ScaleGranularity::kGroup ||
      s.bits < 2 || s.bits > 8) {
    return absl::InvalidArgumentError(
        "integer W×A kernels take sym-grid weights with tensor or channel scales and b in 2..8");
  }
  IntLinear w;
  w.bits_ = s.bits;
  w.rows_ = e.layout.rows;
  w.cols_ = e.layout.row_len;
  w.row_bytes_ = e.layout.packed_row_bytes;
  std::vector<int32_t> q(static_cast<size_t>(w.cols_));
  for (size_t k = 0; k < e.terms.size(); ++k) {
    const TermData& td = e.terms[k];
    if (static_cast<int64_t>(td.codes.size()) != w.rows_ * w.row_bytes_) {
      return absl::InvalidArgumentError(absl::StrCat("term ", k + 1, ": code buffer size"));
    }
    Term t;
    t.owned = td.codes;
    t.codes = t.owned.data();
    t.scale.resize(static_cast<size_t>(w.rows_));
    t.wsum.resize(static_cast<size_t>(w.rows_));
    for (int64_t o = 0; o < w.rows_; ++o) {
      const size_t si = s.scale == ScaleGranularity::kTensor ? 0 : static_cast<size_t>(o);
      if (si >= td.scale.size()) {
        return absl::InvalidArgumentError(absl::StrCat("term ", k + 1, ": too few scales"));
      }
      t.scale[static_cast<size_t>(o)] = td.scale[si];
      UnpackCodes(t.codes + o * w.row_bytes_, w.cols_, s.bits, true, q.data());
      int64_t sum = 0;
      for (int32_t v : q) sum += v;
      t.wsum[static_cast<size_t>(o)] = static_cast<int32_t>(sum);
    }
    w.terms_.push_back(std::move(t));
  }
  return w;
}

absl::StatusOr<IntLinear> IntLinear::ViewOf(const LowbitLinear& lw) {
  if (lw.terms() == 0) return absl::InvalidArgumentError("no terms");
  const int bits = lw.term(0).bits;
  if (lw.groups() != 1 || bits < 2 || bits > 8) {
    return absl::InvalidArgumentError(
        "integer W×A kernels take one weight scale per row and b in 2..8");
  }
  IntLinear w;
  w.bits_ = bits;
  w.rows_ = lw.out_features();
  w.cols_ = lw.in_features();
  w.row_bytes_ = lw.row_bytes();
  std::vector<int32_t> q(static_cast<size_t>(w.cols_));
  for (int k = 0; k < lw.terms(); ++k) {
    const LowbitLinear::TermView v = lw.term(k);
    if (!v.is_signed || v.bits != bits) {
      return absl::InvalidArgumentError("integer W×A kernels take signed (sym) weight codes");
    }
    Term t;
    t.codes = v.codes;
    t.scale.assign(v.scale, v.scale + w.rows_);
    t.wsum.resize(static_cast<size_t>(w.rows_));
    for (int64_t o = 0; o < w.rows_; ++o) {
      if (v.off[o] != 0.0f) {
        return absl::InvalidArgumentError("integer W×A kernels take sym-grid weights (offset 0)");
      }
      UnpackCodes(t.codes + o * w.row_bytes_, w.cols_, bits, true, q.data());
      int64_t sum = 0;
      for (int32_t c : q) sum += c;
      t.wsum[static_cast<size_t>(o)] = static_cast<int32_t>(sum);
    }
    w.terms_.push_back(std::move(t));
  }
  return w;
}

size_t IntLinear::resident_bytes() const {
  size_t n = 0;
  for (const Term& t : terms_) {
    n += t.owned.size() + t.scale.size() * 4 + t.wsum.size() * 4;
  }
  return n + panels_->bytes.load(std::memory_order_acquire);
}

bool IntLinear::UsesGemm(int64_t batch, const IntKernelTable* kernels) const {
  const IntKernelTable& kt = kernels != nullptr ? *kernels : ActiveIntKernels();
  const bool kernel = bits_ == 4 ? kt.gemm_panel != nullptr : kt.gemm_panel_s8 != nullptr;
  return kernel && batch >= kIntGemmMinRows;
}

namespace {

// In an array of weight panels with `groups` groups each: the offset of output row o's word in
// group 0 (group g's word is g·kIntPanelRows·4 bytes further), and, for s8 panels (4 inputs per
// word), the offset of input c from there.
int64_t PanelRowOffset(int64_t o, int64_t groups) {
  return (o / kIntPanelRows) * groups * kIntPanelRows * 4 + (o % kIntPanelRows) * 4;
}
int64_t S8PanelInput(int64_t c) { return (c / 4) * kIntPanelRows * 4 + c % 4; }

}  // namespace

const IntLinear::Panels& IntLinear::PanelsBuilt() const {
  absl::call_once(panels_->once, [this] {
    Panels& p = *panels_;
    const int64_t panels = (rows_ + kIntPanelRows - 1) / kIntPanelRows;
    if (bits_ != 4) {
      // Other widths: s8 panels (one code per byte, 4 inputs per word, natural order).
      p.groups = RoundUp(cols_) / 4;
      const size_t bytes = static_cast<size_t>(panels * p.groups * kIntPanelRows * 4);
      p.term.resize(terms_.size());
      std::vector<int32_t> q(static_cast<size_t>(cols_));
      for (size_t k = 0; k < terms_.size(); ++k) {
        std::vector<uint8_t>& out = p.term[k];
        out.assign(bytes, 0);
        for (int64_t o = 0; o < rows_; ++o) {
          UnpackCodes(terms_[k].codes + o * row_bytes_, cols_, bits_, true, q.data());
          uint8_t* dst = out.data() + PanelRowOffset(o, p.groups);
          for (int64_t c = 0; c < cols_; ++c) {
            dst[S8PanelInput(c)] =
                static_cast<uint8_t>(static_cast<int8_t>(q[static_cast<size_t>(c)]));
          }
        }
      }
      p.bytes.store(bytes * p.term.size(), std::memory_order_release);
      return;
    }
    p.groups = RoundUp(cols_) / 8;
    const size_t bytes = static_cast<size_t>(panels * p.groups * kIntPanelRows * 4);
    p.term.resize(terms_.size());
    for (size_t k = 0; k < terms_.size(); ++k) {
      std::vector<uint8_t>& out = p.term[k];
      out.assign(bytes, 0);  // rows past the last and codes past the row stay 0
      for (int64_t o = 0; o < rows_; ++o) {
        const uint8_t* row = terms_[k].codes + o * row_bytes_;
        uint8_t* dst = out.data() + PanelRowOffset(o, p.groups);
        for (int64_t g = 0; 4 * g < row_bytes_; ++g) {
          std::memcpy(dst + g * kIntPanelRows * 4, row + 4 * g,
                      static_cast<size_t>(std::min<int64_t>(4, row_bytes_ - 4 * g)));
        }
      }
      // A packed row of odd length ends on a high nibble that is not a code: clear it, so the
      // panels hold codes only (its activation is 0 anyway).
      if (cols_ % 2 != 0) {
        const int64_t g = (cols_ - 1) / 8, q = ((cols_ - 1) % 8) / 2;
        for (int64_t o = 0; o < rows_; ++o) {
          out[static_cast<size_t>(PanelRowOffset(o, p.groups) + g * kIntPanelRows * 4 + q)] &=
              0x0F;
        }
      }
    }
    p.bytes.store(bytes * p.term.size(), std::memory_order_release);
  });
  return *panels_;
}

namespace {

// The post steps as plain loops (the baseline build; the AVX-512 table has its own, same bits).
// Each step is one IEEE operation per value, in order (core builds with -ffp-contract=off), and
// max/min keep LibTorch's NaN and signed-zero results (max(y, 0) is (0 > y) ? 0 : y).
void PostStepImpl(const PostStep& st, float* __restrict out, int64_t n) {
  const float v = st.value;
  switch (st.op) {
    case PostOp::kNone: break;
    case PostOp::kRelu:
      for (int64_t r = 0; r < n; ++r) out[r] = std::max(out[r], 0.0f);
      break;
    case PostOp::kHardswish:  // x · min(max(x + 3, 0), 6) / 6, as at::hardswish
      for (int64_t r = 0; r < n; ++r) {
        out[r] = out[r] * std::min(std::max(out[r] + 3.0f, 0.0f), 6.0f) / 6.0f;
      }
      break;
    case PostOp::kMul:
      for (int64_t r = 0; r < n; ++r) out[r] = out[r] * v;
      break;
    case PostOp::kAdd:
      for (int64_t r = 0; r < n; ++r) out[r] = out[r] + v;
      break;
    case PostOp::kDiv:
      for (int64_t r = 0; r < n; ++r) out[r] = out[r] / v;
      break;
  }
}

// Blocks that stay in L1 while every step runs over them.
void PostStepsImpl(const PostStep* steps, int n, float* out, int64_t count) {
  constexpr int64_t kBlock = 2048;
  for (int64_t b0 = 0; b0 < count; b0 += kBlock) {
    const int64_t m = std::min(kBlock, count - b0);
    for (int i = 0; i < n; ++i) PostStepImpl(steps[i], out + b0, m);
  }
}

}  // namespace

void ApplyPostSteps(const PostStep* steps, int n, float* out, int64_t count) {
  const IntKernelTable& kt = ActiveIntKernels();
  (kt.post_steps != nullptr ? kt.post_steps : PostStepsImpl)(steps, n, out, count);
}

void Epilogue::ApplyElementwiseTo(float* out, int64_t n) const {
  PostStep steps[kMaxPostSteps + 1];
  int k = 0;
  if (op != PostOp::kNone) steps[k++] = PostStep{op, 0.0f};
  for (int i = 0; i < tail_steps && k <= kMaxPostSteps; ++i) steps[k++] = tail[i];
  ApplyPostSteps(steps, k, out, n);
}

namespace {

// Activation rows per panel product: `batch` split into the fewest blocks of at most
// kIntGemmRows, as even as possible (20 rows: 7, 7, 6 rather than 8, 8, 4).
int64_t GemmBlockRows(int64_t batch) {
  const int64_t blocks = (batch + kIntGemmRows - 1) / kIntGemmRows;
  return (batch + blocks - 1) / blocks;
}

}  // namespace

void IntLinear::ForwardGemm(const IntKernelTable& kt, int64_t batch, int64_t npad,
                            const std::vector<std::pair<int, int>>& pairs,
                            const std::vector<std::vector<uint8_t>>& xu,
                            const std::vector<std::vector<float>>& sx,
                            const std::vector<int32_t>& bias, float* y, ThreadPool* pool,
                            const Epilogue& post) const {
  const Panels& pn = PanelsBuilt();
  const int64_t panel_bytes = pn.groups * kIntPanelRows * 4;
  const int64_t panels = (rows_ + kIntPanelRows - 1) / kIntPanelRows;
  auto run = [&](int64_t q) {
    const int64_t o0 = q * kIntPanelRows;
    const int R = static_cast<int>(std::min<int64_t>(kIntPanelRows, rows_ - o0));
    std::vector<int32_t> acc(pairs.size() * kIntGemmRows * kIntPanelRows);
    // Per pair, the weight-side epilogue terms of this panel: scale and bias · Σ codes.
    std::vector<float> ws(pairs.size() * kIntPanelRows, 0.0f);
    std::vector<int32_t> bw(pairs.size() * kIntPanelRows, 0);
    for (size_t p = 0; p < pairs.size(); ++p) {
      const auto [i, j] = pairs[p];
      const Term& t = terms_[static_cast<size_t>(i)];
      for (int r = 0; r < R; ++r) {
        ws[p * kIntPanelRows + r] = t.scale[static_cast<size_t>(o0 + r)];
        bw[p * kIntPanelRows + r] = bias[static_cast<size_t>(j)] * t.wsum[static_cast<size_t>(o0 + r)];
      }
    }
    const int64_t block = GemmBlockRows(batch);
    for (int64_t b0 = 0; b0 < batch; b0 += block) {
      const int B = static_cast<int>(std::min<int64_t>(block, batch - b0));
      for (size_t p = 0; p < pairs.size(); ++p) {
        const auto [i, j] = pairs[p];
        const uint8_t* panel = pn.term[static_cast<size_t>(i)].data() + q * panel_bytes;
        int32_t* out = acc.data() + p * kIntGemmRows * kIntPanelRows;
        const uint8_t* x = xu[static_cast<size_t>(j)].data() + b0 * npad;
        if (bits_ == 4) {
          kt.gemm_panel(panel, pn.groups, x, npad, B, out);
        } else {
          kt.gemm_panel_s8(reinterpret_cast<const int8_t*>(panel), pn.groups, x, npad, B, out);
        }
      }
      // The dot schedule's epilogue, element for element: Σ_p (sw·sx)·(acc − bias·Σw) in pair
      // order, so both schedules give the same bits; the elementwise op and tail once per tile.
      float tile[kIntGemmRows * kIntPanelRows];
      for (int b = 0; b < B; ++b) {
        float* s = tile + b * kIntPanelRows;
        std::fill(s, s + kIntPanelRows, 0.0f);
        for (size_t p = 0; p < pairs.size(); ++p) {
          const float xs = sx[static_cast<size_t>(pairs[p].second)][static_cast<size_t>(b0 + b)];
          const int32_t* a = acc.data() + (p * kIntGemmRows + b) * kIntPanelRows;
          const float* w = ws.data() + p * kIntPanelRows;
          const int32_t* c = bw.data() + p * kIntPanelRows;
          for (int r = 0; r < kIntPanelRows; ++r) {
            s[r] += w[r] * xs * static_cast<float>(a[r] - c[r]);
          }
        }
        post.ApplyBias(o0, R, s);
      }
      post.ApplyElementwise(tile, B * kIntPanelRows);  // lanes past R: computed, not stored
      for (int b = 0; b < B; ++b) {
        std::memcpy(y + (b0 + b) * rows_ + o0, tile + b * kIntPanelRows,
                    static_cast<size_t>(R) * sizeof(float));
      }
    }
  };
  RunTasks(pool, panels, run);
}

absl::Status IntLinear::Forward(const float* x, int64_t batch, float* y, const ActSpec& act,
                                int weight_terms, ThreadPool* pool,
                                const IntKernelTable* kernels, const Epilogue& post) const {
  if (act.bits < 2 || act.bits > 8 || act.terms < 1 || act.terms > 16) {
    return absl::InvalidArgumentError(absl::StrCat("activation bits ", act.bits, ", terms ",
                                                   act.terms, "; accepted bits 2..8, terms 1..16"));
  }
  if (static_cast<double>(cols_) * ((1 << act.bits) - 1) * (1 << (bits_ - 1)) >= 2147483648.0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "in_features ", cols_, " at ", act.bits, "x", bits_, " bits could overflow int32 sums"));
  }
  if (batch <= 0) return absl::OkStatus();
  const IntKernelTable& kt = kernels != nullptr ? *kernels : ActiveIntKernels();
  const int K = weight_terms <= 0 || weight_terms > terms() ? terms() : weight_terms;
  const int64_t npad = RoundUp(cols_);

  // Dynamic activation expansion: one scale per row, or one per block of rows (per tensor),
  // each block expanded on its own.
  const int64_t block =
      !act.per_tensor ? batch
      : act.rows_per_scale > 0 && act.rows_per_scale < batch ? act.rows_per_scale
                                                            : batch;
  if (batch % block != 0) {
    return absl::InvalidArgumentError(absl::StrCat("rows_per_scale ", act.rows_per_scale,
                                                   " does not divide the ", batch, " rows"));
  }
  ExpansionSpec as;
  as.bits = act.bits;
  as.terms = act.terms;
  as.grid = Grid::kSym;
  as.scale = batch > 1 && !act.per_tensor ? ScaleGranularity::kChannel : ScaleGranularity::kTensor;
  as.unsigned_first =
      act.unsigned_first && std::all_of(x, x + batch * cols_, [](float v) { return v >= 0; });
  ExpandOptions eo;
  eo.pool = pool;
  std::vector<TensorExpansion> blocks;
  for (int64_t b0 = 0; b0 < batch; b0 += block) {
    const auto bytes =
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(x + b0 * cols_),
                            static_cast<size_t>(block * cols_) * sizeof(float));
    FPX_ASSIGN_OR_RETURN(TensorExpansion ex,
                         ExpandTensor(DType::kF32, {block, cols_}, bytes, as, eo));
    blocks.push_back(std::move(ex));
  }
  const int Ka = static_cast<int>(blocks[0].terms.size());
  // Activation codes as u8 (signed codes + 2^(b-1)), plane order, zero padding.
  std::vector<std::vector<uint8_t>> xu(static_cast<size_t>(Ka));
  std::vector<std::vector<float>> sx(static_cast<size_t>(Ka));
  std::vector<int32_t> bias(static_cast<size_t>(Ka));
  // Block position -> code index: plane order for the dot schedule (this weight width), group
  // order for the panel product.
  const bool gemm = UsesGemm(batch, &kt);
  int64_t plane[kIntBlock];
  for (int64_t p = 0; p < kIntBlock; ++p) {
    plane[p] = !gemm ? PlaneCode(p, bits_) : bits_ == 4 ? GroupCode(p) : p;  // s8 panels: natural
  }
  for (int j = 0; j < Ka; ++j) {
    const bool is_unsigned = as.term_is_unsigned(j + 1);
    bias[static_cast<size_t>(j)] = is_unsigned ? 0 : 1 << (act.bits - 1);
    xu[static_cast<size_t>(j)].assign(static_cast<size_t>(batch * npad), 0);
    sx[static_cast<size_t>(j)].resize(static_cast<size_t>(batch));
  }
  // One activation row per task: all its terms' codes, biased, in plane order.
  auto prepare_row = [&](int64_t b) {
    const TensorExpansion& ex = blocks[static_cast<size_t>(b / block)];
    const int64_t lb = b % block;  // the row within its block
    const size_t si = as.scale == ScaleGranularity::kTensor ? 0 : static_cast<size_t>(lb);
    if (gemm && bits_ == 4 && act.bits == 4) {
      // Group order straight from the packed row: the 4 bytes of codes 8g..8g+7 give their low
      // nibbles (even codes) then their high ones (odd codes); a signed nibble plus its bias 8
      // is the nibble with bit 3 flipped.
      for (int j = 0; j < Ka; ++j) {
        const uint8_t* src = ex.terms[j].codes.data() + lb * ex.layout.packed_row_bytes;
        uint8_t* row = xu[static_cast<size_t>(j)].data() + b * npad;
        const uint32_t flip = bias[static_cast<size_t>(j)] == 0 ? 0 : 0x08080808u;
        const int64_t full = cols_ / 8;
        for (int64_t g = 0; g < full; ++g) {
          uint32_t v;
          std::memcpy(&v, src + 4 * g, 4);
          const uint32_t lo = (v & 0x0F0F0F0Fu) ^ flip, hi = ((v >> 4) & 0x0F0F0F0Fu) ^ flip;
          std::memcpy(row + 8 * g, &lo, 4);
          std::memcpy(row + 8 * g + 4, &hi, 4);
        }
        for (int64_t c = 8 * full; c < cols_; ++c) {
          const uint32_t nib = (src[c / 2] >> (4 * (c % 2))) & 0x0Fu;
          const int64_t t = c - 8 * full;
          row[8 * full + (t % 2 != 0 ? 4 + t / 2 : t / 2)] = static_cast<uint8_t>(nib ^ (flip & 0x0F));
        }
        sx[static_cast<size_t>(j)][static_cast<size_t>(b)] = ex.terms[j].scale[si];
      }
      return;
    }
    std::vector<int32_t> q(static_cast<size_t>(cols_));
    for (int j = 0; j < Ka; ++j) {
      const bool is_unsigned = bias[static_cast<size_t>(j)] == 0;
      UnpackCodes(ex.terms[j].codes.data() + lb * ex.layout.packed_row_bytes, cols_, act.bits,
                  !is_unsigned, q.data());
      uint8_t* row = xu[static_cast<size_t>(j)].data() + b * npad;
      const int32_t bj = bias[static_cast<size_t>(j)];
      int64_t b0 = 0;
      for (; b0 + kIntBlock <= cols_; b0 += kIntBlock) {
        for (int64_t p = 0; p < kIntBlock; ++p) {
          row[b0 + p] = static_cast<uint8_t>(q[static_cast<size_t>(b0 + plane[p])] + bj);
        }
      }
      for (int64_t p = 0; b0 < cols_ && p < kIntBlock; ++p) {
        const int64_t c = b0 + plane[p];
        if (c < cols_) row[b0 + p] = static_cast<uint8_t>(q[static_cast<size_t>(c)] + bj);
      }
      sx[static_cast<size_t>(j)][static_cast<size_t>(b)] = ex.terms[j].scale[si];
    }
  };
  RunTasks(pool, batch, prepare_row);
  // The products to run, in a fixed order (the epilogue sums them in this order).
  std::vector<std::pair<int, int>> pairs;
  const int k_max = std::max(K, Ka);
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < Ka; ++j) {
      if (!act.truncate || (i + 1) + (j + 1) <= k_max + 1) pairs.emplace_back(i, j);
    }
  }
  if (gemm) {
    ForwardGemm(kt, batch, npad, pairs, xu, sx, bias, y, pool, post);
    return absl::OkStatus();
  }
  const int64_t tasks = (rows_ + kRowsPerTask - 1) / kRowsPerTask;
  auto run = [&](int64_t task) {
    const int64_t r0 = task * kRowsPerTask, r1 = std::min(rows_, r0 + kRowsPerTask);
    std::vector<int8_t> wbuf(static_cast<size_t>(K * kTile * npad));
    std::vector<int32_t> acc(pairs.size() * kTile * kTile);
    for (int64_t o0 = r0; o0 < r1; o0 += kTile) {
      const int R = static_cast<int>(std::min<int64_t>(kTile, r1 - o0));
      for (int i = 0; i < K; ++i) {
        for (int r = 0; r < R; ++r) {
          kt.unpack_row(terms_[static_cast<size_t>(i)].codes + (o0 + r) * row_bytes_, cols_,
                        bits_, wbuf.data() + (i * kTile + r) * npad);
        }
      }
      for (int64_t b0 = 0; b0 < batch; b0 += kTile) {
        const int B = static_cast<int>(std::min<int64_t>(kTile, batch - b0));
        for (size_t p = 0; p < pairs.size(); ++p) {
          const auto [i, j] = pairs[p];
          kt.dot_tile(wbuf.data() + i * kTile * npad, npad, R,
                      xu[static_cast<size_t>(j)].data() + b0 * npad, npad, B, npad,
                      acc.data() + p * kTile * kTile);
        }
        for (int r = 0; r < R; ++r) {
          const int64_t o = o0 + r;
          // Pairs outside, the tile's activation rows inside: B independent sums (each still
          // adds its pairs in order, so the same bits) instead of one dependent chain.
          float s[kTile] = {0, 0, 0, 0};
          for (size_t p = 0; p < pairs.size(); ++p) {
            const auto [i, j] = pairs[p];
            const Term& t = terms_[static_cast<size_t>(i)];
            const float ws = t.scale[static_cast<size_t>(o)];
            const int64_t bw =
                int64_t{bias[static_cast<size_t>(j)]} * t.wsum[static_cast<size_t>(o)];
            const int32_t* a = acc.data() + p * kTile * kTile + r * B;
            const float* xs = sx[static_cast<size_t>(j)].data() + b0;
            for (int b = 0; b < B; ++b) {
              s[b] += ws * xs[b] * static_cast<float>(int64_t{a[b]} - bw);
            }
          }
          for (int b = 0; b < B; ++b) {
            post.ApplyBias(o, 1, &s[b]);
            y[(b0 + b) * rows_ + o] = s[b];
          }
        }
      }
    }
    // The elementwise op and tail once per activation row over this task's outputs.
    for (int64_t b = 0; b < batch; ++b) post.ApplyElementwise(y + b * rows_ + r0, r1 - r0);
  };
  RunTasks(pool, tasks, run);
  return absl::OkStatus();
}

// ---- FoldedIntLinear ----

namespace {

// Σ_k 2^{b(K−1−k)}: the weight of the +½ of every digit of a folded mid-grid code.
int64_t DigitSum(int bits, int terms) {
  int64_t s = 0;
  for (int k = 0; k < terms; ++k) s = (s << bits) + 1;
  return s;
}

}  // namespace

absl::StatusOr<FoldedIntLinear> FoldedIntLinear::FromExpansion(const TensorExpansion& e) {
  const ExpansionSpec& s = e.spec;
  const int K = static_cast<int>(e.terms.size());
  if (K == 0 || s.variant != Variant::kDigits || s.grid != Grid::kMid ||
      s.scale == ScaleGranularity::kGroup || s.bits * K > 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "folded W×A takes variant D (grid mid) weights with tensor or channel scales and K·b <= 8; "
        "got ", s.ToString(), " with ", K, " terms"));
  }
  const TermData& last = e.terms.back();
  const size_t need = s.scale == ScaleGranularity::kTensor ? 1 : static_cast<size_t>(e.layout.rows);
  if (last.scale.size() < need) return absl::InvalidArgumentError("too few scales");
  return Build(e.layout.rows, e.layout.row_len, s.bits, K, e.layout.packed_row_bytes,
               [&](int k) { return e.terms[static_cast<size_t>(k)].codes.data(); },
               [&](int64_t o) {
                 return last.scale[s.scale == ScaleGranularity::kTensor ? 0 : static_cast<size_t>(o)];
               });
}

absl::StatusOr<FoldedIntLinear> FoldedIntLinear::FromLowbit(const LowbitLinear& lw) {
  const int K = lw.terms();
  if (K == 0) return absl::InvalidArgumentError("no terms");
  const int bits = lw.term(0).bits;
  if (lw.groups() != 1 || bits * K > 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "folded W×A takes one weight scale per row and K·b <= 8; got ", K, " terms of ", bits,
        " bits", lw.groups() != 1 ? " with group scales" : ""));
  }
  const int64_t rows = lw.out_features();
  for (int k = 0; k < K; ++k) {
    const LowbitLinear::TermView v = lw.term(k);
    if (!v.is_signed || v.bits != bits) {
      return absl::InvalidArgumentError("folded W×A takes signed codes of one width");
    }
    for (int64_t o = 0; o < rows; ++o) {
      // Variant D on the mid grid: offset ½ and s_{k+1} = s_k / 2^b, exactly (a power of two).
      if (v.off[o] != 0.5f) {
        return absl::InvalidArgumentError("folded W×A takes mid-grid weight codes (offset ½)");
      }
      // One exception: when s_k / 2^b falls below the normal floats the expansion rounds it up
      // to a subnormal, and the fold takes 2^b·s_{k+1} for s_k, larger by less than 2^(b−149).
      // Such rows hold weights below 2^b·FLT_MIN in magnitude (dead channels); each of their
      // weight elements changes by less than 2^(2b−150) per term.
      if (k == 0) continue;
      const float prev = lw.term(k - 1).scale[o];
      const double exact = std::ldexp(static_cast<double>(prev), -bits);
      const bool rounded_up_subnormal =
          exact < FLT_MIN && v.scale[o] >= exact && v.scale[o] - exact < 0x1p-149;
      if (v.scale[o] * static_cast<float>(1 << bits) != prev && !rounded_up_subnormal) {
        return absl::InvalidArgumentError(absl::StrCat(
            "folded W×A takes variant D weights (s_{k+1} = s_k / 2^b); row ", o, " term ", k + 1,
            " has scale ", v.scale[o], " after ", prev));
      }
    }
  }
  const float* last = lw.term(K - 1).scale;
  return Build(rows, lw.in_features(), bits, K, lw.row_bytes(),
               [&](int k) { return lw.term(k).codes; }, [&](int64_t o) { return last[o]; });
}

FoldedIntLinear FoldedIntLinear::Build(int64_t rows, int64_t cols, int bits, int K,
                                       int64_t row_bytes,
                                       const std::function<const uint8_t*(int)>& codes,
                                       const std::function<float(int64_t)>& last_scale) {
  FoldedIntLinear w;
  w.code_bits_ = bits * K;
  w.rows_ = rows;
  w.cols_ = cols;
  w.groups_ = RoundUp(w.cols_) / 4;
  const int64_t panels = (w.rows_ + kIntPanelRows - 1) / kIntPanelRows;
  w.panels_.assign(static_cast<size_t>(panels * w.groups_ * kIntPanelRows * 4), 0);
  w.scale_.resize(static_cast<size_t>(w.rows_));
  w.fsum_.resize(static_cast<size_t>(w.rows_));
  w.zw2_ = (int64_t{1} << w.code_bits_) - 257;
  const int64_t shift = (int64_t{1} << (bits - 1)) * DigitSum(bits, K) - 128;
  std::vector<int32_t> q(static_cast<size_t>(w.cols_));
  std::vector<int64_t> f(static_cast<size_t>(w.cols_));
  for (int64_t o = 0; o < w.rows_; ++o) {
    std::fill(f.begin(), f.end(), 0);
    for (int k = 0; k < K; ++k) {
      UnpackCodes(codes(k) + o * row_bytes, w.cols_, bits, true, q.data());
      // Digits of a signed number: multiply (a left shift of a negative value is undefined).
      const int64_t radix = int64_t{1} << bits;
      for (int64_t c = 0; c < w.cols_; ++c) f[c] = f[c] * radix + q[static_cast<size_t>(c)];
    }
    w.scale_[static_cast<size_t>(o)] = last_scale(o);
    int64_t sum = 0;
    int8_t* dst = w.panels_.data() + PanelRowOffset(o, w.groups_);
    for (int64_t c = 0; c < w.cols_; ++c) {
      const int64_t v = f[static_cast<size_t>(c)] + shift;  // in [-128, 127] by construction
      sum += v;
      dst[S8PanelInput(c)] = static_cast<int8_t>(v);
    }
    w.fsum_[static_cast<size_t>(o)] = sum;
  }
  return w;
}

size_t FoldedIntLinear::resident_bytes() const {
  return panels_.size() + scale_.size() * sizeof(float) + fsum_.size() * sizeof(int64_t);
}

int64_t FoldedIntLinear::Numerator(int64_t o, int32_t acc, int64_t usum, int64_t zx2) const {
  return 4 * int64_t{acc} - 2 * zx2 * fsum_[static_cast<size_t>(o)] - 2 * zw2_ * usum +
         cols_ * zw2_ * zx2;
}

absl::Status FoldedIntLinear::Run(const float* x, int64_t batch, const ActSpec& act,
                                  ThreadPool* pool, const IntKernelTable* kernels,
                                  const TileFn& emit) const {
  if (act.bits < 1 || act.terms < 1 || act.bits * act.terms > 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "activation bits ", act.bits, ", terms ", act.terms, "; folded W×A takes bits·terms <= 8"));
  }
  if (cols_ > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("in_features ", cols_, ": folded int32 sums take at most 65536 inputs"));
  }
  if (batch <= 0) return absl::OkStatus();
  const IntKernelTable& kt = kernels != nullptr ? *kernels : ActiveIntKernels();
  // Kernels without an s8 panel product (AVX2) run the reference one: same integers.
  const auto gemm = kt.gemm_panel_s8 != nullptr ? kt.gemm_panel_s8 : IntKernelsByName("ref")->gemm_panel_s8;
  ExpandOptions eo;
  eo.pool = pool;
  const int Ka = act.terms;
  const int64_t ldx = groups_ * 4;
  const int64_t zx2 = (int64_t{1} << (act.bits * Ka)) - 1;
  std::unique_ptr<uint8_t[]> xu(new uint8_t[static_cast<size_t>(batch * ldx)]);
  std::vector<int64_t> usum(static_cast<size_t>(batch));
  std::vector<float> sx(static_cast<size_t>(batch));
  // Each row's codes (variant D, mid grid, one scale per row) straight into its folded byte
  // U = Σ_j 2^{b(K_a−j)}·C_j + 2^{b−1}·Σ_j 2^{b(K_a−j)}; the padding to whole groups of 4
  // inputs holds zeros.
  if (ldx > cols_) {
    for (int64_t b = 0; b < batch; ++b) {
      std::memset(xu.get() + b * ldx + cols_, 0, static_cast<size_t>(ldx - cols_));
    }
  }
  FPX_RETURN_IF_ERROR(ExpandRowFoldedF32(x, batch, cols_, act.bits, Ka, eo, xu.get(), ldx,
                                         usum.data(), sx.data()));
  const int64_t panels = (rows_ + kIntPanelRows - 1) / kIntPanelRows;
  const int64_t panel_bytes = groups_ * kIntPanelRows * 4;
  RunTasks(pool, panels, [&](int64_t q) {
    const int64_t o0 = q * kIntPanelRows;
    const int R = static_cast<int>(std::min<int64_t>(kIntPanelRows, rows_ - o0));
    int32_t acc[kIntGemmRows * kIntPanelRows];
    const int64_t block = GemmBlockRows(batch);
    for (int64_t b0 = 0; b0 < batch; b0 += block) {
      const int B = static_cast<int>(std::min<int64_t>(block, batch - b0));
      gemm(panels_.data() + q * panel_bytes, groups_, xu.get() + b0 * ldx, ldx, B, acc);
      emit(Tile{b0, B, o0, R, acc, usum.data() + b0, sx.data() + b0, zx2});
    }
  });
  return absl::OkStatus();
}

void FoldedIntLinear::Outputs(const Tile& t, const Epilogue& post, const IntKernelTable& kt,
                              float* out) const {
  // The numerator 4·acc − 2·zx2·ΣF − 2·zw2·ΣU + n·zw2·zx2 in doubles: every term and partial sum
  // is an integer below 2^53, so these are Numerator's values exactly.
  const auto outputs = kt.folded_outputs != nullptr ? kt.folded_outputs : FoldedOutputsRef;
  double wpart[kIntPanelRows], ws[kIntPanelRows];
  for (int r = 0; r < t.R; ++r) {
    wpart[r] = static_cast<double>(2 * t.zx2 * fsum_[static_cast<size_t>(t.o0 + r)]);
    ws[r] = static_cast<double>(scale_[static_cast<size_t>(t.o0 + r)]);
  }
  for (int b = 0; b < t.B; ++b) {
    float* o = out + b * kIntPanelRows;
    outputs(t.acc + b * kIntPanelRows, t.R, wpart, ws,
            static_cast<double>(cols_ * zw2_ * t.zx2 - 2 * zw2_ * t.usum[b]), t.sx[b], o);
    post.ApplyBias(t.o0, t.R, o);
    if (t.R < kIntPanelRows) post.ApplyElementwise(o, t.R);
  }
  // A full panel: the elementwise op and tail once over the tile's B rows.
  if (t.R == kIntPanelRows) post.ApplyElementwise(out, t.B * kIntPanelRows);
}

absl::Status FoldedIntLinear::Forward(const float* x, int64_t batch, float* y,
                                      const ActSpec& act, ThreadPool* pool,
                                      const IntKernelTable* kernels, const Epilogue& post,
                                      int64_t rows_per_image) const {
  if (rows_per_image < 0 || (rows_per_image > 0 && batch % rows_per_image != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("rows_per_image ", rows_per_image,
                                                   " does not divide ", batch, " rows"));
  }
  const IntKernelTable& kt = kernels != nullptr ? *kernels : ActiveIntKernels();
  return Run(x, batch, act, pool, &kt, [&](const Tile& t) {
    float v[kIntGemmRows * kIntPanelRows];
    Outputs(t, post, kt, v);
    if (rows_per_image == 0) {
      for (int b = 0; b < t.B; ++b) {
        std::memcpy(y + (t.b0 + b) * rows_ + t.o0, v + b * kIntPanelRows,
                    static_cast<size_t>(t.R) * sizeof(float));
      }
      return;
    }
    // [images, out, rows_per_image]: each output feature's B values are adjacent unless the
    // tile straddles two images.
    const int64_t image = t.b0 / rows_per_image, p = t.b0 % rows_per_image;
    if (p + t.B <= rows_per_image) {
      float* dst = y + (image * rows_ + t.o0) * rows_per_image + p;
      for (int r = 0; r < t.R; ++r) {
        for (int b = 0; b < t.B; ++b) dst[r * rows_per_image + b] = v[b * kIntPanelRows + r];
      }
      return;
    }
    for (int b = 0; b < t.B; ++b) {
      const int64_t row = t.b0 + b, im = row / rows_per_image, q = row % rows_per_image;
      float* dst = y + (im * rows_ + t.o0) * rows_per_image + q;
      for (int r = 0; r < t.R; ++r) dst[r * rows_per_image] = v[b * kIntPanelRows + r];
    }
  });
}

absl::Status FoldedIntLinear::ForwardIntegers(const float* x, int64_t batch, int64_t* out,
                                              const ActSpec& act, ThreadPool* pool,
                                              const IntKernelTable* kernels) const {
  return Run(x, batch, act, pool, kernels, [&](const Tile& t) {
    for (int b = 0; b < t.B; ++b) {
      for (int r = 0; r < t.R; ++r) {
        out[(t.b0 + b) * rows_ + t.o0 + r] =
            Numerator(t.o0 + r, t.acc[b * kIntPanelRows + r], t.usum[b], t.zx2);
      }
    }
  });
}

}  // namespace fpxint::core
