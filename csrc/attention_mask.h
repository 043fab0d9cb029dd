// Which keys a query sees, for the attention kernels (attention.h): by position (causal, a sliding
// window) and through a mask tensor read in place (AttentionMask: any strides, 0 on broadcast dims).
// Included by attention.h inside namespace nanofast::NF_ISA.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernel_table.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// The keys [lo, hi) query i sees by position: j <= i with causal (top-left aligned, torch's
// is_causal), i - window < j with a window.
inline int64_t first_visible_key(int64_t window, int64_t i) {
  return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
}
inline int64_t visible_keys(bool causal, int64_t q_end, int64_t TK) {
  return causal ? std::min(TK, q_end) : TK;  // the keys query q_end - 1 sees end here
}

// One mask element: is the key masked out (a false bool, a -inf float)? And its additive value.
template <class M> inline bool masked_out(M v) {
  if constexpr (std::is_same<M, uint8_t>::value) return v == 0;
  else return to_acc(v) == -std::numeric_limits<decltype(to_acc(v))>::infinity();
}
template <class A, class M> inline A mask_value(M v) {
  if constexpr (std::is_same<M, uint8_t>::value) return v ? A(0) : -std::numeric_limits<A>::infinity();
  else return A(to_acc(v));
}

template <class F> inline void with_mask_type(int dtype, F&& f) {
  switch (dtype) {
    case kBool: return f(uint8_t{});
    case kFloat32: return f(float{});
    case kFloat64: return f(double{});
    case kBFloat16: return f(bf16{});
  }
}

template <class M> inline const M* mask_at(const AttentionMask& m, int64_t b, int64_t h, int64_t i, int64_t j) {
  return static_cast<const M*>(m.ptr) + b * m.sb + h * m.sh + i * m.sq + j * m.sk;
}

// out[c] = the mask's additive value for query i and key j0 + c, c < n (0 or -inf for a bool mask),
// and 0 for c in [n, n_p). The common rows (unit key stride) are contiguous loops the compiler
// vectorises.
template <class A>
inline void mask_row(const AttentionMask& m, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, A* out,
                     int64_t n_p) {
  with_mask_type(m.dtype, [&](auto tag) {
    using M = decltype(tag);
    const M* p = mask_at<M>(m, b, h, i, j0);
    if (m.sk == 1)
      for (int64_t c = 0; c < n; ++c) out[c] = mask_value<A>(p[c]);
    else
      for (int64_t c = 0; c < n; ++c) out[c] = mask_value<A>(p[c * m.sk]);
  });
  std::fill(out + n, out + n_p, A(0));
}

// Whether the mask leaves out every key [j0, j0 + cols) for every query [i0, i0 + rows): the block
// then needs no products at all (padding, a sliding window or a block-sparse pattern passed as a
// mask). Stops at the first key that takes part, so a visible block costs one read.
inline bool mask_block_empty(const AttentionMask& m, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                             int64_t cols) {
  if (m.ptr == nullptr) return false;
  bool empty = true;
  with_mask_type(m.dtype, [&](auto tag) {
    using M = decltype(tag);
    const int64_t nr = m.sq == 0 ? 1 : rows, nc = m.sk == 0 ? 1 : cols;  // broadcast: one row, one key
    for (int64_t r = 0; r < nr && empty; ++r) {
      const M* p = mask_at<M>(m, b, h, i0 + r, j0);
      for (int64_t c = 0; c < nc; ++c)
        if (!masked_out(p[c * m.sk])) {
          empty = false;
          break;
        }
    }
  });
  return empty;
}

// The vector of lanes c..c+W-1 that lie in [lo, hi).
template <class A> inline auto lanes_in(int64_t c, int64_t lo, int64_t hi) {
  using vi = typename VecOf<A>::itype;
  using I = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;  // vi's lanes
  vi lane;
  for (int i = 0; i < lanes<A>(); ++i) lane[i] = I(c + i);
  return (lane >= vi{} + I(lo)) & (lane < vi{} + I(hi));
}

// The general form of attention.h's scale_mask_rowmax: scales a score row, adds the mask's row (madd,
// or none when null), and sets keys outside [lo, valid) and masked-out keys to -inf (masked_fill: a
// NaN score of a masked key stays out); returns the row maximum. ncols: a multiple of the vector width.
template <class A>
inline A scale_mask_rowmax_general(A* s, int64_t ncols, int64_t lo, int64_t valid, A scale, const A* madd) {
  constexpr int W = lanes<A>();
  const vec<A> neg_inf = vbroadcast<A>(-std::numeric_limits<A>::infinity());
  vec<A> mv = neg_inf;
  for (int64_t c = 0; c < ncols; c += W) {
    vec<A> x = vload(s + c) * scale;
    auto in = lanes_in<A>(c, lo, valid);
    if (madd != nullptr) {
      const vec<A> ma = vload(madd + c);
      x += ma;
      in &= ma != neg_inf;
    }
    x = in ? x : neg_inf;
    vstore(s + c, x);
    mv = vmaxv<A>(mv, x);
  }
  return vmax(mv);
}

// The backward's probabilities for one score row on the same keys: p = exp(scale * s + madd - lse) on
// the keys seen, exactly 0 elsewhere. ncols as above; the caller zeroes the columns past it.
template <class A>
inline void masked_probs_row(A* p, int64_t ncols, int64_t lo, int64_t valid, A scale, const A* madd, A lse) {
  constexpr int W = lanes<A>();
  const vec<A> neg_inf = vbroadcast<A>(-std::numeric_limits<A>::infinity()), lse_v = vbroadcast<A>(lse);
  for (int64_t c = 0; c < ncols; c += W) {
    auto in = lanes_in<A>(c, lo, valid);
    vec<A> bias = -lse_v;  // (the same expression as the unmasked row's when the mask adds 0: the same bits)
    if (madd != nullptr) {
      const vec<A> ma = vload(madd + c);
      bias = ma - lse_v;
      in &= ma != neg_inf;
    }
    vstore(p + c, in ? vexp(vload(p + c) * scale + bias) : vec<A>{});
  }
}

// x[c] = 0 for the keys of the row not seen (outside [lo, valid), or masked out): dS there must be
// exactly 0, not 0 * (dP - delta), which is NaN where delta is.
template <class A> inline void zero_unseen(A* x, int64_t ncols, int64_t lo, int64_t valid, const A* madd) {
  constexpr int W = lanes<A>();
  const vec<A> neg_inf = vbroadcast<A>(-std::numeric_limits<A>::infinity());
  for (int64_t c = 0; c < ncols; c += W) {
    auto in = lanes_in<A>(c, lo, valid);
    if (madd != nullptr) in &= vload(madd + c) != neg_inf;
    vstore(x + c, in ? vload(x + c) : vec<A>{});
  }
}

}  // namespace NF_ISA
}  // namespace nanofast
