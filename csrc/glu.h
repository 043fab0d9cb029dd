// The gated MLP's activation act(gate) * up (SwiGLU: act = SiLU, GEGLU: GELU, exact or tanh), forward
// and backward, elementwise over (N, C) rows.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
#pragma once
#include <algorithm>
#include <cmath>

#include "gelu.h"
#include "kernel_table.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// silu(x) = x s with s = 1 / (1 + exp(-x)); silu'(x) = s + x s (1 - s), 1 - s taken as exp(-x) s (no
// cancellation where s is near 1), or 1 where exp(-x) overflows and s is 0.
template <class A> inline vec<A> silu_parts(vec<A> x, vec<A>* deriv) {
  const vec<A> e = vexp_or_inf(-x);
  const vec<A> s = A(1) / (A(1) + e);
  if (deriv) {
    const vec<A> one_minus_s = e == vbroadcast<A>(__builtin_inf()) ? vbroadcast<A>(A(1)) : e * s;
    *deriv = s + x * s * one_minus_s;
  }
  return x * s;
}

// act(x), and act'(x) where deriv is given.
template <class A, int ACT> inline vec<A> activation(vec<A> x, vec<A>* deriv) {
  if constexpr (ACT == kSilu) return silu_parts<A>(x, deriv);
  if constexpr (ACT == kGeluTanh) return gelu_tanh_parts<A>(x, deriv);
  if (deriv) *deriv = gelu_deriv_vec<A>(x);
  return gelu_vec<A>(x);
}

// One vector of the pass: the forward's act(g) * u, or the backward's dgate (returned) and dup.
template <class A, int ACT, bool BACKWARD> inline vec<A> glu_step(vec<A> g, vec<A> u, vec<A> dy, vec<A>* dup) {
  if constexpr (!BACKWARD) return activation<A, ACT>(g, nullptr) * u;
  vec<A> d;
  const vec<A> a = activation<A, ACT>(g, &d);
  *dup = dy * a;
  return dy * u * d;
}

template <class T, int ACT, bool BACKWARD>
void glu_apply(const GluArgs& a) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  const int64_t C = a.C;
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  const T* dy = static_cast<const T*>(a.dy);
  T* out = static_cast<T*>(BACKWARD ? a.dgate : a.out);
  T* dup = static_cast<T*>(a.dup);
  // columns [c0, c1) of row n, whose outputs start at flat offset o
  auto segment = [&](int64_t n, int64_t c0, int64_t c1, int64_t o) {
    const T* g = gate + n * a.gate_row_stride;
    const T* u = up + n * a.up_row_stride;
    int64_t c = c0;
    vec<A> du;
    for (; c + W <= c1; c += W, o += W) {
      const vec<A> dv = BACKWARD ? vload_as(dy + o) : vec<A>{};
      vstore_as(out + o, glu_step<A, ACT, BACKWARD>(vload_as(g + c), vload_as(u + c), dv, &du));
      if constexpr (BACKWARD) vstore_as(dup + o, du);
    }
    if (c == c1) return;
    alignas(64) A gb[W], ub[W], db[W], ob[W], dub[W];  // the tail staged through buffers
    const int64_t m = c1 - c;
    for (int64_t j = 0; j < W; ++j) {
      gb[j] = j < m ? to_acc(g[c + j]) : A(0);
      ub[j] = j < m ? to_acc(u[c + j]) : A(0);
      db[j] = BACKWARD && j < m ? to_acc(dy[o + j]) : A(0);
    }
    vstore(ob, glu_step<A, ACT, BACKWARD>(vload(gb), vload(ub), vload(db), &du));
    vstore(dub, du);
    for (int64_t j = 0; j < m; ++j) {
      out[o + j] = from_acc<T>(ob[j]);
      if constexpr (BACKWARD) dup[o + j] = from_acc<T>(dub[j]);
    }
  };
  // fixed chunks of the flat (N, C) index, each cut at the row ends
  for_each_chunk(a.N * C, a.num_threads, [&](int64_t i0, int64_t i1) {
    int64_t n = i0 / C, c = i0 % C;
    for (int64_t i = i0; i < i1; ++n, c = 0) {
      const int64_t len = std::min(C - c, i1 - i);
      segment(n, c, c + len, i);
      i += len;
    }
  });
}

template <bool BACKWARD> inline void glu_dispatch(const GluArgs& a) {
  if (a.N * a.C == 0) return;
  with_storage_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    switch (a.activation) {
      case kSilu: return glu_apply<T, kSilu, BACKWARD>(a);
      case kGelu: return glu_apply<T, kGelu, BACKWARD>(a);
      case kGeluTanh: return glu_apply<T, kGeluTanh, BACKWARD>(a);
    }
  });
}

inline void glu_forward(const GluArgs& a) { glu_dispatch<false>(a); }
inline void glu_backward(const GluArgs& a) { glu_dispatch<true>(a); }

}  // namespace NF_ISA
}  // namespace nanofast
