// Cross-entropy over rows of logits, one sweep per row: each row's loss and, written over the logits,
// its gradient. The row pass of nanofast.ops.linear_cross_entropy, which computes the logits a chunk of
// rows at a time with the GEMMs and hands each chunk here.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
//
// With label smoothing eps (torch's definition), a row with target t and logits z over V classes has
//   loss     = (1 - eps) (lse - z_t) + eps / V * sum_j (lse - z_j)
//   dloss/dz = softmax(z) - (1 - eps) onehot(t) - eps / V.
// Both are computed relative to the row's maximum m (lse - z_j = log s - (z_j - m), s = sum exp(z - m)),
// so large logits lose nothing to cancellation.
//
// Determinism: a row is one thread's, its sums in a fixed lane order; the rows' losses are summed one
// after the other, so no bit depends on the number of threads.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernel_table.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// One row of V logits: returns its loss; when `grad`, overwrites the logits with scale * dloss/dz.
template <class A>
A cross_entropy_row(A* z, int64_t V, int64_t t, A eps, bool grad, A scale) {
  constexpr int W = lanes<A>();
  const int64_t Vw = V / W * W;
  const A ninf = -std::numeric_limits<A>::infinity();
  const A z_t = z[t];
  alignas(64) A tail[W];  // the last V % W logits, padded with -inf (whose exp is 0)
  for (int j = 0; j < W; ++j) tail[j] = Vw + j < V ? z[Vw + j] : ninf;
  // pass 1: the maximum
  vec<A> mv = vload(tail);
  for (int64_t j = 0; j < Vw; j += W) mv = vmaxv<A>(mv, vload(z + j));
  const A m = vmax(mv);
  // pass 2: e = exp(z - m) (kept for the gradient), its sum s, and the sum of z - m, which the smoothing
  // term needs and which is NaN when any logit is (the maximum may have skipped a NaN, and vexp does not
  // propagate one)
  const vec<A> mb = vbroadcast<A>(m);
  vec<A> sv{}, dv{};
  for (int64_t j = 0; j < Vw; j += W) {
    const vec<A> d = vload(z + j) - mb;
    const vec<A> e = vexp(d);
    if (grad) vstore(z + j, e);
    sv += e;
    dv += d;
  }
  const vec<A> dt = vload(tail) - mb;
  const vec<A> et = vexp(dt);
  sv += et;
  A dsum = vsum(dv);
  for (int j = 0; Vw + j < V; ++j) dsum += dt[j];  // (the padding's -inf stays out)
  const A s = vsum(sv), log_s = std::log(s);
  const bool nan = std::isnan(dsum) || std::isnan(m);
  const A nll = log_s - (z_t - m);
  const A loss = nan           ? std::numeric_limits<A>::quiet_NaN()
                 : eps == A(0) ? nll
                               : (A(1) - eps) * nll + eps * (log_s - dsum / A(V));
  if (!grad) return loss;
  // pass 3: the gradient, scale * (e / s - eps / V), and the target's share
  const A inv_s = nan ? std::numeric_limits<A>::quiet_NaN() : scale / s;
  const vec<A> ib = vbroadcast<A>(inv_s), ub = vbroadcast<A>(scale * eps / A(V));
  for (int64_t j = 0; j < Vw; j += W) vstore(z + j, vload(z + j) * ib - ub);
  const vec<A> gt = et * ib - ub;
  for (int j = 0; Vw + j < V; ++j) z[Vw + j] = gt[j];
  z[t] -= scale * (A(1) - eps);
  return loss;
}

template <class A>
CrossEntropyRowsResult cross_entropy_rows_impl(const CrossEntropyRowsArgs& a) {
  const int64_t N = a.N, V = a.V;
  A* logits = static_cast<A*>(a.logits);
  A* loss = static_cast<A*>(a.loss);
  const A* row_scale = static_cast<const A*>(a.row_scale);
  const A eps = A(a.label_smoothing), grad_scale = A(a.grad_scale);
  CrossEntropyRowsResult r{0.0, 0, -1};
  if (!logits) {
    for (int64_t i = 0; i < N; ++i) r.count += a.target[i] != a.ignore_index;
    return r;
  }
  // the targets first: nothing is written when one is out of range
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = a.target[i];
    if (t == a.ignore_index) continue;
    if (t < 0 || t >= V) {
      r.bad_row = i;
      return r;
    }
    ++r.count;
  }
  // a row costs a few passes over V logits: split the rows once there are enough of them to pay for it
  const bool parallel = N > 1 && N * V >= (int64_t(1) << 15);
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (parallel)
  for (int64_t i = 0; i < N; ++i) {
    A* z = logits + i * a.ld;
    const int64_t t = a.target[i];
    if (t == a.ignore_index) {
      loss[i] = A(0);
      if (a.grad) std::fill(z, z + V, A(0));
      continue;
    }
    loss[i] = cross_entropy_row<A>(z, V, t, eps, a.grad, row_scale ? grad_scale * row_scale[i] : grad_scale);
  }
  for (int64_t i = 0; i < N; ++i) r.loss_sum += double(loss[i]);
  return r;
}

inline CrossEntropyRowsResult cross_entropy_rows(const CrossEntropyRowsArgs& a) {
  if (a.dtype == kFloat64) return cross_entropy_rows_impl<double>(a);
  return cross_entropy_rows_impl<float>(a);
}

}  // namespace NF_ISA
}  // namespace nanofast
