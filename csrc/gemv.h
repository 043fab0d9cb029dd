// Matrix-vector products, y (M, N) = x (M, K) @ W (N, K)^T (+ bias) for a few rows of x: nn.Linear's
// product while sampling, one token per sequence. Included by kernels_isa.cpp once per instruction set,
// inside namespace nanofast::NF_ISA.
//
// Why: a decode step multiplies a row per sequence by every weight matrix of the model, so reading
// the weights is the whole cost. Here each row of W is read once, straight from memory, for all M
// rows of x, and the threads split W's rows into contiguous ranges, one stream each. The GEMMs
// (gemm.h, torch's) pack W before multiplying, which reads it twice and writes it once.
//
// Products in float32 (x, W and the bias float32) or in bfloat16 (autocast's: x, W and the bias each
// rounded to bfloat16, any of them float32 or bfloat16 in memory; the products are exact in float32).
// The sums are float32; y is float32 or bfloat16.
//
// Determinism: each y[m][n] is one dot product over k in a fixed order (four vectors of partial sums
// along k, the remainder element by element, then a fixed reduction tree), whatever M, the number of
// threads or the rows next to it.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernel_table.h"
#include "scalar_types.h"
#include "simd.h"

namespace nanofast {
namespace NF_ISA {

// Rows of x per pass over a row of W: MR x 4 accumulators beside the 4 vectors of W (32 vector
// registers with AVX-512, 16 below).
constexpr int kGemvMR = NF_VBYTES == 64 ? 4 : 2;

// Each float rounded to the nearest bfloat16 (ties to even, NaNs kept quiet), as a float.
inline vec<float> vround_bf16(vec<float> f) {
  vu32 u;
  std::memcpy(&u, &f, sizeof u);
  const vu32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const vu32 r = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x400000u) & 0xffff0000u : rounded;
  std::memcpy(&f, &r, sizeof f);
  return f;
}
inline float round_bf16(float v) { return to_acc(from_acc<bf16>(v)); }

// W's elements as floats, rounded to bfloat16 where the products are bfloat16 and W is float32.
template <class TW, bool ROUND> inline vec<float> gemv_load(const TW* p) {
  if constexpr (ROUND) return vround_bf16(vload_as(p));
  else return vload_as(p);
}
template <class TW, bool ROUND> inline float gemv_elem(TW v) { return ROUND ? round_bf16(to_acc(v)) : to_acc(v); }

// sums[m] = x[m] . w over K, for MR rows of x (floats, xs apart). One row of W at a time, read in
// order (the hardware prefetcher follows one stream best), four vectors per step into four partial
// sums, so that no sum waits on the one before.
template <int MR, class TW, bool ROUND>
inline void gemv_row(int64_t K, const float* x, int64_t xs, const TW* w, float sums[MR]) {
  constexpr int V = lanes<float>();
  vec<float> acc[MR][4] = {};
  int64_t k = 0;
  for (; k + 4 * V <= K; k += 4 * V) {
    vec<float> wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = gemv_load<TW, ROUND>(w + k + j * V);
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] += vload(x + m * xs + k + j * V) * wv[j];
  }
  for (; k + V <= K; k += V) {
    const vec<float> wv = gemv_load<TW, ROUND>(w + k);
    for (int m = 0; m < MR; ++m) acc[m][0] += vload(x + m * xs + k) * wv;
  }
  for (int m = 0; m < MR; ++m) {
    float tail = 0;
    for (int64_t j = k; j < K; ++j) tail += x[m * xs + j] * gemv_elem<TW, ROUND>(w[j]);
    sums[m] = vsum((acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3])) + tail;
  }
}

// y[m0..m0+MR)[n] = x[m0..m0+MR) . W[n] (+ bias[n]).
template <int MR, class TW, bool ROUND, class TY, class TB>
inline void gemv_block(const GemvArgs& a, const float* x, int64_t m0, int64_t n) {
  float sums[MR];
  gemv_row<MR, TW, ROUND>(a.K, x + m0 * a.K, a.K, static_cast<const TW*>(a.w) + n * a.w_rs, sums);
  const TB* bias = static_cast<const TB*>(a.bias);
  float b = 0;
  if (bias) b = a.bf16_products ? round_bf16(to_acc(bias[n])) : to_acc(bias[n]);
  TY* y = static_cast<TY*>(a.y);
  for (int m = 0; m < MR; ++m) y[(m0 + m) * a.ldy + n] = from_acc<TY>(bias ? sums[m] + b : sums[m]);
}

// Every row of x against row n of W, kGemvMR rows at a time.
template <class TW, bool ROUND, class TY, class TB>
inline void gemv_rows(const GemvArgs& a, const float* x, int64_t n) {
  int64_t m0 = 0;
  for (; m0 + kGemvMR <= a.M; m0 += kGemvMR) gemv_block<kGemvMR, TW, ROUND, TY, TB>(a, x, m0, n);
  switch (a.M - m0) {  // (kGemvMR is at most 4)
    case 3: return gemv_block<3, TW, ROUND, TY, TB>(a, x, m0, n);
    case 2: return gemv_block<2, TW, ROUND, TY, TB>(a, x, m0, n);
    case 1: return gemv_block<1, TW, ROUND, TY, TB>(a, x, m0, n);
  }
}

// Below this many bytes of W one thread reads it faster than a team starts.
constexpr int64_t kGemvParallelBytes = int64_t(1) << 18;

template <class TW, bool ROUND, class TY, class TB>
void gemv_run(const GemvArgs& a, const float* x) {
  const bool parallel = a.N * a.K * int64_t(sizeof(TW)) >= kGemvParallelBytes;
  // static: each thread reads one contiguous range of W's rows
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (parallel)
  for (int64_t n = 0; n < a.N; ++n) gemv_rows<TW, ROUND, TY, TB>(a, x, n);
}

// x's rows as floats (rounded to bfloat16 for bfloat16 products), K apart: read M x N times, so
// converted once.
template <class TX>
void gemv_rows_of_x(const GemvArgs& a, std::vector<float>& x) {
  x.resize(a.M * a.K);
  for (int64_t m = 0; m < a.M; ++m) {
    const TX* src = static_cast<const TX*>(a.x) + m * a.x_rs;
    float* dst = x.data() + m * a.K;
    convert_row(src, dst, a.K);
    if (a.bf16_products && !std::is_same<TX, bf16>::value)
      for (int64_t k = 0; k < a.K; ++k) dst[k] = round_bf16(dst[k]);
  }
}

template <class F> inline void with_float_or_bf16(int dtype, F&& f) {
  if (dtype == kBFloat16) f(bf16{});
  else f(float{});
}

inline void gemv(const GemvArgs& a) {
  if (a.M == 0 || a.N == 0) return;
  thread_local std::vector<float> x;
  with_float_or_bf16(a.x_dtype, [&](auto tx) { gemv_rows_of_x<decltype(tx)>(a, x); });
  with_float_or_bf16(a.w_dtype, [&](auto tw) {
    using TW = decltype(tw);
    with_float_or_bf16(a.y_dtype, [&](auto ty) {
      using TY = decltype(ty);
      with_float_or_bf16(a.bias_dtype, [&](auto tb) {
        using TB = decltype(tb);
        if (a.bf16_products && std::is_same<TW, float>::value) gemv_run<TW, true, TY, TB>(a, x.data());
        else gemv_run<TW, false, TY, TB>(a, x.data());
      });
    });
  });
}

}  // namespace NF_ISA
}  // namespace nanofast
