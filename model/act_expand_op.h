// File: model/act_expand_op.h
//
// The TorchScript operator fpxint::act_expand(Tensor x, int bits, int terms, int grid,
// bool per_row, bool unsigned_first) -> Tensor returns Σ_{j<=terms} of the activation's
// expansion terms (dynamic scales from x itself: per row of the last dim when per_row, else per
// tensor). Registered by linking fpxint_model; call EnsureActExpandOpRegistered() before using it
// from C++ so the linker keeps the registration.
#ifndef FPXINT_MODEL_ACT_EXPAND_OP_H_
#define FPXINT_MODEL_ACT_EXPAND_OP_H_

namespace fpxint::model {

inline constexpr char kActExpandOp[] = "fpxint::act_expand";
void EnsureActExpandOpRegistered();

}  // namespace fpxint::model

#endif  // FPXINT_MODEL_ACT_EXPAND_OP_H_
