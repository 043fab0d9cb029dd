// One draw per row from unnormalised probabilities, as torch.multinomial(probs, 1) draws it on the CPU
// from the same uniforms: sampling's last step (nanofast.generation.multinomial).
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
//
// torch's one-sample path is the exponential race: an exponential q_i = -log1p(-u_i) per entry, from
// a float64 uniform u_i, rounded to float32, then the first index of the largest p_i / q_i in float32.
// The caller draws the u_i with torch.rand(float64), which takes them from the generator exactly as
// torch's exponential_ does; what costs torch its time is the logarithm of every entry, and only the
// entries that can win need one. Since u <= -log1p(-u) <= u / (1 - u) on [0, 1):
//   p (1 - u) / u  <=  p / q  <=  p / u.
// Pass 1 finds the largest lower bound t; pass 2 computes p / q exactly as torch does (the same
// ::log1p, the same roundings) for the entries whose upper bound reaches t, widened by a margin far
// above the roundings' few parts in 1e7, and keeps the winner by torch's argmax rule (the first of
// equal values; a NaN wins, the first NaN). Typically one or two entries of a row pass.
#pragma once
#include <cmath>
#include <cstring>
#include <limits>

#include "kernel_table.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// As many floats as a vec<double> holds doubles: a row of probabilities read beside its uniforms.
typedef float f32_for_f64 __attribute__((vector_size(NF_VBYTES / 2)));

inline vec<double> vload_f32_as_f64(const float* p) {
  f32_for_f64 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vec<double>);
}

// Whether float v beats the best so far under torch's argmax (entries visited in index order).
inline bool argmax_beats(float v, float best) { return std::isnan(best) ? false : (std::isnan(v) || v > best); }

// One row: the drawn index, or -1 where torch.multinomial refuses the row (an entry negative, NaN or
// infinite, or every entry 0).
inline int64_t multinomial_row(const float* p, const double* u, int64_t V) {
  constexpr int W = lanes<double>();
  typedef typename VecOf<double>::itype ivec;
  const vec<double> zero = vbroadcast(0.0), one = vbroadcast(1.0), big = vbroadcast(std::numeric_limits<double>::max());
  vec<double> t = zero;  // the lower bounds' maximum, lane by lane
  ivec bad = ivec{}, any = ivec{};
  int64_t i = 0;
  // pass 1: the largest lower bound; entries outside [0, inf) and rows without a positive entry
  for (; i + W <= V; i += W) {
    const vec<double> pi = vload_f32_as_f64(p + i), ui = vload(u + i);
    bad |= ~((pi >= zero) & (pi <= big));  // (NaN fails both)
    any |= pi > zero;
    t = vmaxv<double>(pi * (one - ui) / ui, t);  // (0 / 0 is NaN, which the select skips)
  }
  double tm = vmax(t);
  bool row_bad = false, row_any = false;
  for (int j = 0; j < W; ++j) row_bad |= bad[j] != 0, row_any |= any[j] != 0;
  for (; i < V; ++i) {
    const double pi = p[i], ui = u[i];
    row_bad |= !(pi >= 0.0 && pi <= std::numeric_limits<double>::max());
    row_any |= pi > 0.0;
    const double lb = pi * (1.0 - ui) / ui;
    if (lb > tm) tm = lb;
  }
  if (row_bad || !row_any) return -1;
  // pass 2: the exact race among the entries whose upper bound p / u reaches the threshold (p >= thr * u,
  // without a division; u = 0 always passes)
  const double thr = tm * (1.0 - 1e-5);
  const vec<double> thr_v = vbroadcast(thr);
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_i = -1;
  auto race = [&](int64_t k) {
    const float q = static_cast<float>(-1.0 * ::log1p(-u[k]));  // torch's exponential_(1), rounded to float
    const float v = p[k] / q;
    if (best_i < 0 || argmax_beats(v, best)) best = v, best_i = k;
  };
  i = 0;
  for (; i + W <= V; i += W) {
    const vec<double> pi = vload_f32_as_f64(p + i), ui = vload(u + i);
    const ivec pass = (pi >= thr_v * ui) | (ui == zero);
    bool any_pass = false;
    for (int j = 0; j < W; ++j) any_pass |= pass[j] != 0;
    if (!any_pass) continue;
    for (int j = 0; j < W; ++j)
      if (pass[j]) race(i + j);
  }
  for (; i < V; ++i)
    if (double(p[i]) >= thr * u[i] || u[i] == 0.0) race(i);
  return best_i;
}

inline int64_t multinomial_from_uniform(const MultinomialArgs& a) {
  int64_t refused = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    a.out[b] = multinomial_row(a.probs + b * a.probs_row_stride, a.u + b * a.V, a.V);
    refused += a.out[b] < 0;
  }
  return refused;
}

}  // namespace NF_ISA
}  // namespace nanofast
