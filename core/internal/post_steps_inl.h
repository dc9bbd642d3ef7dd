// File: core/internal/post_steps_inl.h
//
// The elementwise post steps of core/int_linear.h (PostStep), as plain loops each kernel variant
// compiles with its own instruction set (int_linear.cc: the baseline; int_linear_avx512.cc:
// AVX-512). Every variant computes the same floats: each step is one IEEE operation per value
// in order (core builds with -ffp-contract=off), and max/min keep LibTorch's NaN and signed-zero
// results (max(y, 0) is (0 > y) ? 0 : y).
#ifndef FPXINT_CORE_INTERNAL_POST_STEPS_INL_H_
#define FPXINT_CORE_INTERNAL_POST_STEPS_INL_H_

#include <algorithm>
#include <cstdint>

#include "core/int_linear.h"

namespace fpxint::core::internal {

// Internal linkage: each translation unit keeps the copy its own instruction set compiled (one
// shared inline definition would leave the linker free to pick either).
namespace {

inline void PostStepImpl(const PostStep& st, float* __restrict out, int64_t n) {
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
inline void PostStepsImpl(const PostStep* steps, int n, float* out, int64_t count) {
  constexpr int64_t kBlock = 2048;
  for (int64_t b0 = 0; b0 < count; b0 += kBlock) {
    const int64_t m = std::min(kBlock, count - b0);
    for (int i = 0; i < n; ++i) PostStepImpl(steps[i], out + b0, m);
  }
}

}  // namespace
}  // namespace fpxint::core::internal

#endif  // FPXINT_CORE_INTERNAL_POST_STEPS_INL_H_
