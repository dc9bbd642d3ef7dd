#include "core/packing.h"

#include <cstring>

#include "core/kernels.h"

namespace fpxint::core {

int CodesPerByte(int bits) { return (bits == 1 || bits == 2 || bits == 4) ? 8 / bits : 1; }

int64_t PackedRowBytes(int64_t n, int bits) {
  const int per = CodesPerByte(bits);
  return (n + per - 1) / per;
}

void PackCodes(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  ActiveKernels().pack(codes, n, bits, out);
}

void UnpackCodes(const uint8_t* packed, int64_t n, int bits, bool is_signed, int32_t* out) {
  const int per = CodesPerByte(bits);
  if (per == 1) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = is_signed ? static_cast<int32_t>(static_cast<int8_t>(packed[i])) : packed[i];
    }
    return;
  }
  const uint32_t mask = (1u << bits) - 1;
  const uint32_t sign = 1u << (bits - 1);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = (packed[i / per] >> ((i % per) * bits)) & mask;
    out[i] = (is_signed && (v & sign)) ? static_cast<int32_t>(v) - static_cast<int32_t>(1u << bits)
                                       : static_cast<int32_t>(v);
  }
}

}  // namespace fpxint::core
