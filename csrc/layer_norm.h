// LayerNorm over the last dimension of an (N, C) matrix, forward and backward.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
#pragma once
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernel_table.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// A row in the accumulation type. float32 rows are used in place; bfloat16 rows are widened into a
// per-thread buffer first so every later pass runs on plain floats.
template <class T> struct RowView {
  std::vector<acc_t<T>> buf;
  const acc_t<T>* load(const T* src, int64_t C) {
    buf.resize(C);
    convert_row(src, buf.data(), C);
    return buf.data();
  }
};
template <> struct RowView<float> {
  const float* load(const float* src, int64_t) { return src; }
};
template <> struct RowView<double> {
  const double* load(const double* src, int64_t) { return src; }
};

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

// The sum of f(x) over a row (f: the identity, or a square for RMSNorm), and the sum of its squared
// deviations from mean, in the accumulation type (bfloat16 rows are widened as they are read).
template <class T, class F> inline acc_t<T> row_sum_of(const T* row, int64_t C, F f) {
  using A = acc_t<T>;
  return row_blocked_sum<A>(C, [row, f](int64_t c0, int64_t c1) {
    constexpr int W = lanes<A>();
    const T* x = row + c0;
    const int64_t n = c1 - c0;
    vec<A> s0{}, s1{};
    int64_t c = 0;
    for (; c + 2 * W <= n; c += 2 * W) {
      s0 += f(vload_as(x + c));
      s1 += f(vload_as(x + c + W));
    }
    for (; c + W <= n; c += W) s0 += f(vload_as(x + c));
    A s = vsum(s0 + s1);
    for (; c < n; ++c) s += f(to_acc(x[c]));
    return s;
  });
}
template <class T> inline acc_t<T> row_sum(const T* row, int64_t C) {
  return row_sum_of(row, C, [](auto v) { return v; });
}

template <class T> inline acc_t<T> row_centered_sq_sum(const T* row, acc_t<T> mean, int64_t C) {
  using A = acc_t<T>;
  return row_blocked_sum<A>(C, [row, mean](int64_t c0, int64_t c1) {
    constexpr int W = lanes<A>();
    const T* x = row + c0;
    const int64_t n = c1 - c0;
    vec<A> s0{};
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      vec<A> d = vload_as(x + c) - mean;
      s0 += d * d;
    }
    A s = vsum(s0);
    for (; c < n; ++c) {
      A d = to_acc(x[c]) - mean;
      s += d * d;
    }
    return s;
  });
}

// The sums over a row of g = dy * w and of g * (x - mean), blocked as row_blocked_sum: the two row
// means of the backward on rows wider than kLayerNormFlatSumMax (narrower rows keep their flat loop).
template <class TY, class TX, class A>
SumPair<A> row_grad_sums_blocked(const TY* dy, const A* w, const TX* x, A mu, int64_t C) {
  return row_blocked_sum<SumPair<A>>(C, [=](int64_t c0, int64_t c1) {
    constexpr int W = lanes<A>();
    vec<A> sg{}, sgx{};
    int64_t c = c0;
    for (; c + W <= c1; c += W) {
      const vec<A> g = vload_as(dy + c) * vload(w + c);
      sg += g;
      sgx += g * (vload_as(x + c) - mu);
    }
    A sum_g = vsum(sg), sum_gx = vsum(sgx);
    for (; c < c1; ++c) {
      const A g = to_acc(dy[c]) * w[c];
      sum_g += g;
      sum_gx += g * (to_acc(x[c]) - mu);
    }
    return SumPair<A>{sum_g, sum_gx};
  });
}

