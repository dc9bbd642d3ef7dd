// File: core/packing.h
//
// Storage layout of expansion codes (the `<name>.t{k}.codes` tensors of an fpxint artifact).
//
// A tensor is a matrix of `rows` = dim 0 by `row_len` = the product of the other dims. Each row
// starts on a byte boundary.
//   b in {1, 2, 4}: 8/b codes per byte, the first code in the lowest bits. Byte j of a row holds
//                   codes 8j/b ... 8(j+1)/b - 1; unused high bits of the last byte are zero.
//                   Codes are b-bit two's complement for signed grids (sym, mid) and unsigned for
//                   asym. Stored with dtype U8.
//   other b:        one code per byte, dtype I8 for signed grids and U8 for asym.
//   Example, b=4 signed, codes [-3, 5]: byte 0 = 0x5D (low nibble 0xD = -3, high nibble 5).
#ifndef FPXINT_CORE_PACKING_H_
#define FPXINT_CORE_PACKING_H_

#include <cstdint>

namespace fpxint::core {

// Codes per byte: 8/b for b in {1,2,4}, otherwise 1.
int CodesPerByte(int bits);
// Bytes of one packed row of n codes.
int64_t PackedRowBytes(int64_t n, int bits);

// codes: n bytes, each the low 8 bits of an integer code. Writes PackedRowBytes(n, bits) bytes.
void PackCodes(const uint8_t* codes, int64_t n, int bits, uint8_t* out);
// Inverse of PackCodes: n integer codes, sign-extended from b bits when is_signed.
void UnpackCodes(const uint8_t* packed, int64_t n, int bits, bool is_signed, int32_t* out);

}  // namespace fpxint::core

#endif  // FPXINT_CORE_PACKING_H_
