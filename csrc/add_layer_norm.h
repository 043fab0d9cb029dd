// The residual add fused with the LayerNorm after it: h = x + residual, y = LayerNorm(h) in one pass
// over the rows, and in the backward dx = dh + LayerNorm'(dy) (the gradient reaching h from the rest of
// the residual stream plus the one through the norm). Unfused, a pre-norm transformer reads and writes
// the stream once more for the add, once more for autograd's sum of h's two gradients, and once more
// for each dtype cast when autocast mixes bf16 layer outputs into the fp32 stream.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernel_table.h"
#include "layer_norm.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// TX: x, h, weight and bias; TR: the residual; TY: y (and dy). Rows are widened on the fly, so the
// accumulation type A is the only type the arithmetic sees.
template <class TX, class TR, class TY>
void add_layer_norm_forward_impl(const AddLayerNormForwardArgs& a) {
  using A = acc_t<TX>;
  constexpr int W = lanes<A>();
  const int64_t N = a.N, C = a.C;
  const TX* x = static_cast<const TX*>(a.x);
  const TR* res = static_cast<const TR*>(a.residual);
  const TX* w = static_cast<const TX*>(a.weight);
  const TX* b = static_cast<const TX*>(a.bias);
  TX* h = static_cast<TX*>(a.h);
  TY* y = static_cast<TY*>(a.y);
  A* mean_out = static_cast<A*>(a.mean);
  A* rstd_out = static_cast<A*>(a.rstd);
  const std::vector<A> wv = widened_param(w, C, A(1)), bv = widened_param(b, C, A(0));

  // y may be streamed (h may not: each pass reads it back)
  const bool stream_y = stream_output(y, N * C * int64_t(sizeof(TY)), C * int64_t(sizeof(TY)));
  const bool wide = C > kLayerNormFlatSumMax;
  // R rows at a time, their passes interleaved: a row of a few hundred columns is a chain of
  // dependent sums, a horizontal reduction, a division and a square root, and on its own it leaves
  // the core waiting on latency. Each row's arithmetic, and so
  // its result, is the same whatever R.
  auto rows = [&](auto R_, int64_t n0) {
    constexpr int R = decltype(R_)::value;
    const TX* xr[R];
    const TR* rr[R];
    TX* hr[R];
    TY* yr[R];
    for (int r = 0; r < R; ++r) {
      xr[r] = x + (n0 + r) * a.x_row_stride;
      rr[r] = res + (n0 + r) * a.residual_row_stride;
      hr[r] = h + (n0 + r) * C;
      yr[r] = y + (n0 + r) * C;
    }
    // pass 1: h = x + residual, stored in x's dtype; the sum of the stored (rounded) values, so the
    // norm is of exactly the h the backward will read back
    vec<A> s[R] = {};
    int64_t c = 0;
    for (; c + W <= C; c += W)
      for (int r = 0; r < R; ++r) {
        vstore_as(hr[r] + c, vload_as(xr[r] + c) + vload_as(rr[r] + c));
        s[r] += vload_as(hr[r] + c);
      }
    const int64_t c_tail = c;
    A mean[R], rstd[R];
    for (int r = 0; r < R; ++r) {
      A sum = vsum(s[r]);
      for (c = c_tail; c < C; ++c) {
        hr[r][c] = from_acc<TX>(to_acc(xr[r][c]) + to_acc(rr[r][c]));
        sum += to_acc(hr[r][c]);
      }
      // a row too wide for one accumulator: layer_norm's blocked sum, read back from the stored h
      if (wide) sum = row_sum(hr[r], C);
      mean[r] = sum / A(C);
    }
    // pass 2: the variance around the mean
    vec<A> q[R] = {};
    if (!wide)
      for (c = 0; c + W <= C; c += W)
        for (int r = 0; r < R; ++r) {
          const vec<A> d = vload_as(hr[r] + c) - mean[r];
          q[r] += d * d;
        }
    bool over[R], any_over = false;  // rows whose sums overflow, redone in their scales after pass 3
    for (int r = 0; r < R; ++r) {
      A var = vsum(q[r]);
      for (c = c_tail; c < C; ++c) var += (to_acc(hr[r][c]) - mean[r]) * (to_acc(hr[r][c]) - mean[r]);
      if (wide) var = row_centered_sq_sum(hr[r], mean[r], C);
      over[r] = !std::isfinite(var);
      any_over |= over[r];
      rstd[r] = A(1) / std::sqrt(var / A(C) + A(a.eps));
      mean_out[n0 + r] = mean[r];
      rstd_out[n0 + r] = rstd[r];
    }
    // pass 3: normalise, scale and shift, stored in y's dtype
    for (c = 0; c + W <= C; c += W)
      for (int r = 0; r < R; ++r)
        vput(yr[r] + c, (vload_as(hr[r] + c) - mean[r]) * rstd[r] * vload(wv.data() + c) + vload(bv.data() + c),
             stream_y);
    for (int r = 0; r < R; ++r)
      for (c = c_tail; c < C; ++c) yr[r][c] = from_acc<TY>((to_acc(hr[r][c]) - mean[r]) * rstd[r] * wv[c] + bv[c]);
    if (any_over) {
      if (stream_y) stream_fence();  // the streamed rows before one is stored over
      for (int r = 0; r < R; ++r)
        if (over[r])
          layer_norm_forward_scaled_row(hr[r], C, wv.data(), bv.data(), A(a.eps), yr[r], mean_out + n0 + r,
                                        rstd_out + n0 + r);
    }
  };
  const int64_t groups = N / 4;
#pragma omp parallel num_threads(a.num_threads) if (N * C > 32768)
  {
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < groups; ++g) rows(std::integral_constant<int, 4>{}, g * 4);
    if (stream_y) stream_fence();
  }
  for (int64_t n = groups * 4; n < N; ++n) rows(std::integral_constant<int, 1>{}, n);
  if (stream_y) stream_fence();
}