// 1 / sqrt(variance + eps) from a row's sum of squared deviations. When that sum overflows though the
// row is finite (a deviation beyond about 1e19 in float32), rstd would be 0 and y the bias; as
// normalising is scale-invariant, the sum is then taken again in the row's own scale, a power of two
// so that the scaling is exact.
template <class T>
inline acc_t<T> layer_norm_rstd(const T* row, acc_t<T> mean, acc_t<T> sq_sum, int64_t C, acc_t<T> eps) {
  using A = acc_t<T>;
  if (!std::isinf(sq_sum) || !std::isfinite(mean)) return A(1) / std::sqrt(sq_sum / A(C) + eps);
  A max_dev = 0;
  for (int64_t c = 0; c < C; ++c) max_dev = std::max(max_dev, std::abs(to_acc(row[c]) - mean));
  int e;
  std::frexp(max_dev, &e);  // max_dev < 2^e
  const A down = std::ldexp(A(1), -e);
  const A scaled = row_blocked_sum<A>(C, [&](int64_t c0, int64_t c1) {
    A s = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const A d = (to_acc(row[c]) - mean) * down;
      s += d * d;
    }
    return s;
  });
  // var + eps = 2^(2e) * (scaled / C + eps * 2^(-2e))
  return std::ldexp(A(1) / std::sqrt(scaled / A(C) + eps * down * down), -e);
}

// A parameter vector widened once to the accumulation type, `identity` everywhere when it is missing
// (weight 1, bias 0), so the row loops have no branches.
template <class T> std::vector<acc_t<T>> widened_param(const T* p, int64_t C, acc_t<T> identity) {
  std::vector<acc_t<T>> v(C, identity);
  if (p)
    for (int64_t c = 0; c < C; ++c) v[c] = to_acc(p[c]);
  return v;
}

// Rows whose width is exactly NV vectors of float32 are held in registers: one load (widened from
// bfloat16 on the way), then the mean, the variance around it and the output all come from registers
// (the common case: C = 128, 384, ...).
template <class T, class A, int NV>
inline void layer_norm_forward_row_regs(const T* xr, const A* w, const A* b, T* yr, A eps, A* mean_out, A* rstd_out) {
  constexpr int W = lanes<A>();
  vec<A> r[NV], s0{}, s1{};
  for (int i = 0; i < NV; ++i) {
    r[i] = vload_as(xr + i * W);
    (i & 1 ? s1 : s0) += r[i];
  }
  const A mean = vsum(s0 + s1) / A(NV * W);
  vec<A> q0{}, q1{};
  for (int i = 0; i < NV; ++i) {
    r[i] -= mean;
    (i & 1 ? q1 : q0) += r[i] * r[i];
  }
  const A rstd = layer_norm_rstd(xr, mean, vsum(q0 + q1), NV * W, eps);
  for (int i = 0; i < NV; ++i) vstore_as(yr + i * W, r[i] * rstd * vload(w + i * W) + vload(b + i * W));
  *mean_out = mean;
  *rstd_out = rstd;
}

template <class T, class A, int NV>
void layer_norm_forward_regs(const LayerNormForwardArgs& a, const T* x, const A* wv, const A* bv, T* y) {
  A* mean = static_cast<A*>(a.mean);
  A* rstd = static_cast<A*>(a.rstd);
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (a.N * a.C > 32768)
  for (int64_t n = 0; n < a.N; ++n)
    layer_norm_forward_row_regs<T, A, NV>(x + n * a.x_row_stride, wv, bv, y + n * a.C, A(a.eps), mean + n, rstd + n);
}

// Calls fn(std::integral_constant<int, NV>) if C is NV vectors for one of the register-resident widths
// (up to 16 vectors: beyond that the row no longer fits the register file and spills cost more).
template <class A, class Fn> bool with_register_width(int64_t C, Fn&& fn) {
  constexpr int W = lanes<A>();
  if (C % W) return false;
  switch (C / W) {
    case 1: fn(std::integral_constant<int, 1>()); return true;
    case 2: fn(std::integral_constant<int, 2>()); return true;
    case 4: fn(std::integral_constant<int, 4>()); return true;
    case 6: fn(std::integral_constant<int, 6>()); return true;
    case 8: fn(std::integral_constant<int, 8>()); return true;
    case 12: fn(std::integral_constant<int, 12>()); return true;
    case 16: fn(std::integral_constant<int, 16>()); return true;
  }
  return false;
}

