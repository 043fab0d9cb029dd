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
#include "philox_vec.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

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
        const unsigned keep = dropout_keep16(a.seed, uint64_t(i), p);
        const __m512 kept = _mm512_maskz_mov_ps(__mmask16(keep), (__m512)(vload_as(x + i) * scale));
        vstore_as(out + i, (vec<float>)kept);
      }
    }
#endif
    for (; i < c1; ++i) out[i] = from_acc<T>(dropout_keep(a.seed, uint64_t(i), p) ? to_acc(x[i]) * scale : A(0));
  });
}

inline void dropout(const DropoutArgs& a) {
  with_storage_type(a.dtype, [&](auto t) { dropout_apply<decltype(t)>(a); });
}

}  // namespace NF_ISA
}  // namespace nanofast
