// The rotary position embedding of q and k, forward and backward, in one pass over both tensors' rows.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
//
// Forward, over the first R columns, for the half-split layout (Hugging Face's rotate_half) with
// h = R / 2 and i < h:   out[i] = x[i] cos[i] - x[i+h] sin[i],   out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h];
// and for the interleaved one (GPT-J's, Meta's original) over each pair (a, b) = (2i, 2i + 1):
//                        out[a] = x[a] cos[a] - x[b] sin[a],     out[b] = x[b] cos[b] + x[a] sin[b].
// The backward is the transpose: each sin moves to the partner's column and its sign flips, which for
// cos and sin equal on both columns of a pair (as every model builds them) is the rotation by -theta.
#pragma once
#include <algorithm>
#include <cmath>

#include "kernel_table.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// One row. TI: x (the forward's input, or the backward's output gradient), TC: cos and sin, TO: out.
template <class TI, class TC, class TO, bool BACKWARD>
inline void rope_row(const TI* x, const TC* cs, const TC* sn, TO* out, int64_t D, int64_t R, bool interleaved) {
  using A = acc_t<TC>;
  constexpr int W = lanes<A>();
  // the sign of the sin term of a pair's first column, and whose sin each column takes
  constexpr A first = BACKWARD ? A(1) : A(-1);
  int64_t c = 0;
  if (!interleaved) {
    const int64_t h = R / 2;
    for (; c + W <= h; c += W) {
      const vec<A> x1 = vload_as(x + c), x2 = vload_as(x + h + c);
      const vec<A> c1 = vload_as(cs + c), c2 = vload_as(cs + h + c);
      const vec<A> s1 = vload_as(sn + c), s2 = vload_as(sn + h + c);
      vstore_as(out + c, x1 * c1 + first * x2 * (BACKWARD ? s2 : s1));
      vstore_as(out + h + c, x2 * c2 - first * x1 * (BACKWARD ? s1 : s2));
    }
    for (; c < h; ++c) {
      const A x1 = to_acc(x[c]), x2 = to_acc(x[h + c]);
      const A s1 = to_acc(sn[c]), s2 = to_acc(sn[h + c]);
      out[c] = from_acc<TO>(x1 * to_acc(cs[c]) + first * x2 * (BACKWARD ? s2 : s1));
      out[h + c] = from_acc<TO>(x2 * to_acc(cs[h + c]) - first * x1 * (BACKWARD ? s1 : s2));
    }
  } else {
    for (int64_t a = 0; a < R; a += 2) {
      const A xa = to_acc(x[a]), xb = to_acc(x[a + 1]);
      const A sa = to_acc(sn[a]), sb = to_acc(sn[a + 1]);
      out[a] = from_acc<TO>(xa * to_acc(cs[a]) + first * xb * (BACKWARD ? sb : sa));
      out[a + 1] = from_acc<TO>(xb * to_acc(cs[a + 1]) - first * xa * (BACKWARD ? sa : sb));
    }
  }
  for (c = R; c < D; ++c) out[c] = from_acc<TO>(to_acc(x[c]));  // the columns past the rotary ones
}

template <class TI, class TC, class TO, bool BACKWARD>
void rope_impl(const RopeArgs& a) {
  const TC* cs = static_cast<const TC*>(a.cos);
  const TC* sn = static_cast<const TC*>(a.sin);
  const int64_t rows_q = a.t[0].n0 * a.t[0].n1 * a.t[0].n2;
  const int64_t rows = rows_q + a.t[1].n0 * a.t[1].n1 * a.t[1].n2;
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (rows * a.D > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const RopeTensor& t = a.t[r < rows_q ? 0 : 1];
    const int64_t i = r < rows_q ? r : r - rows_q;
    const int64_t i2 = i % t.n2, i1 = (i / t.n2) % t.n1, i0 = i / (t.n2 * t.n1);
    rope_row<TI, TC, TO, BACKWARD>(static_cast<const TI*>(t.x) + i0 * t.xs0 + i1 * t.xs1 + i2 * t.xs2,
                                   cs + i0 * t.cs0 + i1 * t.cs1 + i2 * t.cs2, sn + i0 * t.cs0 + i1 * t.cs1 + i2 * t.cs2,
                                   static_cast<TO*>(t.out) + i0 * t.os0 + i1 * t.os1 + i2 * t.os2, a.D, a.R,
                                   a.interleaved);
  }
}

template <class TI, class TC, class TO> inline void rope_run(const RopeArgs& a) {
  a.backward ? rope_impl<TI, TC, TO, true>(a) : rope_impl<TI, TC, TO, false>(a);
}

// One dtype throughout, or bfloat16 x with float32 cos and sin (Hugging Face's rotary embedding under
// autocast), whose result is float32: the forward reads bfloat16 and writes float32, the backward the
// other way round.
inline bool rope(const RopeArgs& a) {
  const int x = a.dtype, c = a.cos_dtype, o = a.out_dtype;
  if (x == c && c == o) {
    if (x == kFloat32) return rope_run<float, float, float>(a), true;
    if (x == kBFloat16) return rope_run<bf16, bf16, bf16>(a), true;
    if (x == kFloat64) return rope_run<double, double, double>(a), true;
  }
  if (c != kFloat32) return false;
  if (x == kBFloat16 && o == kFloat32) return rope_run<bf16, float, float>(a), true;
  if (x == kFloat32 && o == kBFloat16) return rope_run<float, float, bf16>(a), true;
  return false;
}

}  // namespace NF_ISA
}  // namespace nanofast