template <class T>
void layer_norm_forward_impl(const LayerNormForwardArgs& a) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  const int64_t N = a.N, C = a.C;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  A* mean_out = static_cast<A*>(a.mean);
  A* rstd_out = static_cast<A*>(a.rstd);
  const std::vector<A> wv = widened_param(w, C, A(1)), bv = widened_param(b, C, A(0));
  if constexpr (std::is_same<A, float>::value) {  // float32 and bfloat16 rows
    if (with_register_width<A>(
            C, [&](auto nv) { layer_norm_forward_regs<T, A, decltype(nv)::value>(a, x, wv.data(), bv.data(), y); }))
      return;
  }

  const bool stream =
      std::is_same<T, float>::value && stream_output(y, N * C * int64_t(sizeof(T)), C * int64_t(sizeof(T)));
#pragma omp parallel num_threads(a.num_threads) if (N * C > 32768)
  {
    RowView<T> view;
    std::vector<A> out_row(std::is_same<T, A>::value ? 0 : C);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; ++n) {
      const A* xr = view.load(x + n * a.x_row_stride, C);
      // pass 1: mean; pass 2: variance around it (two passes over an L1-resident row, more accurate
      // than E[x^2] - E[x]^2 for rows with a large mean).
      const A mean = row_sum(xr, C) / A(C);
      const A rstd = layer_norm_rstd(xr, mean, row_centered_sq_sum(xr, mean, C), C, A(a.eps));
      mean_out[n] = mean;
      rstd_out[n] = rstd;
      // pass 3: normalise, scale and shift.
      A* yr = std::is_same<T, A>::value ? reinterpret_cast<A*>(y + n * C) : out_row.data();
      int64_t c = 0;
      for (; c + W <= C; c += W)
        vput(yr + c, (vload(xr + c) - mean) * rstd * vload(wv.data() + c) + vload(bv.data() + c), stream);
      for (; c < C; ++c) yr[c] = (xr[c] - mean) * rstd * wv[c] + bv[c];
      if (!std::is_same<T, A>::value) convert_row(yr, y + n * C, C);
    }
    if (stream) stream_fence();
  }
}

// dweight and dbias are sums over rows. Rows are cut into chunks whose size depends on N alone and each
// chunk's partial sums go to its own buffer, then the buffers are added in a fixed pairwise order: the
// result is bitwise the same whatever the number of threads. Chunks are at least 16 rows and at most
// 64 in number: enough to share among threads, few enough that the partials stay small beside the
// rows (zeroing, writing and reducing them is not free).
constexpr int64_t kLayerNormChunkRows = 16;
constexpr int64_t kLayerNormMaxChunks = 64;

inline int64_t layer_norm_chunk_rows(int64_t N) {
  const int64_t rows = (N + kLayerNormMaxChunks - 1) / kLayerNormMaxChunks;
  return std::max(kLayerNormChunkRows, (rows + kLayerNormChunkRows - 1) / kLayerNormChunkRows * kLayerNormChunkRows);
}

// The per-chunk partials of dweight and dbias (none when neither is wanted), left uninitialised: each
// chunk writes its own (the register path) or zeroes them first.
template <class A> struct LayerNormParamPartials {
  int64_t chunk_rows, chunks;
  std::unique_ptr<A[]> buf;
  A* dw = nullptr;
  A* db = nullptr;
  LayerNormParamPartials(bool needed, int64_t N, int64_t C)
      : chunk_rows(layer_norm_chunk_rows(N)), chunks(std::max<int64_t>(1, (N + chunk_rows - 1) / chunk_rows)) {
    if (!needed) return;
    buf.reset(new A[2 * chunks * C]);
    dw = buf.get();
    db = dw + chunks * C;
  }
};

