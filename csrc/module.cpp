// nanofast._C: the Python face of the kernels. Arguments arrive as plain integers (data pointers from
// tensor.data_ptr(), sizes, element strides); the Python layer (nanofast/ops) validates them first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>
#include <vector>

#ifdef NF_HAVE_OPENMP
#include <omp.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "kernel_table.h"
#include "philox.h"

namespace py = pybind11;
using nanofast::kernels;

namespace {

template <class P> P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

using Strides3 = std::tuple<int64_t, int64_t, int64_t>;
nanofast::Strided4 strided(uintptr_t p, const Strides3& s) {
  return {ptr<const void>(p), std::get<0>(s), std::get<1>(s), std::get<2>(s)};
}

// An attention mask: its data pointer (0: none), dtype code and (B, NH, TQ, TK) element strides.
using Strides4 = std::tuple<int64_t, int64_t, int64_t, int64_t>;
nanofast::AttentionMask attention_mask(uintptr_t p, int dtype, const Strides4& s) {
  return {ptr<const void>(p), dtype, std::get<0>(s), std::get<1>(s), std::get<2>(s), std::get<3>(s)};
}

// The matmuls' operand dtypes: float32 or bfloat16 codes, else a ValueError naming the operand.
void check_f32_or_bf16(const char* op, const char* name, int dtype) {
  if (dtype != nanofast::kFloat32 && dtype != nanofast::kBFloat16)
    throw std::invalid_argument(std::string(op) + ": " + name +
                                " must be float32 (0) or bfloat16 (2), got dtype code " + std::to_string(dtype));
}

// Each binding fills its kernel's argument struct member by member (value-initialised first, so a
// member added later starts at zero): a reordered struct cannot mix the arguments up.
void layer_norm_forward(int dtype, int64_t N, int64_t C, uintptr_t x, int64_t x_row_stride, uintptr_t weight,
                        uintptr_t bias, uintptr_t y, uintptr_t mean, uintptr_t rstd, double eps, int num_threads) {
  nanofast::LayerNormForwardArgs a{};
  a.dtype = dtype;
  a.N = N;
  a.C = C;
  a.x = ptr<const void>(x);
  a.x_row_stride = x_row_stride;
  a.weight = ptr<const void>(weight);
  a.bias = ptr<const void>(bias);
  a.y = ptr<void>(y);
  a.mean = ptr<void>(mean);
  a.rstd = ptr<void>(rstd);
  a.eps = eps;
  a.num_threads = num_threads;
  kernels().layer_norm_forward(a);
}

void layer_norm_backward(int dtype, int64_t N, int64_t C, uintptr_t dy, int64_t dy_row_stride, uintptr_t x,
                         int64_t x_row_stride, uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t dx,
                         uintptr_t dweight, uintptr_t dbias, int num_threads) {
  nanofast::LayerNormBackwardArgs a{};
  a.dtype = dtype;
  a.N = N;
  a.C = C;
  a.dy = ptr<const void>(dy);
  a.dy_row_stride = dy_row_stride;
  a.x = ptr<const void>(x);
  a.x_row_stride = x_row_stride;
  a.weight = ptr<const void>(weight);
  a.mean = ptr<const void>(mean);
  a.rstd = ptr<const void>(rstd);
  a.dx = ptr<void>(dx);
  a.dweight = ptr<void>(dweight);
  a.dbias = ptr<void>(dbias);
  a.num_threads = num_threads;
  kernels().layer_norm_backward(a);
}

// Both return false for a dtype combination the fused kernel does not take (nothing is written).
bool add_layer_norm_forward(int dtype, int residual_dtype, int y_dtype, int64_t N, int64_t C, uintptr_t x,
                            int64_t x_row_stride, uintptr_t residual, int64_t residual_row_stride, uintptr_t weight,
                            uintptr_t bias, uintptr_t h, uintptr_t y, uintptr_t mean, uintptr_t rstd, double eps,
                            int num_threads) {
  nanofast::AddLayerNormForwardArgs a{};
  a.dtype = dtype;
  a.residual_dtype = residual_dtype;
  a.y_dtype = y_dtype;
  a.N = N;
  a.C = C;
  a.x = ptr<const void>(x);
  a.x_row_stride = x_row_stride;
  a.residual = ptr<const void>(residual);
  a.residual_row_stride = residual_row_stride;
  a.weight = ptr<const void>(weight);
  a.bias = ptr<const void>(bias);
  a.h = ptr<void>(h);
  a.y = ptr<void>(y);
  a.mean = ptr<void>(mean);
  a.rstd = ptr<void>(rstd);
  a.eps = eps;
  a.num_threads = num_threads;
  return kernels().add_layer_norm_forward(a);
}

bool add_layer_norm_backward(int dtype, int residual_dtype, int y_dtype, int64_t N, int64_t C, uintptr_t dy,
                             int64_t dy_row_stride, uintptr_t dh, uintptr_t h, uintptr_t weight, uintptr_t mean,
                             uintptr_t rstd, uintptr_t dx, uintptr_t dresidual, uintptr_t dweight, uintptr_t dbias,
                             int num_threads) {
  nanofast::AddLayerNormBackwardArgs a{};
  a.dtype = dtype;
  a.residual_dtype = residual_dtype;
  a.y_dtype = y_dtype;
  a.N = N;
  a.C = C;
  a.dy = ptr<const void>(dy);
  a.dy_row_stride = dy_row_stride;
  a.dh = ptr<const void>(dh);
  a.h = ptr<const void>(h);
  a.weight = ptr<const void>(weight);
  a.mean = ptr<const void>(mean);
  a.rstd = ptr<const void>(rstd);
  a.dx = ptr<void>(dx);
  a.dresidual = ptr<void>(dresidual);
  a.dweight = ptr<void>(dweight);
  a.dbias = ptr<void>(dbias);
  a.num_threads = num_threads;
  return kernels().add_layer_norm_backward(a);
}

// Both return false for a dtype combination the kernel does not take (nothing is written).
bool rms_norm_forward(int dtype, int residual_dtype, int y_dtype, int64_t N, int64_t C, uintptr_t x,
                      int64_t x_row_stride, uintptr_t residual, int64_t residual_row_stride, uintptr_t weight,
                      uintptr_t h, uintptr_t y, uintptr_t rstd, double eps, double weight_offset,
                      bool cast_before_weight, int num_threads) {
  nanofast::RmsNormForwardArgs a{};
  a.dtype = dtype;
  a.residual_dtype = residual_dtype;
  a.y_dtype = y_dtype;
  a.N = N;
  a.C = C;
  a.x = ptr<const void>(x);
  a.x_row_stride = x_row_stride;
  a.residual = ptr<const void>(residual);
  a.residual_row_stride = residual_row_stride;
  a.weight = ptr<const void>(weight);
  a.h = ptr<void>(h);
  a.y = ptr<void>(y);
  a.rstd = ptr<void>(rstd);
  a.eps = eps;
  a.weight_offset = weight_offset;
  a.cast_before_weight = cast_before_weight;
  a.num_threads = num_threads;
  return kernels().rms_norm_forward(a);
}

bool rms_norm_backward(int dtype, int residual_dtype, int y_dtype, int64_t N, int64_t C, uintptr_t dy,
                       int64_t dy_row_stride, uintptr_t dh, uintptr_t x, int64_t x_row_stride, uintptr_t weight,
                       uintptr_t rstd, uintptr_t dx, uintptr_t dresidual, uintptr_t dweight, double weight_offset,
                       bool cast_before_weight, int num_threads) {
  nanofast::RmsNormBackwardArgs a{};
  a.dtype = dtype;
  a.residual_dtype = residual_dtype;
  a.y_dtype = y_dtype;
  a.N = N;
  a.C = C;
  a.dy = ptr<const void>(dy);
  a.dy_row_stride = dy_row_stride;
  a.dh = ptr<const void>(dh);
  a.x = ptr<const void>(x);
  a.x_row_stride = x_row_stride;
  a.weight = ptr<const void>(weight);
  a.rstd = ptr<const void>(rstd);
  a.dx = ptr<void>(dx);
  a.dresidual = ptr<void>(dresidual);
  a.dweight = ptr<void>(dweight);
  a.weight_offset = weight_offset;
  a.cast_before_weight = cast_before_weight;
  a.num_threads = num_threads;
  return kernels().rms_norm_backward(a);
}

void attention_forward(int dtype, int64_t B, int64_t NH, int64_t NKV, int64_t TQ, int64_t TK, int64_t HS, int64_t HSV,
                       uintptr_t q, Strides3 qs, uintptr_t k, Strides3 ks, uintptr_t v, Strides3 vs, uintptr_t out,
                       Strides3 os, uintptr_t lse, uintptr_t mask, int mask_dtype, Strides4 ms, int64_t window,
                       double scale, bool causal, double dropout_p, uint64_t seed, int num_threads) {
  if (NKV <= 0 || NH % NKV != 0) throw std::invalid_argument("attention_forward: NKV must divide NH");
  nanofast::AttentionForwardArgs a{};
  a.dtype = dtype;
  a.B = B;
  a.NH = NH;
  a.NKV = NKV;
  a.TQ = TQ;
  a.TK = TK;
  a.HS = HS;
  a.HSV = HSV;
  a.q = strided(q, qs);
  a.k = strided(k, ks);
  a.v = strided(v, vs);
  a.out = strided(out, os);
  a.lse = ptr<void>(lse);
  a.mask = attention_mask(mask, mask_dtype, ms);
  a.window = window;
  a.scale = scale;
  a.causal = causal;
  a.dropout_p = dropout_p;
  a.seed = seed;
  a.num_threads = num_threads;
  kernels().attention_forward(a);
}

void attention_backward(int dtype, int64_t B, int64_t NH, int64_t NKV, int64_t TQ, int64_t TK, int64_t HS, int64_t HSV,
                        uintptr_t q, Strides3 qs, uintptr_t k, Strides3 ks, uintptr_t v, Strides3 vs, uintptr_t out,
                        Strides3 os, uintptr_t dout, Strides3 dos, uintptr_t lse, uintptr_t dq, Strides3 dqs,
                        uintptr_t dk, Strides3 dks, uintptr_t dv, Strides3 dvs, uintptr_t mask, int mask_dtype,
                        Strides4 ms, int64_t window, double scale, bool causal, double dropout_p, uint64_t seed,
                        int num_threads) {
  if (NKV <= 0 || NH % NKV != 0) throw std::invalid_argument("attention_backward: NKV must divide NH");
  nanofast::AttentionBackwardArgs a{};
  a.dtype = dtype;
  a.B = B;
  a.NH = NH;
  a.NKV = NKV;
  a.TQ = TQ;
  a.TK = TK;
  a.HS = HS;
  a.HSV = HSV;
  a.q = strided(q, qs);
  a.k = strided(k, ks);
  a.v = strided(v, vs);
  a.out = strided(out, os);
  a.dout = strided(dout, dos);
  a.lse = ptr<const void>(lse);
  a.dq = strided(dq, dqs);
  a.dk = strided(dk, dks);
  a.dv = strided(dv, dvs);
  a.mask = attention_mask(mask, mask_dtype, ms);
  a.window = window;
  a.scale = scale;
  a.causal = causal;
  a.dropout_p = dropout_p;
  a.seed = seed;
  a.num_threads = num_threads;
  kernels().attention_backward(a);
}

void gelu(int dtype, int64_t n, uintptr_t x, uintptr_t dy, uintptr_t out, int num_threads, uintptr_t grad, bool tanh) {
  nanofast::GeluArgs a{};
  a.dtype = dtype;
  a.n = n;
  a.x = ptr<const void>(x);
  a.dy = ptr<const void>(dy);
  a.out = ptr<void>(out);
  a.num_threads = num_threads;
  a.grad = ptr<void>(grad);
  a.tanh = tanh;
  if (dy) kernels().gelu_backward(a);
  else kernels().gelu_forward(a);
}

// The forward with dy == 0 (out written), else the backward (dgate and dup written).
void glu(int dtype, int activation, int64_t N, int64_t C, uintptr_t gate, int64_t gate_row_stride, uintptr_t up,
         int64_t up_row_stride, uintptr_t dy, uintptr_t out, uintptr_t dgate, uintptr_t dup, int num_threads) {
  if (activation < nanofast::kSilu || activation > nanofast::kGeluTanh)
    throw std::invalid_argument("glu: unknown activation code " + std::to_string(activation));
  nanofast::GluArgs a{};
  a.dtype = dtype;
  a.activation = activation;
  a.N = N;
  a.C = C;
  a.gate = ptr<const void>(gate);
  a.gate_row_stride = gate_row_stride;
  a.up = ptr<const void>(up);
  a.up_row_stride = up_row_stride;
  a.dy = ptr<const void>(dy);
  a.out = ptr<void>(out);
  a.dgate = ptr<void>(dgate);
  a.dup = ptr<void>(dup);
  a.num_threads = num_threads;
  if (dy) kernels().glu_backward(a);
  else kernels().glu_forward(a);
}

nanofast::RopeTensor rope_tensor(const Strides3& sizes, uintptr_t x, const Strides3& xs, uintptr_t out,
                                 const Strides3& os, const Strides3& cs) {
  nanofast::RopeTensor t{};
  std::tie(t.n0, t.n1, t.n2) = sizes;
  t.x = ptr<const void>(x);
  std::tie(t.xs0, t.xs1, t.xs2) = xs;
  t.out = ptr<void>(out);
  std::tie(t.os0, t.os1, t.os2) = os;
  std::tie(t.cs0, t.cs1, t.cs2) = cs;
  return t;
}

// Returns false for a dtype combination the kernel does not take (nothing is written).
bool rope(int dtype, int cos_dtype, int out_dtype, int64_t D, int64_t R, uintptr_t cos, uintptr_t sin, Strides3 q_sizes,
          uintptr_t q, Strides3 q_strides, uintptr_t q_out, Strides3 q_out_strides, Strides3 q_cos_strides,
          Strides3 k_sizes, uintptr_t k, Strides3 k_strides, uintptr_t k_out, Strides3 k_out_strides,
          Strides3 k_cos_strides, bool interleaved, bool backward, int num_threads) {
  if (R < 0 || R > D || R % 2)
    throw std::invalid_argument("rope: the rotary dim must be even and at most the head dim, got R=" +
                                std::to_string(R) + ", D=" + std::to_string(D));
  nanofast::RopeArgs a{};
  a.dtype = dtype;
  a.cos_dtype = cos_dtype;
  a.out_dtype = out_dtype;
  a.D = D;
  a.R = R;
  a.cos = ptr<const void>(cos);
  a.sin = ptr<const void>(sin);
  a.t[0] = rope_tensor(q_sizes, q, q_strides, q_out, q_out_strides, q_cos_strides);
  a.t[1] = rope_tensor(k_sizes, k, k_strides, k_out, k_out_strides, k_cos_strides);
  a.interleaved = interleaved;
  a.backward = backward;
  a.num_threads = num_threads;
  return kernels().rope(a);
}

void dropout(int dtype, int64_t n, uintptr_t x, uintptr_t out, uint64_t seed, double p, int num_threads) {
  nanofast::DropoutArgs a{};
  a.dtype = dtype;
  a.n = n;
  a.x = ptr<const void>(x);
  a.out = ptr<void>(out);
  a.seed = seed;
  a.p = p;
  a.num_threads = num_threads;
  kernels().dropout(a);
}

bool gemm(int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t a_rs, int64_t a_cs, uintptr_t b, int64_t b_rs,
          int64_t b_cs, uintptr_t c, int64_t ldc, uintptr_t bias, bool accumulate, int num_threads) {
  if (!kernels().has_gemm_f32) return false;
  nanofast::GemmArgs g{};
  g.M = M;
  g.N = N;
  g.K = K;
  g.a = ptr<const float>(a);
  g.a_rs = a_rs;
  g.a_cs = a_cs;
  g.b = ptr<const float>(b);
  g.b_rs = b_rs;
  g.b_cs = b_cs;
  g.c = ptr<float>(c);
  g.ldc = ldc;
  g.bias = ptr<const float>(bias);
  g.accumulate = accumulate;
  g.num_threads = num_threads;
  kernels().gemm_f32(g);
  return true;
}

bool gemm_bf16(int64_t M, int64_t N, int64_t K, uintptr_t a, int64_t a_rs, int64_t a_cs, int a_dtype, uintptr_t b,
               int64_t b_rs, int64_t b_cs, int b_dtype, uintptr_t c, int64_t ldc, int c_dtype, uintptr_t bias,
               int bias_dtype, bool accumulate, int num_threads) {
  check_f32_or_bf16("gemm_bf16", "a", a_dtype);
  check_f32_or_bf16("gemm_bf16", "b", b_dtype);
  check_f32_or_bf16("gemm_bf16", "c", c_dtype);
  if (bias) check_f32_or_bf16("gemm_bf16", "bias", bias_dtype);
  if (accumulate && c_dtype != nanofast::kFloat32)
    throw std::invalid_argument("gemm_bf16: accumulate (C += A @ B) needs a float32 C");
  if (!kernels().has_gemm_bf16) return false;
  nanofast::GemmBf16Args g{};
  g.M = M;
  g.N = N;
  g.K = K;
  g.a = ptr<const void>(a);
  g.a_rs = a_rs;
  g.a_cs = a_cs;
  g.a_dtype = a_dtype;
  g.b = ptr<const void>(b);
  g.b_rs = b_rs;
  g.b_cs = b_cs;
  g.b_dtype = b_dtype;
  g.c = ptr<void>(c);
  g.ldc = ldc;
  g.c_dtype = c_dtype;
  g.bias = ptr<const void>(bias);
  g.bias_dtype = bias_dtype;
  g.accumulate = accumulate;
  g.num_threads = num_threads;
  kernels().gemm_bf16(g);
  return true;
}

void gemv(int64_t M, int64_t N, int64_t K, uintptr_t x, int64_t x_rs, int x_dtype, uintptr_t w, int64_t w_rs,
          int w_dtype, uintptr_t bias, int bias_dtype, uintptr_t y, int64_t ldy, int y_dtype, bool bf16_products,
          int num_threads) {
  check_f32_or_bf16("gemv", "x", x_dtype);
  check_f32_or_bf16("gemv", "w", w_dtype);
  check_f32_or_bf16("gemv", "y", y_dtype);
  if (bias) check_f32_or_bf16("gemv", "bias", bias_dtype);
  if (!bf16_products && (x_dtype != nanofast::kFloat32 || w_dtype != nanofast::kFloat32 ||
                         y_dtype != nanofast::kFloat32 || (bias && bias_dtype != nanofast::kFloat32)))
    throw std::invalid_argument("gemv: float32 products need float32 x, w, bias and y");
  nanofast::GemvArgs g{};
  g.M = M;
  g.N = N;
  g.K = K;
  g.x = ptr<const void>(x);
  g.x_rs = x_rs;
  g.x_dtype = x_dtype;
  g.w = ptr<const void>(w);
  g.w_rs = w_rs;
  g.w_dtype = w_dtype;
  g.bias = ptr<const void>(bias);
  g.bias_dtype = bias ? bias_dtype : nanofast::kFloat32;
  g.y = ptr<void>(y);
  g.ldy = ldy;
  g.y_dtype = y_dtype;
  g.bf16_products = bf16_products;
  g.num_threads = num_threads;
  kernels().gemv(g);
}

// ptrs: (param, grad, exp_avg, exp_avg_sq, step) per tensor; settings: (lr, weight_decay, beta1, beta2,
// eps) per tensor.
double adamw_step(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& sizes,
                  const std::vector<double>& settings, double max_grad_norm, int num_threads) {
  const size_t n = sizes.size();
  if (ptrs.size() != 5 * n || settings.size() != 5 * n)
    throw std::invalid_argument("adamw_step: 5 pointers and 5 settings per tensor");
  std::vector<nanofast::AdamWTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    const uintptr_t* p = &ptrs[5 * i];
    const double* s = &settings[5 * i];
    nanofast::AdamWTensor& t = tensors[i];
    t.param = ptr<float>(p[0]);
    t.grad = ptr<const float>(p[1]);
    t.exp_avg = ptr<float>(p[2]);
    t.exp_avg_sq = ptr<float>(p[3]);
    t.step = ptr<float>(p[4]);
    t.n = sizes[i];
    t.lr = s[0];
    t.weight_decay = s[1];
    t.beta1 = s[2];
    t.beta2 = s[3];
    t.eps = s[4];
  }
  nanofast::AdamWArgs a{};
  a.tensors = tensors.data();
  a.count = static_cast<int64_t>(n);
  a.max_grad_norm = max_grad_norm;
  a.num_threads = num_threads;
  return kernels().adamw_step(a);
}

