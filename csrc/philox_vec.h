// The attention-dropout keep test (philox.h) for consecutive offsets, a vector at a time: the same
// bits as the scalar dropout_keep. Included once per instruction set, inside namespace nanofast::NF_ISA.
#pragma once
#include <cstdint>

#include "philox.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

#if defined(__AVX512F__)
// dropout_keep for the 8 offsets offset0 .. offset0 + 7, as bits 0..7: Philox4x32-10 (philox.h) with
// one 32-bit word per 64-bit lane, so each 32 x 32 -> 64-bit product is one vpmuludq, then
// philox_uniform's int32 fold and scale. The same bits as the scalar functions.
inline unsigned dropout_keep8(uint64_t seed, uint64_t offset0, float p) {
  const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i off = _mm512_add_epi64(_mm512_set1_epi64(int64_t(offset0)), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  __m512i c0 = _mm512_and_si512(off, low32), c1 = _mm512_srli_epi64(off, 32);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53ll), m1 = _mm512_set1_epi64(0xCD9E8D57ll);
  for (int round = 0; round < 10; ++round) {
    const __m512i p0 = _mm512_mul_epu32(c0, m0), p1 = _mm512_mul_epu32(c2, m1);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), c1), _mm512_set1_epi64(k0));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), c3), _mm512_set1_epi64(k1));
    c1 = _mm512_and_si512(p1, low32);
    c3 = _mm512_and_si512(p0, low32);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  __m256i x = _mm512_cvtepi64_epi32(c0);              // the word, as int32
  x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // negatives folded with bitwise NOT
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(4.6566127342e-10f));
  return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(u, _mm256_set1_ps(p), _CMP_GE_OQ)));
}
#endif

#if defined(__AVX512F__)
// ... for the 16 offsets offset0 .. offset0 + 15, as bits 0..15 (a __mmask16 for a float vector).
inline unsigned dropout_keep16(uint64_t seed, uint64_t offset0, float p) {
  return dropout_keep8(seed, offset0, p) | dropout_keep8(seed, offset0 + 8, p) << 8;
}
#endif

}  // namespace NF_ISA
}  // namespace nanofast