// The register-resident backward of the rows [n0, n1) when a row is NV float vectors (float32 or
// bfloat16 storage, widened on load), shared with add_layer_norm: xhat stays in registers between the
// two passes, and the chunk's dweight/dbias partials (when wanted: pdw non-null) are summed in
// registers and stored once, not loaded and stored back for every row.
// dx = dh + rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w; dh and dres (a copy of dx in the
// residual's dtype) may be null.
template <class TX, class TR, class TY, int NV>
void layer_norm_backward_chunk_regs(const TY* dy, int64_t dy_row_stride, const TX* x, int64_t x_row_stride,
                                    const TX* dh, const float* wv, const float* mean, const float* rstd, TX* dx,
                                    TR* dres, int64_t n0, int64_t n1, float* pdw, float* pdb) {
  constexpr int W = lanes<float>(), C = NV * W;
  vec<float> dw[NV] = {}, db[NV] = {};
  for (int64_t n = n0; n < n1; ++n) {
    const TY* dyr = dy + n * dy_row_stride;
    const TX* xr = x + n * x_row_stride;
    const float mu = mean[n], rs = rstd[n];
    // pass 1: xhat; the row means of g and of g * xhat
    vec<float> xh[NV], sg{}, sgx{};
    for (int i = 0; i < NV; ++i) {
      xh[i] = (vload_as(xr + i * W) - mu) * rs;
      const vec<float> g = vload_as(dyr + i * W) * vload(wv + i * W);
      sg += g;
      sgx += g * xh[i];
    }
    const float mean_g = vsum(sg) / float(C), mean_gx = vsum(sgx) / float(C);
    // pass 2: dx (g again from dy: a load costs less than NV more registers); the partials
    for (int i = 0; i < NV; ++i) {
      const vec<float> d = vload_as(dyr + i * W);
      vec<float> v = (d * vload(wv + i * W) - mean_g - xh[i] * mean_gx) * rs;
      if (dh) v += vload_as(dh + n * C + i * W);
      vstore_as(dx + n * C + i * W, v);
      if (dres) vstore_as(dres + n * C + i * W, v);
      if (pdw) {
        dw[i] += d * xh[i];
        db[i] += d;
      }
    }
  }
  if (pdw)
    for (int i = 0; i < NV; ++i) {
      vstore(pdw + i * W, dw[i]);
      vstore(pdb + i * W, db[i]);
    }
}

// The backward over all rows; NV > 0 selects the register-resident row for float32 rows of NV vectors.
template <class T, int NV>
void layer_norm_backward_rows(const LayerNormBackwardArgs& a, const acc_t<T>* wv,
                              const LayerNormParamPartials<acc_t<T>>& parts) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  const int64_t N = a.N, C = a.C;
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  const A* mean = static_cast<const A*>(a.mean);
  const A* rstd = static_cast<const A*>(a.rstd);
  T* dx = static_cast<T*>(a.dx);
  const bool need_param_grads = parts.dw != nullptr;
  const int64_t rows_per_chunk = parts.chunk_rows, chunks = parts.chunks;
  const bool stream =
      NV == 0 && std::is_same<T, float>::value && stream_output(dx, N * C * int64_t(sizeof(T)), C * int64_t(sizeof(T)));
