// AVX2 primitives of core/int_linear.h: codes widened to int16 and multiplied with vpmaddwd
// (exact for every width; vpmaddubsw could saturate at 8 bits).
#include <immintrin.h>

#include "core/int_linear.h"

namespace fpxint::core {

void UnpackIntRowRef(const uint8_t* packed, int64_t n, int bits, int8_t* out);

// b = 4: per 32 packed bytes, the low nibbles (even codes) then the high ones (odd codes),
// sign-extended through a 16-entry table; other widths take the reference.
void UnpackIntRowAvx2(const uint8_t* packed, int64_t n, int bits, int8_t* out) {
  if (bits != 4) {
    UnpackIntRowRef(packed, n, bits, out);
    return;
  }
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1,
                                       0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  int64_t c = 0;
  for (; c + kIntBlock <= n; c += kIntBlock) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + c / 2));
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), _mm256_shuffle_epi8(lut, lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c + 32), _mm256_shuffle_epi8(lut, hi));
  }
  if (c < n) UnpackIntRowRef(packed + c / 2, n - c, bits, out + c);
}

namespace {

inline int32_t HSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int R, int B>
void DotTileT(const int8_t* w, int64_t ldw, const uint8_t* x, int64_t ldx, int64_t n,
              int32_t* out) {
  __m256i acc[R][B];
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) acc[r][b] = _mm256_setzero_si256();
  }
  for (int64_t c = 0; c < n; c += 16) {
    __m256i wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + c)));
    }
    for (int b = 0; b < B; ++b) {
      const __m256i xv =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + b * ldx + c)));
      for (int r = 0; r < R; ++r) acc[r][b] = _mm256_add_epi32(acc[r][b], _mm256_madd_epi16(xv, wv[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) out[r * B + b] = HSum(acc[r][b]);
  }
}

using TileFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int64_t, int32_t*);
template <int R>
constexpr TileFn kRow[4] = {DotTileT<R, 1>, DotTileT<R, 2>, DotTileT<R, 3>, DotTileT<R, 4>};
constexpr const TileFn* kTiles[4] = {kRow<1>, kRow<2>, kRow<3>, kRow<4>};

void DotTile(const int8_t* w, int64_t ldw, int R, const uint8_t* x, int64_t ldx, int B, int64_t n,
             int32_t* out) {
  kTiles[R - 1][B - 1](w, ldw, x, ldx, n, out);
}

constexpr IntKernelTable kTable = [] {
  // Members by name: a table a kernel variant lacks an entry of leaves it nullptr.
  IntKernelTable t{};
  t.name = "avx2";
  t.unpack_row = UnpackIntRowAvx2;
  t.dot_tile = DotTile;
  return t;
}();

}  // namespace

const IntKernelTable& IntKernelsAvx2() { return kTable; }

}  // namespace fpxint::core
