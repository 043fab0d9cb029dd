// LayerNorm's rows whose plain arithmetic overflows though every element is finite: the row's sum (|x|
// near 1e36 at C = 128 in float32), the sum of its squared deviations (deviations beyond about 1e19),
// or x - mean itself (values near +-3e38). Normalising is scale-invariant, so such a row is taken in its
// own power-of-two scales, where every scaling is exact. The kernels reach it only through one test per
// row: the forward's sum of squared deviations is not finite, or the backward's saved rstd is small
// enough for x - mean to overflow.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "row_sums.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// The largest e whose 2^-e is a normal number: scales stay exact even where denormals are flushed.
template <class A> constexpr int kMaxScaleExponent = 1 - std::numeric_limits<A>::min_exponent;

// A row's statistics in its scales: with x' = x * down (|x'| < 4) and the deviation scale down2
// (|x' - mean_s| * down2 < 1), xhat = (x' - mean_s) * down2 * rstd_s, and mean_s, rstd_s of order 1.
template <class A> struct ScaledRowStats {
  A down, mean_s, down2, rstd_s;
  A mean, rstd;  // what the forward saves: mean_s / down and 1 / sqrt(var + eps), in plain units
  A xhat(A x) const { return (x * down - mean_s) * down2 * rstd_s; }
};

// The statistics of a finite row; false if the row holds an inf or a NaN (the plain arithmetic then
// propagates it, as torch's does).
template <class T> bool layer_norm_scaled_stats(const T* row, int64_t C, acc_t<T> eps, ScaledRowStats<acc_t<T>>* s) {
  using A = acc_t<T>;
  A max_abs = 0;
  for (int64_t c = 0; c < C; ++c) {
    const A v = to_acc(row[c]);
    if (!std::isfinite(v)) return false;
    max_abs = std::max(max_abs, std::abs(v));
  }
  int e1 = 0, e2 = 0;
  std::frexp(max_abs, &e1);  // max_abs < 2^e1
  e1 = std::min(e1, kMaxScaleExponent<A>);
  const A down = std::ldexp(A(1), -e1);
  // the sums vectorised as the plain ones: a single accumulator along a block loses bits
  const A mean_s = row_sum_of(row, C, [down](auto v) { return v * down; }) / A(C);
  A max_dev = 0;
  for (int64_t c = 0; c < C; ++c) max_dev = std::max(max_dev, std::abs(to_acc(row[c]) * down - mean_s));
  s->down = down;
  s->mean_s = mean_s;
  s->mean = std::ldexp(mean_s, e1);
  if (max_dev == 0) {  // every deviation is 0: xhat = 0, and the variance is eps alone
    s->down2 = 1;
    s->rstd_s = 0;
    s->rstd = A(1) / std::sqrt(eps);
    return true;
  }
  std::frexp(max_dev, &e2);  // max_dev < 2^e2
  const A down2 = std::ldexp(A(1), -e2);
  const A sq = row_sum_of(row, C, [=](auto v) {
    const auto d = (v * down - mean_s) * down2;
    return d * d;
  });
  // |x - mean| < 2^e: var + eps = 2^(2e) * (sq / C + eps * 2^(-2e))
  const int e = e1 + e2;
  s->down2 = down2;
  s->rstd_s = A(1) / std::sqrt(sq / A(C) + std::ldexp(eps, -2 * e));
  s->rstd = std::ldexp(s->rstd_s, -e);
  return true;
}

// The forward of one row in its scales: y = xhat * w + b into y (in its storage type), and the saved
// mean and rstd. False, with nothing written, if the row is not finite.
template <class T, class TY>
bool layer_norm_forward_scaled_row(const T* x, int64_t C, const acc_t<T>* w, const acc_t<T>* b, acc_t<T> eps, TY* y,
                                   acc_t<T>* mean, acc_t<T>* rstd) {
  ScaledRowStats<acc_t<T>> s;
  if (!layer_norm_scaled_stats(x, C, eps, &s)) return false;
  for (int64_t c = 0; c < C; ++c) y[c] = from_acc<TY>(s.xhat(to_acc(x[c])) * w[c] + b[c]);
  *mean = s.mean;
  *rstd = s.rstd;
  return true;
}

// Rows whose saved rstd is below this take layer_norm_backward_scaled_row: at or above it, every
// |x - mean| <= sqrt(C) / rstd stays far from overflowing (2^95 in float32), and rstd is a normal number.
template <class A> inline A layer_norm_scaled_rstd_below() { return std::sqrt(std::numeric_limits<A>::min()); }

// The backward of one row whose deviations x - mean may overflow: xhat is taken in the scale of 1 / rstd
// (a power of two), then the usual dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w.
// out(c, dx, dy, xhat) receives each column (dx before any residual gradient is added).
template <class TX, class TY, class A, class Out>
void layer_norm_backward_scaled_row(const TY* dy, const A* w, const TX* x, A mu, A rs, int64_t C, Out&& out) {
  int k = 0;
  if (rs > 0 && std::isfinite(rs)) k = std::min(-std::ilogb(rs), kMaxScaleExponent<A>);  // rs * 2^k ~ 1
  const A down = std::ldexp(A(1), -k), rs_k = std::ldexp(rs, k), mu_k = mu * down;
  auto xhat = [=](auto v) { return (v * down - mu_k) * rs_k; };
  const SumPair<A> sums = row_grad_sums_blocked(dy, w, x, C, xhat);
  const A mean_g = sums.a / A(C), mean_gx = sums.b / A(C);
  for (int64_t c = 0; c < C; ++c) {
    const A d = to_acc(dy[c]), xh = xhat(to_acc(x[c]));
    out(c, (rounded(d * w[c]) - mean_g - xh * mean_gx) * rs, d, xh);
  }
}

}  // namespace NF_ISA
}  // namespace nanofast
