#include "core/dtype.h"

#include <cstring>

#include "absl/base/casts.h"

namespace fpxint::core {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "fpxint reads little-endian data in place");

namespace {
struct DTypeInfo {
  DType type;
  const char* name;
  int size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},     {DType::kI8, "I8", 1},
    {DType::kI16, "I16", 2},   {DType::kU16, "U16", 2},   {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI32, "I32", 4},   {DType::kU32, "U32", 4},
    {DType::kF32, "F32", 4},   {DType::kF64, "F64", 8},   {DType::kI64, "I64", 8},
    {DType::kU64, "U64", 8},   {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
    {DType::kOther, "(unsupported dtype)", 0},
};

// FP8 E4M3 (bias 7, 3 mantissa bits, no infinities; S.1111.111 is NaN) as float bits, computed
// once from the definition: every code is exact in float.
constexpr uint32_t E4M3Bits(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t exp = (c >> 3) & 0xFu;
  uint32_t man = c & 0x7u;
  if (exp == 0xF && man == 0x7) return sign | 0x7FC00000u;  // NaN
  if (exp != 0) return sign | ((exp + 120) << 23) | (man << 20);
  if (man == 0) return sign;  // signed zero
  // Subnormal: man * 2^-9, normalised.
  uint32_t e = 121;  // 2^-6 as a float exponent, before normalising
  while ((man & 0x8u) == 0) {
    man <<= 1;
    --e;
  }
  return sign | (e << 23) | ((man & 0x7u) << 20);
}
struct E4M3Table {
  uint32_t bits[256];
  constexpr E4M3Table() : bits() {
    for (int c = 0; c < 256; ++c) bits[c] = E4M3Bits(static_cast<uint8_t>(c));
  }
};
constexpr E4M3Table kE4M3;
}  // namespace

int DTypeSize(DType t) { return kDTypes[static_cast<int>(t)].size; }
absl::string_view DTypeName(DType t) { return kDTypes[static_cast<int>(t)].name; }

std::optional<DType> ParseDType(absl::string_view name) {
  for (const DTypeInfo& d : kDTypes) {
    if (name == d.name && d.type != DType::kOther) return d.type;
  }
  return std::nullopt;
}

absl::string_view AcceptedDTypeNames() {
  return "BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2";
}

bool IsFloating(DType t) {
  return t == DType::kF16 || t == DType::kBF16 || t == DType::kF32 || t == DType::kF64 ||
         t == DType::kF8E4M3 || t == DType::kF8E5M2;
}

float Fp8E4M3ToFloat(uint8_t c) { return absl::bit_cast<float>(kE4M3.bits[c]); }
float Fp8E5M2ToFloat(uint8_t c) { return HalfToFloat(static_cast<uint16_t>(c << 8)); }

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {  // inf / NaN
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {  // normal
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: value = man * 2^-24, exactly representable as a normal float
    int shift = 0;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      ++shift;
    }
    man &= 0x3FFu;
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | (man << 13);
  }
  return absl::bit_cast<float>(bits);
}

uint16_t FloatToBFloat16(float f) {
  uint32_t x = absl::bit_cast<uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

uint16_t FloatToHalf(float f) {
  const uint32_t x = absl::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00u;                 // NaN
  if (ax >= 0x477FF000u) return sign | 0x7C00u;                // rounds to inf (>= 65520)
  if (ax < 0x38800000u) {                                      // below 2^-14: subnormal half
    // value * 2^24 rounded to nearest even integer gives the subnormal mantissa.
    const float scaled = absl::bit_cast<float>(ax) * 16777216.0f;  // exact: power of two
    const float r = __builtin_nearbyintf(scaled);
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t mant_rounded = ax + 0xFFFu + ((ax >> 13) & 1u);  // round to nearest even at bit 13
  return sign | static_cast<uint16_t>((mant_rounded - 0x38000000u) >> 13);
}

void ConvertToDouble(DType t, const uint8_t* src, int64_t n, double* dst) {
  switch (t) {
    case DType::kF32:
      for (int64_t i = 0; i < n; ++i) {
        float v;
        std::memcpy(&v, src + 4 * i, 4);
        dst[i] = v;
      }
      return;
    case DType::kF64:
      std::memcpy(dst, src, static_cast<size_t>(n) * 8);
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        dst[i] = HalfToFloat(v);
      }
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        dst[i] = BFloat16ToFloat(v);
      }
      return;
    case DType::kF8E4M3:
      for (int64_t i = 0; i < n; ++i) dst[i] = Fp8E4M3ToFloat(src[i]);
      return;
    case DType::kF8E5M2:
      for (int64_t i = 0; i < n; ++i) dst[i] = Fp8E5M2ToFloat(src[i]);
      return;
    default:
      return;  // REQUIRES violated; callers check IsFloating first.
  }
}

}  // namespace fpxint::core