template <class TX, class TR, class TY>
void add_layer_norm_backward_impl(const AddLayerNormBackwardArgs& a) {
  using A = acc_t<TX>;
  constexpr int W = lanes<A>();
  const int64_t N = a.N, C = a.C;
  const TY* dy = static_cast<const TY*>(a.dy);
  const TX* dh = static_cast<const TX*>(a.dh);
  const TX* h = static_cast<const TX*>(a.h);
  const TX* w = static_cast<const TX*>(a.weight);
  const A* mean = static_cast<const A*>(a.mean);
  const A* rstd = static_cast<const A*>(a.rstd);
  TX* dx = static_cast<TX*>(a.dx);
  TR* dres = static_cast<TR*>(a.dresidual);
  const bool need_param_grads = a.dweight || a.dbias;
  const std::vector<A> wv = widened_param(w, C, A(1));
  // dweight and dbias: per-chunk partials, reduced pairwise (as layer_norm_backward)
  const LayerNormParamPartials<A> parts(need_param_grads, N, C);
  const int64_t chunks = parts.chunks, chunk_rows = parts.chunk_rows;
  if constexpr (std::is_same<A, float>::value) {
    const bool done = with_register_width<A>(C, [&](auto nv) {
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (N * C > 32768)
      for (int64_t chunk = 0; chunk < chunks; ++chunk)
        layer_norm_backward_chunk_regs<TX, TR, TY, decltype(nv)::value>(
            dy, a.dy_row_stride, h, C, dh, wv.data(), mean, rstd, dx, dres, chunk * chunk_rows,
            std::min(N, (chunk + 1) * chunk_rows), parts.dw ? parts.dw + chunk * C : nullptr,
            parts.db ? parts.db + chunk * C : nullptr);
    });
    if (done) {
      if (need_param_grads)
        layer_norm_reduce_param_grads<TX>(parts.dw, parts.db, chunks, C, static_cast<TX*>(a.dweight),
                                          static_cast<TX*>(a.dbias), a.num_threads);
      return;
    }
  }

  const bool stream_dx = stream_output(dx, N * C * int64_t(sizeof(TX)), C * int64_t(sizeof(TX)));
  const bool stream_dres = dres && stream_output(dres, N * C * int64_t(sizeof(TR)), C * int64_t(sizeof(TR)));
#pragma omp parallel num_threads(a.num_threads) if (N * C > 32768)
  {
#pragma omp for schedule(static) nowait
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      A* pdw = need_param_grads ? parts.dw + chunk * C : nullptr;
      A* pdb = need_param_grads ? parts.db + chunk * C : nullptr;
      if (pdw) {
        std::fill(pdw, pdw + C, A(0));
        std::fill(pdb, pdb + C, A(0));
      }
      for (int64_t n = chunk * chunk_rows; n < std::min(N, (chunk + 1) * chunk_rows); ++n) {
        const TY* dyr = dy + n * a.dy_row_stride;
        const TX* hr = h + n * C;
        const TX* dhr = dh ? dh + n * C : nullptr;
        const A mu = mean[n], rs = rstd[n];
        TX* dxr = dx + n * C;
        TR* drr = dres ? dres + n * C : nullptr;
        // one column's dx (v before dh is added) and parameter-gradient partials
        auto put = [&](int64_t c, A v, A d, A xh) {
          if (dhr) v += to_acc(dhr[c]);
          dxr[c] = from_acc<TX>(v);
          if (drr) drr[c] = from_acc<TR>(v);
          if (pdw) {
            pdw[c] += d * xh;
            pdb[c] += d;
          }
        };
        if (rs < layer_norm_scaled_rstd_below<A>()) {  // deviations that may overflow: layer_norm_scaled.h
          layer_norm_backward_scaled_row(dyr, wv.data(), hr, mu, rs, C, put);
          continue;
        }
        // pass 1: the row means of g = dy * w and of g * xhat
        A sum_g, sum_gx;
        if (C > kLayerNormFlatSumMax) {
          const SumPair<A> sums = row_grad_sums_blocked(dyr, wv.data(), hr, C, [mu](auto v) { return v - mu; });
          sum_g = sums.a;
          sum_gx = sums.b;
        } else {
          vec<A> sg{}, sgx{};
          int64_t c = 0;
          for (; c + W <= C; c += W) {
            const vec<A> g = rounded(vload_as(dyr + c) * vload(wv.data() + c));
            sg += g;
            sgx += g * (vload_as(hr + c) - mu);
          }
          sum_g = vsum(sg);
          sum_gx = vsum(sgx);
          for (; c < C; ++c) {
            const A g = rounded(to_acc(dyr[c]) * wv[c]);
            sum_g += g;
            sum_gx += g * (to_acc(hr[c]) - mu);
          }
        }
        const A mean_g = sum_g / A(C), mean_gx = sum_gx * rs / A(C);
        // pass 2: dx = dh + rstd * (g - mean(g) - xhat * mean(g * xhat)), in x's dtype and the residual's;
        // the parameter-gradient partials
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          const vec<A> d = vload_as(dyr + c), xh = (vload_as(hr + c) - mu) * rs;
          vec<A> v = (rounded(d * vload(wv.data() + c)) - mean_g - xh * mean_gx) * rs;
          if (dhr) v += vload_as(dhr + c);
          vput(dxr + c, v, stream_dx);
          if (drr) vput(drr + c, v, stream_dres);
          if (pdw) {
            vstore(pdw + c, vload(pdw + c) + d * xh);
            vstore(pdb + c, vload(pdb + c) + d);
          }
        }
        for (; c < C; ++c) {
          const A d = to_acc(dyr[c]), xh = (to_acc(hr[c]) - mu) * rs;
          put(c, (rounded(d * wv[c]) - mean_g - xh * mean_gx) * rs, d, xh);
        }
      }
    }
    if (stream_dx || stream_dres) stream_fence();
  }
  if (need_param_grads)
    layer_norm_reduce_param_grads<TX>(parts.dw, parts.db, chunks, C, static_cast<TX*>(a.dweight),
                                      static_cast<TX*>(a.dbias), a.num_threads);
}

