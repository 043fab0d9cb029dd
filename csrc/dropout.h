// Dropout on contiguous elements, keyed by a seed: element i survives iff the counter-based generator's
// uniform at offset i is >= p (the attention kernels' keep test, philox.h), and a survivor is scaled by
// 1 / (1 - p) in the accumulation type. Nothing is stored: the backward is the same call on the
// gradient with the same seed, and the mask is a pure function of (seed, i) whatever the threads.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
#pragma once
#include <algorithm>
#include <type_traits>

#include "kernel_table.h"
#include "philox.h"
#include "simd.h"
#include "scalar_types.h"

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
  __m256i x = _mm512_cvtepi64_epi32(c0);               // the word, as int32
  x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // negatives folded with bitwise NOT
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(4.6566127342e-10f));
  return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(u, _mm256_set1_ps(p), _CMP_GE_OQ)));
}
#endif

template <class T>
void dropout_apply(const DropoutArgs& a) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const float p = float(a.p);
  // p == 1 drops everything: scale 0 rather than inf keeps 0 * inf from making NaNs
  const A scale = a.p >= 1.0 ? A(0) : A(1) / (A(1) - A(a.p));
  for_each_chunk(a.n, a.num_threads, [&](int64_t c0, int64_t c1) {
    int64_t i = c0;
#if defined(__AVX512F__)
    if constexpr (std::is_same<A, float>::value) {  // float32 and bfloat16: 16 elements a step, no branches
      for (; i + 16 <= c1; i += 16) {
        const unsigned keep = dropout_keep8(a.seed, uint64_t(i), p) | dropout_keep8(a.seed, uint64_t(i + 8), p) << 8;
        const __m512 kept = _mm512_maskz_mov_ps(__mmask16(keep), (__m512)(vload_as(x + i) * scale));
        vstore_as(out + i, (vec<float>)kept);
      }
    }
#endif
    for (; i < c1; ++i)
      out[i] = from_acc<T>(dropout_keep(a.seed, uint64_t(i), p) ? to_acc(x[i]) * scale : A(0));
  });
}

inline void dropout(const DropoutArgs& a) {
  switch (a.dtype) {
    case kFloat32: return dropout_apply<float>(a);
    case kFloat64: return dropout_apply<double>(a);
    case kBFloat16: return dropout_apply<bf16>(a);
  }
}

}  // namespace NF_ISA
}  // namespace nanofast