// glibc returns a freed block to the kernel when it was mmap-ed (every block above a threshold that
// starts at 128 KiB and never passes 32 MiB) or when the free space at the top of the heap passes the
// trim threshold; the next tensor of that size then page-faults on every 4 KiB page. A training step
// frees and reallocates the same tensors each iteration, so: every block from the heap (no mmap), and
// the heap never trimmed. Returns false where the C library is not glibc (nothing changed).
bool retain_freed_memory() {
#if defined(__GLIBC__)
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, -1) == 1;
#else
  return false;
#endif
}

void dropout_mask(uint64_t seed, int64_t B, int64_t NH, int64_t TQ, int64_t TK, float p, uintptr_t out,
                  int num_threads) {
  kernels().dropout_mask(seed, B, NH, TQ, TK, p, ptr<uint8_t>(out), num_threads);
}

// Returns (the rows' loss sum, the count of rows not ignored, the first row with an out-of-range target
// or -1).
std::tuple<double, int64_t, int64_t> cross_entropy_rows(int dtype, int64_t N, int64_t V, uintptr_t logits, int64_t ld,
                                                        uintptr_t target, int64_t ignore_index, double label_smoothing,
                                                        double grad_scale, uintptr_t row_scale, bool grad,
                                                        uintptr_t loss, int num_threads) {
  nanofast::CrossEntropyRowsArgs a{};
  a.dtype = dtype;
  a.N = N;
  a.V = V;
  a.logits = ptr<void>(logits);
  a.ld = ld;
  a.target = ptr<const int64_t>(target);
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.grad_scale = grad_scale;
  a.row_scale = ptr<const void>(row_scale);
  a.grad = grad;
  a.loss = ptr<void>(loss);
  a.num_threads = num_threads;
  const nanofast::CrossEntropyRowsResult r = kernels().cross_entropy_rows(a);
  return {r.loss_sum, r.count, r.bad_row};
}

