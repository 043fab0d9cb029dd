// The row sums LayerNorm and RMSNorm share: flat for ordinary rows, blocked and combined pairwise for
// long ones, in an order that depends on the row's width alone.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
#pragma once
#include <algorithm>
#include <cstdint>

#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// Rows wider than this are summed in fixed blocks whose partial sums are then added pairwise: one
// vector accumulator carried across a very long row grows until every addend loses most of its bits.
// Rows up to it keep the flat sum, its speed and its bits.
constexpr int64_t kLayerNormFlatSumMax = 8192;
constexpr int64_t kLayerNormSumBlock = 4096;

// The sum over a row of C elements of block(c0, c1), the flat sum of the columns [c0, c1): one block
// for rows up to kLayerNormFlatSumMax, else blocks of kLayerNormSumBlock combined in a pairwise tree
// (a stack of completed subtrees, merged as a binary counter carries). The order depends on C alone,
// never on the threads, and the rounding error grows with log2 of the blocks rather than with C.
template <class S, class F> S row_blocked_sum(int64_t C, F&& block) {
  if (C <= kLayerNormFlatSumMax) return block(int64_t(0), C);
  S stack[64];
  int depth = 0;
  int64_t blocks = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kLayerNormSumBlock) {
    S s = block(c0, std::min(C, c0 + kLayerNormSumBlock));
    for (int64_t m = ++blocks; !(m & 1); m >>= 1) s = stack[--depth] + s;
    stack[depth++] = s;
  }
  S s = stack[--depth];
  while (depth) s = stack[--depth] + s;
  return s;
}

// Two sums carried together through row_blocked_sum.
template <class A> struct SumPair {
  A a, b;
  SumPair operator+(const SumPair& o) const { return {a + o.a, b + o.b}; }
};

// The sum of f(x) over a row (f: the identity, or a square for RMSNorm) in the accumulation type
// (bfloat16 rows are widened as they are read), in Accumulators vector sums (1 or 2: two hide the
// adds' latency, one keeps the order LayerNorm's variance has always summed in, and so its bits).
template <int Accumulators = 2, class T, class F> inline acc_t<T> row_sum_of(const T* row, int64_t C, F f) {
  static_assert(Accumulators == 1 || Accumulators == 2, "row_sum_of: one or two accumulators");
  using A = acc_t<T>;
  return row_blocked_sum<A>(C, [row, f](int64_t c0, int64_t c1) {
    constexpr int W = lanes<A>();
    const T* x = row + c0;
    const int64_t n = c1 - c0;
    vec<A> s0{}, s1{};
    int64_t c = 0;
    if constexpr (Accumulators == 2) {
      for (; c + 2 * W <= n; c += 2 * W) {
        s0 += f(vload_as(x + c));
        s1 += f(vload_as(x + c + W));
      }
    }
    for (; c + W <= n; c += W) s0 += f(vload_as(x + c));
    A s = vsum(s0 + s1);  // (s1 is zero with one accumulator: adding it changes no bit of s0)
    for (; c < n; ++c) s += f(to_acc(x[c]));
    return s;
  });
}
template <class T> inline acc_t<T> row_sum(const T* row, int64_t C) {
  return row_sum_of(row, C, [](auto v) { return v; });
}

// The sum of a row's squared deviations from its mean (LayerNorm's variance).
template <class T> inline acc_t<T> row_centered_sq_sum(const T* row, acc_t<T> mean, int64_t C) {
  return row_sum_of<1>(row, C, [mean](auto v) {
    const auto d = v - mean;
    return d * d;
  });
}

// The sums over a row of g = dy * w and of g * dev(x) (dev(x) = x - mean, or xhat in a row's scales),
// blocked as row_blocked_sum: the two row means of the backward on rows wider than kLayerNormFlatSumMax
// (narrower rows keep their flat loop).
template <class TY, class TX, class A, class Dev>
SumPair<A> row_grad_sums_blocked(const TY* dy, const A* w, const TX* x, int64_t C, Dev dev) {
  return row_blocked_sum<SumPair<A>>(C, [=](int64_t c0, int64_t c1) {
    constexpr int W = lanes<A>();
    vec<A> sg{}, sgx{};
    int64_t c = c0;
    for (; c + W <= c1; c += W) {
      const vec<A> g = rounded(vload_as(dy + c) * vload(w + c));
      sg += g;
      sgx += g * dev(vload_as(x + c));
    }
    A sum_g = vsum(sg), sum_gx = vsum(sgx);
    for (; c < c1; ++c) {
      const A g = rounded(to_acc(dy[c]) * w[c]);
      sum_g += g;
      sum_gx += g * dev(to_acc(x[c]));
    }
    return SumPair<A>{sum_g, sum_gx};
  });
}

}  // namespace NF_ISA
}  // namespace nanofast
