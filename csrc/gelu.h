// GELU, exact form 0.5 x (1 + erf(x / sqrt 2)), forward and backward, elementwise.
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
template <class A> inline vec<A> gelu_vec(vec<A> x) {
  return x * A(0.5) * (verf(x * GeluConst<A>::inv_sqrt2) + A(1));
}
template <class A> inline vec<A> gelu_grad_vec(vec<A> x, vec<A> dy) {
  const vec<A> cdf = A(0.5) * (verf(x * GeluConst<A>::inv_sqrt2) + A(1));
  const vec<A> pdf = vexp(x * x * A(-0.5)) * GeluConst<A>::inv_sqrt_2pi;
  return dy * (cdf + x * pdf);
}

// Elementwise over n contiguous elements, split into fixed chunks across threads.
template <class T, bool BACKWARD>
void gelu_apply(const GeluArgs& a) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  T* out = static_cast<T*>(a.out);
  const int64_t n = a.n;
  constexpr int64_t kChunk = 4096;
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (n > 32768)
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    int64_t i = c0;
    for (; i + W <= c1; i += W)  // whole vectors straight from memory
      vstore_as(out + i, BACKWARD ? gelu_grad_vec<A>(vload_as(x + i), vload_as(dy + i)) : gelu_vec<A>(vload_as(x + i)));
    alignas(64) A xb[W], gb[W], ob[W];  // the tail staged through buffers
    for (; i < c1; i += W) {
      const int64_t m = std::min<int64_t>(W, c1 - i);
      for (int64_t j = 0; j < W; ++j) xb[j] = j < m ? to_acc(x[i + j]) : A(0);
      if constexpr (BACKWARD) {
        for (int64_t j = 0; j < W; ++j) gb[j] = j < m ? to_acc(dy[i + j]) : A(0);
        vstore(ob, gelu_grad_vec<A>(vload(xb), vload(gb)));
      } else {
        vstore(ob, gelu_vec<A>(vload(xb)));
      }
      for (int64_t j = 0; j < m; ++j) out[i + j] = from_acc<T>(ob[j]);
    }
  }
}

inline void gelu_forward(const GeluArgs& a) {
  switch (a.dtype) {
    case kFloat32: return gelu_apply<float, false>(a);
    case kFloat64: return gelu_apply<double, false>(a);
    case kBFloat16: return gelu_apply<bf16, false>(a);
  }
}

inline void gelu_backward(const GeluArgs& a) {
  switch (a.dtype) {
    case kFloat32: return gelu_apply<float, true>(a);
    case kFloat64: return gelu_apply<double, true>(a);
    case kBFloat16: return gelu_apply<bf16, true>(a);
  }
}

}  // namespace NF_ISA
}  // namespace nanofast
