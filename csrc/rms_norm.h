// RMSNorm over the last dimension of (N, C) rows, forward and backward, optionally fused with the
// residual add before it (h = x + residual, as add_layer_norm.h does for LayerNorm).
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
#pragma once
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "add_layer_norm.h"
#include "kernel_table.h"
#include "layer_norm.h"
#include "row_sums.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// v rounded to the storage type T and widened back: the cast Hugging Face's LlamaRMSNorm applies to
// the normalised row before the weight multiplies it (nothing for float32 and float64 rows).
template <class T> inline vec<acc_t<T>> vround_to(vec<acc_t<T>> v) {
  if constexpr (std::is_same<T, bf16>::value) {
    alignas(64) bf16 b[lanes<float>()];
    vstore_bf16(b, v);
    return vload_bf16(b);
  }
  return v;
}
template <class T> inline acc_t<T> round_to(acc_t<T> v) { return to_acc(from_acc<T>(v)); }

// The sum of a row's squares in the accumulation type, blocked as layer_norm's row sums.
template <class T> inline acc_t<T> row_sq_sum(const T* row, int64_t C) {
  return row_sum_of(row, C, [](auto v) { return v * v; });
}

// 1 / sqrt(mean(x^2) + eps) from a row's sum of squares. When that sum overflows though the row is
// finite (an element beyond about 1e19 in float32), rstd would be 0 and y zero; as normalising is
// scale-invariant, the sum is then taken again in the row's own scale, a power of two so that the
// scaling is exact.
template <class T> inline acc_t<T> rms_norm_rstd(const T* row, acc_t<T> sq_sum, int64_t C, acc_t<T> eps) {
  using A = acc_t<T>;
  if (!std::isinf(sq_sum)) return A(1) / std::sqrt(sq_sum / A(C) + eps);
  A max_abs = 0;
  for (int64_t c = 0; c < C; ++c) max_abs = std::max(max_abs, std::abs(to_acc(row[c])));
  int e;
  std::frexp(max_abs, &e);  // max_abs < 2^e
  const A down = std::ldexp(A(1), -e);
  // vectorised as the plain sum (layer_norm_scaled.h's sums too): one accumulator along a block loses bits
  const A scaled = row_sum_of(row, C, [down](auto v) {
    const auto d = v * down;
    return d * d;
  });
  // mean(x^2) + eps = 2^(2e) * (scaled / C + eps * 2^(-2e))
  return std::ldexp(A(1) / std::sqrt(scaled / A(C) + eps * down * down), -e);
}

// The multiplier of each column: weight + weight_offset, or 1 without a weight.
template <class T> std::vector<acc_t<T>> rms_norm_weight(const T* w, int64_t C, double offset) {
  std::vector<acc_t<T>> v = widened_param(w, C, acc_t<T>(1));
  if (w && offset != 0.0)
    for (auto& e : v) e = acc_t<T>(offset) + e;
  return v;
}

// h = x + residual stored in x's dtype, and the sum of the stored values' squares (so the norm is of
// exactly the h the backward reads back).
template <class TX, class TR> acc_t<TX> add_rows_sq_sum(const TX* x, const TR* r, TX* h, int64_t C) {
  using A = acc_t<TX>;
  constexpr int W = lanes<A>();
  vec<A> s0{};
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    vstore_as(h + c, vload_as(x + c) + vload_as(r + c));
    const vec<A> v = vload_as(h + c);
    s0 += v * v;
  }
  A s = vsum(s0);
  for (; c < C; ++c) {
    h[c] = from_acc<TX>(to_acc(x[c]) + to_acc(r[c]));
    s += to_acc(h[c]) * to_acc(h[c]);
  }
  return C > kLayerNormFlatSumMax ? row_sq_sum(h, C) : s;  // a wide row: the blocked sum
}

// TX: x, h and the weight; TR: the residual; TY: y (and dy).
template <class TX, class TR, class TY>
void rms_norm_forward_impl(const RmsNormForwardArgs& a) {
  using A = acc_t<TX>;
  constexpr int W = lanes<A>();
  const int64_t N = a.N, C = a.C;
  const TX* x = static_cast<const TX*>(a.x);
  const TR* res = static_cast<const TR*>(a.residual);
  TX* h = static_cast<TX*>(a.h);
  TY* y = static_cast<TY*>(a.y);
  A* rstd_out = static_cast<A*>(a.rstd);
  const std::vector<A> wv = rms_norm_weight(static_cast<const TX*>(a.weight), C, a.weight_offset);
  const bool cast = a.cast_before_weight;
  const bool stream_y = stream_output(y, N * C * int64_t(sizeof(TY)), C * int64_t(sizeof(TY)));
#pragma omp parallel num_threads(a.num_threads) if (N * C > 32768)
  {
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; ++n) {
      const TX* xr = x + n * a.x_row_stride;
      A ss;
      if (res) {
        ss = add_rows_sq_sum(xr, res + n * a.residual_row_stride, h + n * C, C);
        xr = h + n * C;
      } else {
        ss = row_sq_sum(xr, C);
      }
      const A r = rms_norm_rstd(xr, ss, C, A(a.eps));
      rstd_out[n] = r;
      TY* yr = y + n * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        vec<A> v = vload_as(xr + c) * r;
        if (cast) v = vround_to<TX>(v);
        vput(yr + c, v * vload(wv.data() + c), stream_y);
      }
      for (; c < C; ++c) {
        A v = to_acc(xr[c]) * r;
        if (cast) v = round_to<TX>(v);
        yr[c] = from_acc<TY>(v * wv[c]);
      }
    }
    if (stream_y) stream_fence();
  }
}