#pragma omp parallel num_threads(a.num_threads) if (N * C > 32768)
  {
    RowView<T> xview, dyview;
    std::vector<A> dx_row(std::is_same<T, A>::value ? 0 : C);
#pragma omp for schedule(static) nowait
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      A* pdw = need_param_grads ? parts.dw + chunk * C : nullptr;
      A* pdb = need_param_grads ? parts.db + chunk * C : nullptr;
      const int64_t n_end = std::min(N, (chunk + 1) * rows_per_chunk);
      if constexpr (NV > 0) {
        layer_norm_backward_chunk_regs<float, float, float, NV>(dy, a.dy_row_stride, x, a.x_row_stride, nullptr, wv,
                                                                mean, rstd, dx, nullptr, chunk * rows_per_chunk, n_end,
                                                                pdw, pdb);
        continue;
      }
      if (pdw) {
        std::fill(pdw, pdw + C, A(0));
        std::fill(pdb, pdb + C, A(0));
      }
      for (int64_t n = chunk * rows_per_chunk; n < n_end; ++n) {
        const A* xr = xview.load(x + n * a.x_row_stride, C);
        const A* dyr = dyview.load(dy + n * a.dy_row_stride, C);
        const A mu = mean[n], rs = rstd[n];
        // pass 1: the two row means the input gradient needs, of g = dy * w and of g * xhat.
        // (xhat and g are recomputed in pass 2: loads from L1 are cheaper than storing them.)
        A sum_g, sum_gx;
        if (C > kLayerNormFlatSumMax) {
          const SumPair<A> sums = row_grad_sums_blocked(dyr, wv, xr, mu, C);
          sum_g = sums.a;
          sum_gx = sums.b;
        } else {
          vec<A> sg{}, sgx{};
          int64_t c = 0;
          for (; c + W <= C; c += W) {
            const vec<A> gv = vload(dyr + c) * vload(wv + c);
            sg += gv;
            sgx += gv * (vload(xr + c) - mu);
          }
          sum_g = vsum(sg);
          sum_gx = vsum(sgx);
          for (; c < C; ++c) {
            sum_g += dyr[c] * wv[c];
            sum_gx += dyr[c] * wv[c] * (xr[c] - mu);
          }
        }
        const A mean_g = sum_g / A(C), mean_gx = sum_gx * rs / A(C);
        // pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); parameter-gradient partials.
        A* dxr = std::is_same<T, A>::value ? reinterpret_cast<A*>(dx + n * C) : dx_row.data();
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          const vec<A> d = vload(dyr + c), xh = (vload(xr + c) - mu) * rs;
          vput(dxr + c, (d * vload(wv + c) - mean_g - xh * mean_gx) * rs, stream);
          if (pdw) {
            vstore(pdw + c, vload(pdw + c) + d * xh);
            vstore(pdb + c, vload(pdb + c) + d);
          }
        }
        for (; c < C; ++c) {
          const A xh = (xr[c] - mu) * rs;
          dxr[c] = (dyr[c] * wv[c] - mean_g - xh * mean_gx) * rs;
          if (pdw) {
            pdw[c] += dyr[c] * xh;
            pdb[c] += dyr[c];
          }
        }
        if (!std::is_same<T, A>::value) convert_row(dxr, dx + n * C, C);
      }
    }
    if (stream) stream_fence();
  }
}

// Reduces the per-chunk partials of dweight and dbias pairwise (a fixed tree, so the order never
// depends on the threads, and the rounding error grows with log2(chunks) rather than chunks),
// vectorised along the columns, then writes them out (dw or db may be null; pdb too, with db: RMSNorm
// has no bias).
template <class T>
void layer_norm_reduce_param_grads(acc_t<T>* pdw, acc_t<T>* pdb, int64_t chunks, int64_t C, T* dw, T* db,
                                   int num_threads) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  for (int64_t stride = 1; stride < chunks; stride *= 2) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (chunks * C > 262144)
    for (int64_t k = 0; k < chunks - stride; k += 2 * stride) {
      for (A* part : {pdw, pdb}) {
        if (!part) continue;
        A* dst = part + k * C;
        const A* src = part + (k + stride) * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) vstore(dst + c, vload(dst + c) + vload(src + c));
        for (; c < C; ++c) dst[c] += src[c];
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    if (dw) dw[c] = from_acc<T>(pdw[c]);
    if (db) db[c] = from_acc<T>(pdb[c]);
  }
}

template <class T>
void layer_norm_backward_impl(const LayerNormBackwardArgs& a) {
  using A = acc_t<T>;
  const int64_t C = a.C;
  const T* w = static_cast<const T*>(a.weight);
  const std::vector<A> wv = widened_param(w, C, A(1));
  const LayerNormParamPartials<A> parts(a.dweight || a.dbias, a.N, C);
  bool done = false;
  if constexpr (std::is_same<T, float>::value)
    done = with_register_width<A>(
        C, [&](auto nv) { layer_norm_backward_rows<T, decltype(nv)::value>(a, wv.data(), parts); });
  if (!done) layer_norm_backward_rows<T, 0>(a, wv.data(), parts);

  if (parts.dw)
    layer_norm_reduce_param_grads<T>(parts.dw, parts.db, parts.chunks, C, static_cast<T*>(a.dweight),
                                     static_cast<T*>(a.dbias), a.num_threads);
}

inline void layer_norm_forward(const LayerNormForwardArgs& a) {
  with_storage_type(a.dtype, [&](auto t) { layer_norm_forward_impl<decltype(t)>(a); });
}

inline void layer_norm_backward(const LayerNormBackwardArgs& a) {
  with_storage_type(a.dtype, [&](auto t) { layer_norm_backward_impl<decltype(t)>(a); });
}

}  // namespace NF_ISA
}  // namespace nanofast
