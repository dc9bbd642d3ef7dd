// File: core/dtype.h
//
// Element types of safetensors files and the conversions the expansion needs. The names are the
// safetensors spellings ("F32", "BF16", ...). All multi-byte values are little-endian on disk;
// this library only builds for little-endian hosts (checked at compile time in dtype.cc).
#ifndef FPXINT_CORE_DTYPE_H_
#define FPXINT_CORE_DTYPE_H_

#include <cstdint>
#include <optional>

#include "absl/base/casts.h"
#include "absl/strings/string_view.h"

namespace fpxint::core {

enum class DType : uint8_t {
  kBool, kU8, kI8, kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kF64, kI64, kU64,
  kF8E4M3,  // "F8_E4M3": OCP FP8 E4M3 (PyTorch float8_e4m3fn): bias 7, no infinities, max 448
  kF8E5M2,  // "F8_E5M2": OCP FP8 E5M2 (float8_e5m2): bias 15, IEEE-style inf and NaN
  // A dtype this library does not read (e.g. F8_E4M3FNUZ, F4): a safetensors reader keeps the
  // tensor with its own spelling (TensorInfo::dtype_name), never converts it, and a writer
  // carries its bytes through unchanged. DTypeSize is 0 (unknown), and it is not floating.
  kOther,
};

// Bytes per element.
int DTypeSize(DType t);
// The safetensors spelling, e.g. "F32".
absl::string_view DTypeName(DType t);
// Parses a safetensors dtype name; nullopt when unknown (never kOther).
std::optional<DType> ParseDType(absl::string_view name);
// The comma-separated list of accepted names, for error messages.
absl::string_view AcceptedDTypeNames();
// True for F8_E4M3, F8_E5M2, F16, BF16, F32, F64: the types a tensor expansion accepts as input.
bool IsFloating(DType t);

// IEEE binary16 and bfloat16 to float, exact (every value, including subnormals, inf and NaN).
float HalfToFloat(uint16_t h);
// Inline, so that the kernels' conversion loops (core/internal/kernels_inl.h) vectorize it.
inline float BFloat16ToFloat(uint16_t b) {
  return absl::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}
// FP8 to float, exact for all 256 codes (every FP8 value is a float). E4M3: 0x7F and 0xFF are
// NaN, there is no infinity; E5M2: the upper byte of the binary16 with the same bits.
float Fp8E4M3ToFloat(uint8_t c);
float Fp8E5M2ToFloat(uint8_t c);
// float to binary16 / bfloat16 with round-to-nearest-even (used by tests and writers).
uint16_t FloatToHalf(float f);
uint16_t FloatToBFloat16(float f);

// Converts `n` elements of floating type `t` starting at `src` (unaligned allowed) to double.
// REQUIRES: IsFloating(t).
void ConvertToDouble(DType t, const uint8_t* src, int64_t n, double* dst);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_DTYPE_H_