// Returns how many rows torch.multinomial would refuse (their out[b] is -1).
int64_t multinomial_from_uniform(int64_t B, int64_t V, uintptr_t probs, int64_t probs_row_stride, uintptr_t u,
                                 uintptr_t out) {
  nanofast::MultinomialArgs a{};
  a.B = B;
  a.V = V;
  a.probs = ptr<const float>(probs);
  a.probs_row_stride = probs_row_stride;
  a.u = ptr<const double>(u);
  a.out = ptr<int64_t>(out);
  return kernels().multinomial_from_uniform(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nanofast's C++/OpenMP CPU kernels (raw pointers; use nanofast.ops)";
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("layer_norm_forward", &layer_norm_forward, release());
  m.def("layer_norm_backward", &layer_norm_backward, release());
  m.def("add_layer_norm_forward", &add_layer_norm_forward, release());
  m.def("add_layer_norm_backward", &add_layer_norm_backward, release());
  m.def("rms_norm_forward", &rms_norm_forward, release());
  m.def("rms_norm_backward", &rms_norm_backward, release());
  m.def("attention_forward", &attention_forward, release());
  m.def("attention_backward", &attention_backward, release());
  m.def("dropout_mask", &dropout_mask, release());
  m.def("rope", &rope, release(), "rotary embedding of q and k (backward: the transposed map)");
  m.def("dropout", &dropout, release(), "out = x * keep(seed, i) / (1 - p); the backward is the same call on dy");
  m.def("gelu", &gelu, release(),
        "forward with dy == 0, else backward; grad: gelu'(x) saved by the forward; tanh: the tanh approximation",
        py::arg("dtype"), py::arg("n"), py::arg("x"), py::arg("dy"), py::arg("out"), py::arg("num_threads"),
        py::arg("grad") = 0, py::arg("tanh") = false);
  m.def("glu", &glu, release(), "act(gate) * up (activation 0 silu, 1 gelu, 2 gelu tanh); backward when dy != 0");
  m.def("gemm", &gemm, release(),
        "float32 C = A @ B (+ bias) through strides; false (nothing done) where the ISA has no GEMM");
  m.def("has_gemm", &nanofast::use_gemm_f32,
        "whether float32 matmuls use nanofast's GEMM: the selected instruction set has one (AVX-512) and "
        "the CPU is not Intel's, or NANOFAST_GEMM=1");
  m.def("gemm_bf16", &gemm_bf16, release(),
        "C = A @ B (+ bias) with bfloat16 products and float32 sums; A, B, bias float32 or bfloat16 (rounded on "
        "the way in), C float32 or bfloat16; false (nothing done) where the ISA has no bfloat16 dot product");
  m.def("has_gemm_bf16", &nanofast::use_gemm_bf16,
        "whether bfloat16 matmuls use nanofast's GEMM: the selected instruction set has AVX512-BF16 and the "
        "CPU is not Intel's, or NANOFAST_GEMM=1");
  m.def("gemv", &gemv, release(),
        "y = x @ W^T (+ bias) for a few rows of x (unit column strides), W read once; float32 products, or "
        "bf16_products with x, W, bias float32 or bfloat16 (rounded on the way in); y float32 or bfloat16");
  m.def("has_gemv", &nanofast::use_gemv,
        "whether matrix-vector products use nanofast's: the CPU is not Intel's, or NANOFAST_GEMM=1");
  m.def("adamw_step", &adamw_step, release(), "clip (max_grad_norm > 0) and AdamW-step float32 tensors");
  m.def("cross_entropy_rows", &cross_entropy_rows, release(),
        "each row's cross-entropy and (grad) its gradient over the logits; (loss sum, count, bad row or -1)");
  m.def("multinomial_from_uniform", &multinomial_from_uniform, release(),
        "torch.multinomial(probs, 1) from the float64 uniforms its exponentials come from; the refused rows' count");
  m.def("retain_freed_memory", &retain_freed_memory, "glibc malloc: no mmap-ed blocks, no heap trimming");
  m.def("philox_uniform", &nanofast::philox_uniform, "the dropout generator's uniform at (seed, offset)");
  m.def("isa", [] { return std::string(kernels().isa); }, "the instruction set the kernels run with");
  m.def("available_isas", [] { return std::string(nanofast::available_isas()); });
  m.def("select_isa", [](const std::string& name) {
    if (!nanofast::select_isa(name.c_str()))
      throw std::invalid_argument("nanofast: instruction set '" + name +
                                  "' is not available on this CPU (available: " + nanofast::available_isas() + ")");
  });
  m.def("has_openmp", [] {
#ifdef NF_HAVE_OPENMP
    return true;
#else
    return false;
#endif
  });
}