// Calls impl<TX, TR, TY> for the supported combinations: everything in one dtype, or float32 rows
// with a bfloat16 residual and/or output.
template <template <class, class, class> class Impl, class Args>
bool add_layer_norm_dispatch(const Args& a) {
  const int x = a.dtype, r = a.residual_dtype, y = a.y_dtype;
  if (x == kFloat64 && r == kFloat64 && y == kFloat64) return Impl<double, double, double>::run(a), true;
  if (x == kBFloat16 && r == kBFloat16 && y == kBFloat16) return Impl<bf16, bf16, bf16>::run(a), true;
  if (x != kFloat32) return false;
  if (r == kFloat32 && y == kFloat32) return Impl<float, float, float>::run(a), true;
  if (r == kBFloat16 && y == kFloat32) return Impl<float, bf16, float>::run(a), true;
  if (r == kFloat32 && y == kBFloat16) return Impl<float, float, bf16>::run(a), true;
  if (r == kBFloat16 && y == kBFloat16) return Impl<float, bf16, bf16>::run(a), true;
  return false;
}

template <class TX, class TR, class TY> struct AddLayerNormForward {
  static void run(const AddLayerNormForwardArgs& a) { add_layer_norm_forward_impl<TX, TR, TY>(a); }
};
template <class TX, class TR, class TY> struct AddLayerNormBackward {
  static void run(const AddLayerNormBackwardArgs& a) { add_layer_norm_backward_impl<TX, TR, TY>(a); }
};

inline bool add_layer_norm_forward(const AddLayerNormForwardArgs& a) {
  return add_layer_norm_dispatch<AddLayerNormForward>(a);
}
inline bool add_layer_norm_backward(const AddLayerNormBackwardArgs& a) {
  return add_layer_norm_dispatch<AddLayerNormBackward>(a);
}

}  // namespace NF_ISA
}  // namespace nanofast