// The row sum of g * x with g = dy * w, blocked as the forward's sums on rows wider than
// kLayerNormFlatSumMax.
template <class TY, class TX, class A> A row_grad_dot(const TY* dy, const A* w, const TX* x, int64_t C) {
  return row_blocked_sum<A>(C, [=](int64_t c0, int64_t c1) {
    constexpr int W = lanes<A>();
    vec<A> s0{}, s1{};
    int64_t c = c0;
    for (; c + 2 * W <= c1; c += 2 * W) {
      s0 += vload_as(dy + c) * vload(w + c) * vload_as(x + c);
      s1 += vload_as(dy + c + W) * vload(w + c + W) * vload_as(x + c + W);
    }
    for (; c + W <= c1; c += W) s0 += vload_as(dy + c) * vload(w + c) * vload_as(x + c);
    A s = vsum(s0 + s1);
    for (; c < c1; ++c) s += to_acc(dy[c]) * w[c] * to_acc(x[c]);
    return s;
  });
}

template <class TX, class TR, class TY>
void rms_norm_backward_impl(const RmsNormBackwardArgs& a) {
  using A = acc_t<TX>;
  constexpr int W = lanes<A>();
  const int64_t N = a.N, C = a.C;
  const TY* dy = static_cast<const TY*>(a.dy);
  const TX* dh = static_cast<const TX*>(a.dh);
  const TX* x = static_cast<const TX*>(a.x);
  const A* rstd = static_cast<const A*>(a.rstd);
  TX* dx = static_cast<TX*>(a.dx);
  TR* dres = static_cast<TR*>(a.dresidual);
  const std::vector<A> wv = rms_norm_weight(static_cast<const TX*>(a.weight), C, a.weight_offset);
  const bool cast = a.cast_before_weight;
  // dweight: per-chunk partials reduced pairwise, as layer_norm_backward's, so the bits never depend on
  // the thread count
  const int64_t chunk_rows = layer_norm_chunk_rows(N);
  const int64_t chunks = std::max<int64_t>(1, (N + chunk_rows - 1) / chunk_rows);
  std::unique_ptr<A[]> partials(a.dweight ? new A[chunks * C] : nullptr);
  const bool stream_dx = stream_output(dx, N * C * int64_t(sizeof(TX)), C * int64_t(sizeof(TX)));
  const bool stream_dres = dres && stream_output(dres, N * C * int64_t(sizeof(TR)), C * int64_t(sizeof(TR)));
#pragma omp parallel num_threads(a.num_threads) if (N * C > 32768)
  {
#pragma omp for schedule(static) nowait
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      A* pdw = partials ? partials.get() + chunk * C : nullptr;
      if (pdw) std::fill(pdw, pdw + C, A(0));
      for (int64_t n = chunk * chunk_rows; n < std::min(N, (chunk + 1) * chunk_rows); ++n) {
        const TY* dyr = dy + n * a.dy_row_stride;
        const TX* xr = x + n * a.x_row_stride;
        const TX* dhr = dh ? dh + n * C : nullptr;
        const A r = rstd[n];
        // mean(g * xhat) = rstd * sum(g * x) / C
        const A m = row_grad_dot(dyr, wv.data(), xr, C) * r / A(C);
        TX* dxr = dx + n * C;
        TR* drr = dres ? dres + n * C : nullptr;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          const vec<A> d = vload_as(dyr + c), xh = vload_as(xr + c) * r;
          vec<A> v = (d * vload(wv.data() + c) - xh * m) * r;
          if (dhr) v += vload_as(dhr + c);
          vput(dxr + c, v, stream_dx);
          if (drr) vput(drr + c, v, stream_dres);
          if (pdw) vstore(pdw + c, vload(pdw + c) + d * (cast ? vround_to<TX>(xh) : xh));
        }
        for (; c < C; ++c) {
          const A d = to_acc(dyr[c]), xh = to_acc(xr[c]) * r;
          A v = (d * wv[c] - xh * m) * r;
          if (dhr) v += to_acc(dhr[c]);
          dxr[c] = from_acc<TX>(v);
          if (drr) drr[c] = from_acc<TR>(v);
          if (pdw) pdw[c] += d * (cast ? round_to<TX>(xh) : xh);
        }
      }
    }
    if (stream_dx || stream_dres) stream_fence();
  }
  if (partials)
    layer_norm_reduce_param_grads<TX>(partials.get(), nullptr, chunks, C, static_cast<TX*>(a.dweight), nullptr,
                                      a.num_threads);
}

template <class TX, class TR, class TY> struct RmsNormForward {
  static void run(const RmsNormForwardArgs& a) { rms_norm_forward_impl<TX, TR, TY>(a); }
};
template <class TX, class TR, class TY> struct RmsNormBackward {
  static void run(const RmsNormBackwardArgs& a) { rms_norm_backward_impl<TX, TR, TY>(a); }
};

// The dtype combinations are add + LayerNorm's (add_layer_norm_dispatch): one dtype throughout, or
// float32 rows with a bfloat16 residual and/or output.
inline bool rms_norm_forward(const RmsNormForwardArgs& a) { return add_layer_norm_dispatch<RmsNormForward>(a); }
inline bool rms_norm_backward(const RmsNormBackwardArgs& a) { return add_layer_norm_dispatch<RmsNormBackward>(a); }

}  // namespace NF_ISA
}  // namespace nanofast
