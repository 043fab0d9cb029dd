// GELU, exact form 0.5 x (1 + erf(x / sqrt 2)) or its tanh approximation (GPT-2's "gelu_new"), forward
// and backward, elementwise.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
//
// float32 erf is a rational approximation good to about 1 ulp (see verf); float64 calls std::erf.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernel_table.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// erf(z) as a rational function z P(z^2) / Q(z^2) on [-4, 4] (beyond it float32 erf is +-1): odd
// numerator of degree 13, even denominator of degree 8, one division, no exp.
inline vec<float> verf(vec<float> z) {
  using vf = vec<float>;
  z = z > 4.0f ? vf{} + 4.0f : z;
  z = z < -4.0f ? vf{} - 4.0f : z;
  const vf z2 = z * z;
  vf p = z2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * z2 - 2.10102402082508e-06f;
  p = p * z2 - 5.69250639462346e-05f;
  p = p * z2 - 7.34990630326855e-04f;
  p = p * z2 - 2.95459980854025e-03f;
  p = p * z2 - 1.60960333262415e-02f;
  vf q = z2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = q * z2 - 1.68282697438203e-03f;
  q = q * z2 - 7.37332916720468e-03f;
  q = q * z2 - 1.42647390514189e-02f;
  return z * p / q;
}

inline vec<double> verf(vec<double> z) {
  for (int i = 0; i < lanes<double>(); ++i) z[i] = std::erf(z[i]);
  return z;
}

template <class A> struct GeluConst {
  static constexpr A inv_sqrt2 = A(0.70710678118654752440);
  static constexpr A inv_sqrt_2pi = A(0.39894228040143267794);
};

// One vector of x (and dy) in, one vector of y (or dx) out.
template <class A> inline vec<A> gelu_vec(vec<A> x) { return x * A(0.5) * (verf(x * GeluConst<A>::inv_sqrt2) + A(1)); }
// gelu'(x) = Phi(x) + x phi(x): one function for the backward and for the forward that saves it, so
// that dy * (saved gelu') has the bits of the backward computed from x.
template <class A> inline vec<A> gelu_deriv_vec(vec<A> x) {
  const vec<A> cdf = A(0.5) * (verf(x * GeluConst<A>::inv_sqrt2) + A(1));
  const vec<A> pdf = vexp(x * x * A(-0.5)) * GeluConst<A>::inv_sqrt_2pi;
  return cdf + x * pdf;
}

// exp(t), +inf where it overflows (vexp clamps there): 1 / (1 + exp(t)) is then exactly 0.
inline vec<float> vexp_or_inf(vec<float> t) {
  return t > 88.72283935546875f ? vbroadcast<float>(__builtin_inff()) : vexp(t);
}
inline vec<double> vexp_or_inf(vec<double> t) { return vexp(t); }

// The tanh approximation 0.5 x (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3), and its derivative,
// written with s = 1 / (1 + exp(-2z)) = (1 + tanh(z)) / 2: gelu = x s, gelu' = s + 2 x s (1 - s) z'.
// 1 + tanh(z) itself would lose every digit for negative x, where tanh(z) is near -1; 1 - s is
// exp(-2z) s, or 1 where exp(-2z) overflows and s is 0.
template <class A> inline vec<A> gelu_tanh_parts(vec<A> x, vec<A>* deriv) {
  constexpr A k = A(0.79788456080286535588), c = A(0.044715);
  const vec<A> x2 = x * x;
  const vec<A> e = vexp_or_inf(A(-2) * k * x * (A(1) + c * x2));
  const vec<A> s = A(1) / (A(1) + e);
  if (deriv) {
    const vec<A> one_minus_s = e == vbroadcast<A>(__builtin_inf()) ? vbroadcast<A>(A(1)) : e * s;
    *deriv = s + A(2) * k * x * s * one_minus_s * (A(1) + A(3) * c * x2);
  }
  return x * s;
}
template <class A> inline vec<A> gelu_tanh_vec(vec<A> x) { return gelu_tanh_parts<A>(x, nullptr); }
template <class A> inline vec<A> gelu_tanh_deriv_vec(vec<A> x) {
  vec<A> d;
  gelu_tanh_parts<A>(x, &d);
  return d;
}

// What one pass computes: out = gelu(x); the same and grad = gelu'(x); out = dy * gelu'(x) from x; or
// out = dy * grad from the saved derivative.
enum GeluMode { kForward, kForwardSavingGrad, kBackward, kBackwardFromGrad };

