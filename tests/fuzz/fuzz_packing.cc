// libFuzzer target: the packed-code reader (core/packing.h UnpackCodes) on arbitrary packed
// bytes for every bit width, checked against a bit-by-bit reference, and the pack/unpack round
// trip of the codes read.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/packing.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int bits = 1 + data[0] % 8;
  const bool is_signed = (data[0] & 0x80) != 0;
  const uint8_t* packed = data + 1;
  const size_t packed_len = size - 1;
  const int per_byte = fpxint::core::CodesPerByte(bits);
  const int64_t n = static_cast<int64_t>(packed_len) * per_byte;
  if (fpxint::core::PackedRowBytes(n, bits) > static_cast<int64_t>(packed_len)) std::abort();
  std::vector<int32_t> codes(static_cast<size_t>(n));
  fpxint::core::UnpackCodes(packed, n, bits, is_signed, codes.data());
  const int width = per_byte > 1 ? bits : 8;  // b in {1,2,4}: packed; else one code per byte
  for (int64_t i = 0; i < n; ++i) {
    uint32_t raw = per_byte > 1 ? (packed[i / per_byte] >> ((i % per_byte) * bits)) & ((1u << bits) - 1)
                                : packed[i];
    int32_t want = static_cast<int32_t>(raw);
    if (is_signed && (raw >> (width - 1)) & 1) want -= (1 << width);
    if (codes[static_cast<size_t>(i)] != want) std::abort();
  }
  if (per_byte > 1) {
    std::vector<uint8_t> u(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) u[static_cast<size_t>(i)] = static_cast<uint8_t>(codes[static_cast<size_t>(i)]);
    std::vector<uint8_t> repacked(packed_len);
    fpxint::core::PackCodes(u.data(), n, bits, repacked.data());
    for (size_t i = 0; i < packed_len; ++i) {
      if (repacked[i] != packed[i]) std::abort();
    }
  }
  return 0;
}
