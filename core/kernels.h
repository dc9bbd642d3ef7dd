// File: core/kernels.h
//
// The inner loop of one expansion term over a run of residual values that share one scale
// ("segment"): quantize, emit codes, subtract the dequantized value in place, and return the
// statistics of the new residual that the next term's scale and the error report need.
//
// Every variant (ref, avx2, avx512) produces bit-identical codes and residuals: they all divide
// (no reciprocal), round half to even (sym/asym) or floor (mid), clamp with the same comparison
// order, and never contract a multiply-subtract into an FMA. min and max are exact; sumsq may differ
// in the last bits because the lanes add in a different order.
#ifndef FPXINT_CORE_KERNELS_H_
#define FPXINT_CORE_KERNELS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace fpxint::core {

// Parameters of one term on one segment. Codes are lo..hi (integers held in doubles).
struct TermParams {
  double scale = 1;  // s > 0
  double zero = 0;   // z (asym only)
  double lo = 0;
  double hi = 0;
};

// Statistics of a residual segment.
struct SegmentStats {
  double min = 0;
  double max = 0;
  double sumsq = 0;
};

// r: n residual values, updated in place. codes: n bytes, the low 8 bits of each integer code
// (two's complement for negative codes).
using QuantizeFn = void (*)(const TermParams& p, double* r, uint8_t* codes, int64_t n,
                            SegmentStats* out);
// Statistics of r[0..n). REQUIRES: n >= 1.
using StatsFn = void (*)(const double* r, int64_t n, SegmentStats* out);

// Variant D on the mid grid over a run of float inputs whose term scales are known up front
// (s[k−1] = term k's; each the previous one / 2^b, rounded up): all `terms` terms of each value
// in one pass, its residual held in a register. Term k's codes are exactly those quantize_mid
// gives on the residual terms 1..k−1 leave (the same division, floor, clamp and subtraction).
// Every output is optional (nullptr: not wanted):
//   sum[i]      float of Σ_k (C_k + ½)·s_k, added in term order starting from 0.0 (the bits of
//               Reconstruct and of ExpandReconstructF32's generic path);
//   codes[k][i] term k+1's code (the low 8 bits, as quantize_mid writes them);
//   folded[i]   Σ_k 2^{b(K−k)}·C_k + fold_shift, a byte (needs K·b <= 8 and a shift that makes it
//               non-negative); *folded_sum the sum of those bytes.
struct DigitsParams {
  const double* scale = nullptr;  // [terms], every one > 0
  int terms = 1;
  int bits = 4;
  double lo = 0, hi = 0;          // code range
  int32_t fold_shift = 0;
};
using DigitsRowFn = void (*)(const float* x, int64_t n, const DigitsParams& p, float* sum,
                             uint8_t* const* codes, uint8_t* folded, int64_t* folded_sum);

struct KernelTable {
  const char* name;  // "ref" | "avx2" | "avx512"
  QuantizeFn quantize_sym;   // C = clamp(rint(r/s)),      r -= C*s
  QuantizeFn quantize_asym;  // C = clamp(rint(r/s + z)),  r -= s*(C - z)
  QuantizeFn quantize_mid;   // C = clamp(floor(r/s)),     r -= (C + 0.5)*s
  StatsFn stats;
  // PackCodes (core/packing.h) and float32 / bfloat16 / float16 -> double conversion (the
  // values ConvertToDouble gives), vectorized per ISA. src needs no alignment.
  void (*pack)(const uint8_t* codes, int64_t n, int bits, uint8_t* out);
  void (*f32_to_f64)(const uint8_t* src, int64_t n, double* dst);
  void (*bf16_to_f64)(const uint8_t* src, int64_t n, double* dst);
  void (*f16_to_f64)(const uint8_t* src, int64_t n, double* dst);
  DigitsRowFn digits_mid;
  // max |x[i]| over n floats, and whether all of them are finite.
  bool (*f32_abs_max)(const float* x, int64_t n, float* max_abs);
};

// The table of the ISA core::Runtime() chose once (core/runtime.h): avx512 > avx2 > ref, or
// FPXINT_KERNEL=ref|avx2|avx512 when this CPU supports it.
const KernelTable& ActiveKernels();
// A specific table; nullptr when unknown or not supported by this CPU.
const KernelTable* KernelsByName(absl::string_view name);
// Names of the tables this CPU supports, "ref" first.
std::vector<std::string> SupportedKernelNames();

}  // namespace fpxint::core

#endif  // FPXINT_CORE_KERNELS_H_
