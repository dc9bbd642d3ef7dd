// SHA-256 block function with the x86 SHA extensions (compiled with -msha -msse4.1; called only
// when the CPU has them, see sha256.cc). Same results as the portable Sha256::Block, checked by
// core.sha256 on the NIST vectors and on random data against the portable code.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

namespace fpxint::core {

extern const uint32_t kSha256K[64];

void Sha256BlocksShaNi(uint32_t state[8], const uint8_t* data, size_t blocks) {
  // The instructions keep the state as ABEF and CDGH.
  __m128i tmp = _mm_loadu_si128(reinterpret_cast<const __m128i*>(&state[0]));    // A B C D
  __m128i state1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(&state[4]));  // E F G H
  tmp = _mm_shuffle_epi32(tmp, 0xB1);        // B A D C
  state1 = _mm_shuffle_epi32(state1, 0x1B);  // H G F E
  __m128i state0 = _mm_alignr_epi8(tmp, state1, 8);     // ABEF
  state1 = _mm_blend_epi16(state1, tmp, 0xF0);          // CDGH
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  for (size_t b = 0; b < blocks; ++b, data += 64) {
    const __m128i abef = state0, cdgh = state1;
    __m128i w[4];  // message words 4i .. 4i+3, a ring of the last four groups
    for (int i = 0; i < 16; ++i) {
      __m128i m;
      if (i < 4) {
        m = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + 16 * i)),
                             bswap);
      } else {
        // W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16], four at a time.
        m = _mm_sha256msg1_epu32(w[i & 3], w[(i - 3) & 3]);                 // + s0
        m = _mm_add_epi32(m, _mm_alignr_epi8(w[(i - 1) & 3], w[(i - 2) & 3], 4));  // + W[t-7]
        m = _mm_sha256msg2_epu32(m, w[(i - 1) & 3]);                         // + s1
      }
      w[i & 3] = m;
      __m128i k = _mm_add_epi32(m, _mm_loadu_si128(reinterpret_cast<const __m128i*>(&kSha256K[4 * i])));
      state1 = _mm_sha256rnds2_epu32(state1, state0, k);
      k = _mm_shuffle_epi32(k, 0x0E);
      state0 = _mm_sha256rnds2_epu32(state0, state1, k);
    }
    state0 = _mm_add_epi32(state0, abef);
    state1 = _mm_add_epi32(state1, cdgh);
  }
  // Back to A B C D / E F G H.
  tmp = _mm_shuffle_epi32(state0, 0x1B);        // A B E F (dword 0 first)
  state1 = _mm_shuffle_epi32(state1, 0xB1);     // G H C D
  state0 = _mm_blend_epi16(tmp, state1, 0xF0);  // A B C D
  state1 = _mm_alignr_epi8(state1, tmp, 8);     // E F G H
  _mm_storeu_si128(reinterpret_cast<__m128i*>(&state[0]), state0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(&state[4]), state1);
}

}  // namespace fpxint::core