template <class A, GeluMode MODE, bool TANH>
inline vec<A> gelu_step(vec<A> x, vec<A> dy, vec<A> saved, vec<A>* grad_out) {
  if constexpr (TANH) {
    if constexpr (MODE == kForward) return gelu_tanh_vec<A>(x);
    if constexpr (MODE == kForwardSavingGrad) return gelu_tanh_parts<A>(x, grad_out);
    if constexpr (MODE == kBackward) return dy * gelu_tanh_deriv_vec<A>(x);
    return dy * saved;
  }
  if constexpr (MODE == kForward) return gelu_vec<A>(x);
  if constexpr (MODE == kForwardSavingGrad) {  // gelu_vec and gelu_deriv_vec sharing one erf
    const vec<A> erf1 = verf(x * GeluConst<A>::inv_sqrt2) + A(1);
    const vec<A> pdf = vexp(x * x * A(-0.5)) * GeluConst<A>::inv_sqrt_2pi;
    *grad_out = A(0.5) * erf1 + x * pdf;
    return x * A(0.5) * erf1;
  }
  if constexpr (MODE == kBackward) return dy * gelu_deriv_vec<A>(x);
  return dy * saved;
}

// Elementwise over n contiguous elements, split into fixed chunks across threads.
template <class T, GeluMode MODE, bool TANH>
void gelu_apply(const GeluArgs& a) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  constexpr bool READS_X = MODE != kBackwardFromGrad, READS_DY = MODE >= kBackward;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  A* grad = static_cast<A*>(a.grad);
  T* out = static_cast<T*>(a.out);
  // (chunks start 4096 elements apart, so a 64-byte aligned array keeps every vector store aligned)
  const bool stream_out = stream_output(out, a.n * int64_t(sizeof(T)), 64);
  const bool stream_grad = MODE == kForwardSavingGrad && stream_output(grad, a.n * int64_t(sizeof(A)), 64);
  auto chunk = [&](int64_t c0, int64_t c1) {
    int64_t i = c0;
    vec<A> g{};
    for (; i + W <= c1; i += W) {  // whole vectors straight from memory
      const vec<A> xv = READS_X ? vload_as(x + i) : vec<A>{};
      const vec<A> dv = READS_DY ? vload_as(dy + i) : vec<A>{};
      const vec<A> sv = MODE == kBackwardFromGrad ? vload(grad + i) : vec<A>{};
      vput(out + i, gelu_step<A, MODE, TANH>(xv, dv, sv, &g), stream_out);
      if constexpr (MODE == kForwardSavingGrad) vput(grad + i, g, stream_grad);
    }
    alignas(64) A xb[W], db[W], sb[W], ob[W], gb[W];  // the tail staged through buffers
    for (; i < c1; i += W) {
      const int64_t m = std::min<int64_t>(W, c1 - i);
      for (int64_t j = 0; j < W; ++j) {
        xb[j] = READS_X && j < m ? to_acc(x[i + j]) : A(0);
        db[j] = READS_DY && j < m ? to_acc(dy[i + j]) : A(0);
        sb[j] = MODE == kBackwardFromGrad && j < m ? grad[i + j] : A(0);
      }
      vstore(ob, gelu_step<A, MODE, TANH>(vload(xb), vload(db), vload(sb), &g));
      vstore(gb, g);
      for (int64_t j = 0; j < m; ++j) {
        out[i + j] = from_acc<T>(ob[j]);
        if constexpr (MODE == kForwardSavingGrad) grad[i + j] = gb[j];
      }
    }
  };
  for_each_chunk(a.n, a.num_threads, chunk, stream_out || stream_grad);
}

template <GeluMode MODE> inline void gelu_dispatch(const GeluArgs& a) {
  with_storage_type(a.dtype, [&](auto t) {
    a.tanh ? gelu_apply<decltype(t), MODE, true>(a) : gelu_apply<decltype(t), MODE, false>(a);
  });
}

inline void gelu_forward(const GeluArgs& a) {
  a.grad ? gelu_dispatch<kForwardSavingGrad>(a) : gelu_dispatch<kForward>(a);
}

inline void gelu_backward(const GeluArgs& a) {
  a.grad ? gelu_dispatch<kBackwardFromGrad>(a) : gelu_dispatch<kBackward>(a);
}

}  // namespace NF_ISA
}  // namespace nanofast
