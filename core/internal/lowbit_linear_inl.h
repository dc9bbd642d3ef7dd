// File: core/internal/lowbit_linear_inl.h
//
// The scalar form of LinearKernelTable::decode_terms, shared by the reference table, the tail of
// the AVX2 variant and the AVX-512 variant's mixed-width case, so that every variant computes the
// same operations in the same order (one std::fma per term, term order); and decode_rows as a
// loop of decode_terms calls.
#ifndef FPXINT_CORE_INTERNAL_LOWBIT_LINEAR_INL_H_
#define FPXINT_CORE_INTERNAL_LOWBIT_LINEAR_INL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/lowbit_linear.h"
#include "core/packing.h"

namespace fpxint::core::internal {

// Each kernel TU is compiled with its own -m flags: internal linkage, so that the linker never
// folds an AVX-512 instance into the reference table.
namespace {

// decode_terms for the codes [first, n) of each term (first on a byte boundary of every term),
// through the scalar code reader, 64 codes at a time.
inline void DecodeTermsScalar(const uint8_t* const* packed, const int* bits, const bool* is_signed,
                              const float* s, const float* off, int K, int64_t first, int64_t n,
                              bool accumulate, float* y) {
  constexpr int64_t kChunk = 64;  // a multiple of 8: every chunk starts on a byte boundary
  int32_t q[kChunk];
  for (int64_t c = first; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    if (!accumulate) std::fill(y + c, y + c + len, 0.0f);
    for (int k = 0; k < K; ++k) {
      const int64_t byte0 = CodesPerByte(bits[k]) > 1 ? c * bits[k] / 8 : c;
      UnpackCodes(packed[k] + byte0, len, bits[k], is_signed[k], q);
      for (int64_t j = 0; j < len; ++j) {
        y[c + j] = std::fma(s[k], static_cast<float>(q[j]) + off[k], y[c + j]);
      }
    }
  }
}

// decode_rows as one decode_terms call per row (the reference and AVX2 tables).
template <typename DecodeTermsFn>
inline void DecodeRowsByRow(DecodeTermsFn decode_terms, const uint8_t* const* codes,
                            const float* const* scale, const float* const* off,
                            const bool* is_signed, int K, int bits, int64_t rows,
                            int64_t row_bytes, int64_t n, float* out, int64_t ldo) {
  const uint8_t* packed[kMaxDecodeTerms];
  int b[kMaxDecodeTerms];
  float s[kMaxDecodeTerms], o[kMaxDecodeTerms];
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < K; ++k) {
      packed[k] = codes[k] + r * row_bytes;
      b[k] = bits;
      s[k] = scale[k][r];
      o[k] = off[k][r];
    }
    decode_terms(packed, b, is_signed, s, o, K, n, /*accumulate=*/false, out + r * ldo);
  }
}

}  // namespace
}  // namespace fpxint::core::internal

#endif  // FPXINT_CORE_INTERNAL_LOWBIT_LINEAR_INL_H_
