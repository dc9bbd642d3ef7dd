// File: model/act_expand_op.h
//
// The TorchScript operator fpxint::act_expand(Tensor x, int bits, int terms, int grid,
// int granularity, bool unsigned_first, int variant=0) -> Tensor returns Σ_{j<=terms} of the activation's
// expansion terms (dynamic scales from x itself, grouped by `granularity`, an ActGranularity).
// fpxint::act_expand_terms(...) -> Tensor[] returns the terms themselves (dequantized, term j at
// index j-1), for order-truncated products. Registered by linking fpxint_model; call
// EnsureActExpandOpRegistered() before using it from C++ so the linker keeps the registration.
#ifndef FPXINT_MODEL_ACT_EXPAND_OP_H_
#define FPXINT_MODEL_ACT_EXPAND_OP_H_

#include <cstdint>

namespace fpxint::model {

// Where the dynamic activation scales live. Each choice keeps the scale factorable out of the
// layer's integer product, so the low-bit kernels can apply it to the int32 accumulator:
enum class ActGranularity : int {
  kTensor = 0,   // one scale for the tensor (any layer)
  kRow = 1,      // one per row of the last dim: tokens of linear / matmul
  kPixel = 2,    // one per (n, h, w) over the channels of NCHW: 1x1 convolutions
  kChannel = 3,  // one per (n, c) over H x W of NCHW: depthwise convolutions
  kSample = 4,   // one per sample (slice of the first dim), each expanded on its own: other
                 // convolutions, so that a sample's result does not depend on its batch
};

// How many per-sample blocks `rows` activation rows of a tensor whose first dimension is
// `samples` (of `dims` dimensions) split into under `g`: x.size(0) for kSample when that divides
// the rows, else 1 (one block: the whole tensor). fpxint::act_expand and the W×A ops both ask.
inline int64_t SampleBlocks(ActGranularity g, int64_t dims, int64_t samples, int64_t rows) {
  return g == ActGranularity::kSample && dims >= 2 && samples > 1 && rows % samples == 0 ? samples
                                                                                        : 1;
}

inline constexpr char kActExpandOp[] = "fpxint::act_expand";
inline constexpr char kActExpandTermsOp[] = "fpxint::act_expand_terms";
void EnsureActExpandOpRegistered();

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_ACT_EXPAND_OP_H_
