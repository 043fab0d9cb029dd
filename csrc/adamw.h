// AdamW over every parameter of a model in one call, with the gradient-norm clip fused in front.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
//
// torch.optim.AdamW (fused or not) plus clip_grad_norm_ walk the parameters several times from Python:
// a norm per tensor, a norm of the norms, a scale of every gradient, then the update. At nanoGPT's CPU
// config (many small tensors) most of that time is dispatch. Here:
//   pass 1 (when clipping): sum of squared gradients, per fixed chunk, the chunks summed in order;
//   pass 2: the AdamW update of each element, the gradient scaled by the clip coefficient on the fly.
// The chunks do not depend on the thread count, so neither do the norm and the update.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernel_table.h"

namespace nanofast {
namespace NF_ISA {

struct AdamWChunk { int64_t tensor, begin, end; };

inline std::vector<AdamWChunk> adamw_chunks(const AdamWArgs& a) {
  constexpr int64_t kChunk = 8192;
  std::vector<AdamWChunk> chunks;
  for (int64_t t = 0; t < a.count; ++t)
    for (int64_t b = 0; b < a.tensors[t].n; b += kChunk) chunks.push_back({t, b, std::min(a.tensors[t].n, b + kChunk)});
  return chunks;
}

// Pass 1: the gradients' global L2 norm, in double, chunk partials summed in chunk order.
inline double adamw_grad_norm(const AdamWArgs& a, const std::vector<AdamWChunk>& chunks) {
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(nc);
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (nc > 4)
  for (int64_t c = 0; c < nc; ++c) {
    const float* g = a.tensors[chunks[c].tensor].grad;
    double lane[8] = {};  // eight running sums the compiler keeps in a vector register
    int64_t i = chunks[c].begin;
    for (; i + 8 <= chunks[c].end; i += 8)
      for (int j = 0; j < 8; ++j) lane[j] += double(g[i + j]) * g[i + j];
    double s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; i < chunks[c].end; ++i) s += double(g[i]) * g[i];
    partial[c] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

// Pass 2 on one chunk: torch.optim.AdamW's formula in float32 (decoupled weight decay, bias-corrected
// moments, eps outside the square root), its scalars worked out in double as torch's Python does.
inline void adamw_update(const AdamWTensor& t, int64_t begin, int64_t end, float grad_scale, float step_size,
                         float sqrt_bias_correction2) {
  const float decay = static_cast<float>(1.0 - t.lr * t.weight_decay);
  const float one_minus_beta1 = static_cast<float>(1.0 - t.beta1), one_minus_beta2 = static_cast<float>(1.0 - t.beta2);
  const float beta2 = static_cast<float>(t.beta2), eps = static_cast<float>(t.eps);
  float* __restrict p = t.param;
  const float* __restrict g = t.grad;
  float* __restrict m = t.exp_avg;
  float* __restrict v = t.exp_avg_sq;
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i] * grad_scale;
    const float mi = m[i] + (gi - m[i]) * one_minus_beta1;  // exp_avg.lerp_(grad, 1 - beta1)
    const float vi = v[i] * beta2 + one_minus_beta2 * gi * gi;
    const float denom = std::sqrt(vi) / sqrt_bias_correction2 + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / denom;
  }
}

// Advances each tensor's step counter, clips (max_grad_norm > 0) and updates. Returns the gradient
// norm before clipping, or -1 when not clipping.
inline double adamw_step(const AdamWArgs& a) {
  const std::vector<AdamWChunk> chunks = adamw_chunks(a);
  double norm = -1.0;
  float grad_scale = 1.0f;
  if (a.max_grad_norm > 0.0) {
    norm = adamw_grad_norm(a, chunks);
    // clip_grad_norm_'s coefficient, in its float32 arithmetic: min(max_norm / (norm + 1e-6), 1)
    const float coef = static_cast<float>(a.max_grad_norm) / (static_cast<float>(norm) + 1e-6f);
    grad_scale = std::min(coef, 1.0f);  // a NaN norm stays NaN, as torch's clamp keeps it
  }
  std::vector<float> step_size(a.count), sqrt_bc2(a.count);
  for (int64_t t = 0; t < a.count; ++t) {
    const AdamWTensor& x = a.tensors[t];
    const double step = static_cast<double>(*x.step) + 1.0;
    *x.step = static_cast<float>(step);
    step_size[t] = static_cast<float>(x.lr / (1.0 - std::pow(x.beta1, step)));
    sqrt_bc2[t] = static_cast<float>(std::sqrt(1.0 - std::pow(x.beta2, step)));
  }
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (nc > 4)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t = chunks[c].tensor;
    adamw_update(a.tensors[t], chunks[c].begin, chunks[c].end, grad_scale, step_size[t], sqrt_bc2[t]);
  }
  return norm;
}

}  // namespace NF_ISA
}  // namespace nanofast
