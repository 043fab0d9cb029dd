// The interface between the Python bindings (module.cpp) and the kernels, which are compiled once per
// instruction set (kernels_isa.cpp). Everything crosses as raw pointers, sizes and element strides:
// the extension never sees a torch::Tensor, so it builds without libtorch.
#pragma once
#include <cstdint>

namespace nanofast {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kBool = 3 };  // kBool: attention masks only

// Shapes use llm.c's names: rows N and channels C for LayerNorm; batch B, heads NH, query and key
// lengths TQ and TK, head size HS (query/key) and HSV (value), key/value heads NKV for attention.
struct LayerNormForwardArgs {
  int dtype;
  int64_t N, C;
  const void* x;
  int64_t x_row_stride;
  const void* weight;  // may be null
  const void* bias;    // may be null
  void* y;             // contiguous (N, C)
  void* mean;          // (N,), accumulation type: double for float64 input, float otherwise
  void* rstd;          // (N,), same type as mean
  double eps;
  int num_threads;
};

struct LayerNormBackwardArgs {
  int dtype;
  int64_t N, C;
  const void* dy;
  int64_t dy_row_stride;
  const void* x;
  int64_t x_row_stride;
  const void* weight;  // may be null
  const void* mean;
  const void* rstd;
  void* dx;       // contiguous (N, C)
  void* dweight;  // may be null: not needed
  void* dbias;    // may be null: not needed
  int num_threads;
};

// h = x + residual, y = LayerNorm(h), over (N, C) rows: a pre-norm transformer's residual add fused
// with the LayerNorm that follows it. x, h, weight and bias share one dtype; the residual and y may
// be bfloat16 beside float32 rows (autocast: a bf16 layer output added to the fp32 stream, the
// normalised row going on into a bf16 matmul).
struct AddLayerNormForwardArgs {
  int dtype, residual_dtype, y_dtype;
  int64_t N, C;
  const void* x;
  int64_t x_row_stride;
  const void* residual;
  int64_t residual_row_stride;
  const void* weight;  // may be null
  const void* bias;    // may be null
  void* h;             // contiguous (N, C)
  void* y;             // contiguous (N, C)
  void* mean;          // (N,), accumulation type
  void* rstd;
  double eps;
  int num_threads;
};

// dx = dh + LayerNorm'(dy); the residual's gradient is the same values in its own dtype.
struct AddLayerNormBackwardArgs {
  int dtype, residual_dtype, y_dtype;
  int64_t N, C;
  const void* dy;
  int64_t dy_row_stride;
  const void* dh;      // may be null (h not used further); contiguous (N, C) otherwise
  const void* h;       // contiguous (N, C)
  const void* weight;  // may be null
  const void* mean;
  const void* rstd;
  void* dx;         // contiguous (N, C)
  void* dresidual;  // may be null: not needed, or the caller reuses dx (same dtype)
  void* dweight;    // may be null
  void* dbias;      // may be null
  int num_threads;
};

// RMSNorm over (N, C) rows, optionally after a residual add: h = x (+ residual), y = h * rstd * w with
// rstd = 1 / sqrt(mean(h^2) + eps) and w = weight + weight_offset (1 where there is no weight).
// cast_before_weight rounds h * rstd to x's dtype before the weight multiplies it (Hugging Face's
// LlamaRMSNorm); otherwise y is rounded once (torch's F.rms_norm, Gemma's (1 + weight)). With a
// residual, x, h and weight share one dtype and the residual and y may be bfloat16 beside float32 rows
// (as AddLayerNormForwardArgs); without one, all three dtypes are x's.
struct RmsNormForwardArgs {
  int dtype, residual_dtype, y_dtype;
  int64_t N, C;
  const void* x;
  int64_t x_row_stride;
  const void* residual;  // may be null: a plain RMSNorm of x
  int64_t residual_row_stride;
  const void* weight;  // may be null
  void* h;             // contiguous (N, C), written when there is a residual
  void* y;             // contiguous (N, C)
  void* rstd;          // (N,), accumulation type
  double eps;
  double weight_offset;
  bool cast_before_weight;
  int num_threads;
};

// dx = dh + rstd * (g - xhat * mean(g * xhat)) with g = dy * w and xhat = x * rstd; dweight is the sum
// over rows of dy * xhat (xhat rounded as the forward rounded it). x is the forward's h where it had a
// residual, whose gradient is dx again in the residual's dtype.
struct RmsNormBackwardArgs {
  int dtype, residual_dtype, y_dtype;
  int64_t N, C;
  const void* dy;
  int64_t dy_row_stride;
  const void* dh;  // may be null; contiguous (N, C) otherwise
  const void* x;
  int64_t x_row_stride;
  const void* weight;  // may be null
  const void* rstd;
  void* dx;         // contiguous (N, C)
  void* dresidual;  // may be null: no residual, or the caller reuses dx (same dtype)
  void* dweight;    // may be null: not needed
  double weight_offset;
  bool cast_before_weight;
  int num_threads;
};

// A (B, NH, T, HS) tensor: data pointer and the element strides of its first three dims; the last
// dim must have stride 1.
struct Strided4 {
  const void* ptr;
  int64_t sb, sh, st;
};

// An attention mask as torch's scaled_dot_product_attention takes it, read in place as a (B, NH, TQ, TK)
// tensor: element strides, 0 along the dims it is broadcast over. kBool: key j takes part in query i's
// softmax iff the byte is nonzero; a float dtype: the value is added to the scaled score (-inf excludes).
struct AttentionMask {
  const void* ptr;  // null: no mask
  int dtype;        // kBool, or kFloat32 / kFloat64 / kBFloat16
  int64_t sb, sh, sq, sk;
};

// Query head h reads key/value head h / (NH / NKV) (grouped-query attention; NKV == NH without it).
// Keys a query sees: those the mask keeps, and by position j <= i with causal, i - window < j with a
// window (window > 0, always with causal: Mistral's sliding window). A query that sees no key gets a
// zero output and lse = +inf (so the backward's exp(s - lse) is 0 for it), as torch returns zeros.
struct AttentionForwardArgs {
  int dtype;
  int64_t B, NH, TQ, TK, HS, HSV, NKV;
  Strided4 q, k, v, out;  // out.ptr is written; k and v have NKV heads
  void* lse;              // (B, NH, TQ) contiguous, accumulation type; natural-log logsumexp
  AttentionMask mask;
  int64_t window;  // 0: none
  double scale;
  bool causal;       // key j is visible to query i iff j <= i (torch's is_causal)
  double dropout_p;  // the keep test compares in float32 (as Triton does); the rescale uses it in full
  uint64_t seed;
  int num_threads;
};

struct AttentionBackwardArgs {
  int dtype;
  int64_t B, NH, TQ, TK, HS, HSV, NKV;
  Strided4 q, k, v, out, dout;
  const void* lse;
  Strided4 dq, dk, dv;  // written; dk and dv have NKV heads, each the sum over its group's query heads
  AttentionMask mask;
  int64_t window;
  double scale;
  bool causal;
  double dropout_p;  // the keep test compares in float32 (as Triton does); the rescale uses it in full
  uint64_t seed;
  int num_threads;
};

// Elementwise GELU over n contiguous elements (tanh: its tanh approximation): out = gelu(x), or
// out = dy * gelu'(x) when backward.
// With `grad` (n elements of the accumulation type), the forward also writes gelu'(x) there, and the
// backward reads it instead of x (x may then be null): out = dy * grad, the same bits, no erf or exp.
struct GeluArgs {
  int dtype;
  int64_t n;
  const void* x;
  const void* dy;  // backward only
  void* out;
  int num_threads;
  void* grad = nullptr;
  bool tanh = false;
};

// The activations of gated MLPs: act(gate) * up.
enum Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

// A gated MLP's activation over (N, C) rows of gate and up (row strides, unit column stride):
// out = act(gate) * up, or in the backward dgate = dy * up * act'(gate) and dup = dy * act(gate).
struct GluArgs {
  int dtype;
  int activation;  // an Activation
  int64_t N, C;
  const void* gate;
  int64_t gate_row_stride;
  const void* up;
  int64_t up_row_stride;
  const void* dy;  // backward: contiguous (N, C)
  void* out;       // forward: contiguous (N, C)
  void* dgate;     // backward: contiguous (N, C)
  void* dup;       // backward: contiguous (N, C)
  int num_threads;
};

// One tensor of a rotary embedding: (n0, n1, n2, D) rows with element strides over the leading dims
// (the last dim has unit stride), its output's strides, and cos's and sin's strides over the same
// leading dims (0 where they broadcast).
struct RopeTensor {
  int64_t n0, n1, n2;
  const void* x;
  int64_t xs0, xs1, xs2;
  void* out;
  int64_t os0, os1, os2;
  int64_t cs0, cs1, cs2;
};

// The rotary position embedding of q and k in one pass: out = x * cos + rotate(x) * sin over the first
// R columns (rotate: (-x2, x1) over the two halves, or over each pair (2i, 2i + 1) when interleaved),
// the columns past R copied. backward applies the transposed map (the rotation by -theta) to the
// outputs' gradients. cos and sin are R wide with unit last strides; x, cos and out have the dtypes
// dtype, cos_dtype and out_dtype (all one, or bfloat16 beside float32 cos and out: forward's x, or
// backward's dx).
struct RopeArgs {
  int dtype, cos_dtype, out_dtype;
  int64_t D, R;
  const void* cos;
  const void* sin;
  RopeTensor t[2];  // q and k; a tensor without rows is skipped
  bool interleaved;
  bool backward;
  int num_threads;
};

// Dropout of n contiguous elements keyed by seed (element i kept iff the generator keeps offset i);
// the same call on the output gradient is the backward.
struct DropoutArgs {
  int dtype;
  int64_t n;
  const void* x;
  void* out;
  uint64_t seed;
  double p;
  int num_threads;
};

// One parameter tensor of an AdamW step: contiguous float32 parameter, gradient and moments of n
// elements, the step counter (a float32 scalar, advanced by the kernel) and its group's settings.
struct AdamWTensor {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* step;
  int64_t n;
  double lr, weight_decay, beta1, beta2, eps;
};

struct AdamWArgs {
  const AdamWTensor* tensors;
  int64_t count;
  double max_grad_norm;  // > 0: clip the global gradient norm to it first (clip_grad_norm_)
  int num_threads;
};

// C (M, N) = A (M, K) @ B (K, N) (+ bias) in float32. A and B are read through element strides
// (row stride, column stride), so transposed views need no copy; C is row-major with row stride ldc.
// accumulate: C += A @ B instead (bias ignored).
struct GemmArgs {
  int64_t M, N, K;
  const float* a;
  int64_t a_rs, a_cs;
  const float* b;
  int64_t b_rs, b_cs;
  float* c;
  int64_t ldc;
  const float* bias;  // (N,), may be null
  bool accumulate;
  int num_threads;
};

// C (M, N) = A (M, K) @ B (K, N) (+ bias) with the products in bfloat16 and the sums in float32. A, B and
// the bias are float32 or bfloat16 (a_dtype, b_dtype, bias_dtype: kFloat32 or kBFloat16), each element
// rounded to bfloat16 on the way in; C is float32 (accumulate: C += A @ B, bias ignored) or bfloat16.
struct GemmBf16Args {
  int64_t M, N, K;
  const void* a;
  int64_t a_rs, a_cs;
  int a_dtype;
  const void* b;
  int64_t b_rs, b_cs;
  int b_dtype;
  void* c;
  int64_t ldc;
  int c_dtype;
  const void* bias;  // (N,), may be null
  int bias_dtype;
  bool accumulate;
  int num_threads;
};

// y (M, N) = x (M, K) @ W (N, K)^T (+ bias) for a few rows of x (sampling's matrix-vector products).
// x's and W's rows have unit column strides. Products in float32 (every operand float32) or, with
// bf16_products, in bfloat16 (x, W and the bias float32 or bfloat16, each rounded to bfloat16 on the way
// in); float32 sums; y float32 or bfloat16. Dtypes are kFloat32 or kBFloat16 codes.
struct GemvArgs {
  int64_t M, N, K;
  const void* x;
  int64_t x_rs;
  int x_dtype;
  const void* w;
  int64_t w_rs;
  int w_dtype;
  const void* bias;  // (N,), may be null
  int bias_dtype;
  void* y;
  int64_t ldy;
  int y_dtype;
  bool bf16_products;
  int num_threads;
};

// Cross-entropy over rows of logits (the accumulation type: dtype kFloat32 or kFloat64): each row's
// loss and, when grad, the gradient of the loss written over the row, times grad_scale and row_scale[i]
// (1 where row_scale is null). Rows whose target is ignore_index get loss 0 and a zero gradient. The
// targets are checked first: one outside [0, V) (and not ignore_index) stops the kernel before it writes
// anything. With null logits the kernel only counts the targets that are not ignore_index.
struct CrossEntropyRowsArgs {
  int dtype;
  int64_t N, V;
  void* logits;  // (N, V), row stride ld, unit column stride; may be null
  int64_t ld;
  const int64_t* target;  // (N,)
  int64_t ignore_index;
  double label_smoothing;
  double grad_scale;
  const void* row_scale;  // (N,) of dtype, may be null
  bool grad;
  void* loss;  // (N,) of dtype
  int num_threads;
};

struct CrossEntropyRowsResult {
  double loss_sum;  // the rows' losses summed in row order
  int64_t count;    // rows whose target is not ignore_index
  int64_t bad_row;  // the first row with a target out of range (nothing computed), else -1
};

// One draw per row of (B, V) float32 probabilities from (B, V) float64 uniforms, torch.multinomial's
// (multinomial.h): out[b] the drawn index, or -1 for a row torch refuses. Returns the refused rows' count.
struct MultinomialArgs {
  int64_t B, V;
  const float* probs;  // unit column stride
  int64_t probs_row_stride;
  const double* u;  // contiguous (B, V)
  int64_t* out;     // (B,)
};

// One instruction set's kernels, filled member by member in kernels_isa.cpp. The GEMMs exist only on
// some instruction sets: has_gemm_f32 and has_gemm_bf16 say whether this table has them (their
// pointers are null otherwise).
struct KernelTable {
  const char* isa = nullptr;
  bool has_gemm_f32 = false;   // AVX-512 (below it, torch's float32 matmul is as fast)
  bool has_gemm_bf16 = false;  // AVX512-BF16 (below it, no bfloat16 dot product)
  void (*layer_norm_forward)(const LayerNormForwardArgs&) = nullptr;
  void (*layer_norm_backward)(const LayerNormBackwardArgs&) = nullptr;
  // false if the dtype combination is not one of the fused kernel's (the caller falls back).
  bool (*add_layer_norm_forward)(const AddLayerNormForwardArgs&) = nullptr;
  bool (*add_layer_norm_backward)(const AddLayerNormBackwardArgs&) = nullptr;
  // false if the dtype combination is not one of the kernel's (the caller falls back).
  bool (*rms_norm_forward)(const RmsNormForwardArgs&) = nullptr;
  bool (*rms_norm_backward)(const RmsNormBackwardArgs&) = nullptr;
  void (*attention_forward)(const AttentionForwardArgs&) = nullptr;
  void (*attention_backward)(const AttentionBackwardArgs&) = nullptr;
  // Writes the (B, NH, TQ, TK) keep-mask (1 = kept) the attention kernels apply for this seed.
  void (*dropout_mask)(uint64_t seed, int64_t B, int64_t NH, int64_t TQ, int64_t TK, float p, uint8_t* out,
                       int num_threads) = nullptr;
  void (*dropout)(const DropoutArgs&) = nullptr;
  void (*gelu_forward)(const GeluArgs&) = nullptr;
  void (*gelu_backward)(const GeluArgs&) = nullptr;
  void (*glu_forward)(const GluArgs&) = nullptr;
  void (*glu_backward)(const GluArgs&) = nullptr;
  // false if the dtype combination is not one of the kernel's
  bool (*rope)(const RopeArgs&) = nullptr;
  // Returns the gradient norm before clipping, or -1 when max_grad_norm <= 0.
  double (*adamw_step)(const AdamWArgs&) = nullptr;
  void (*gemm_f32)(const GemmArgs&) = nullptr;       // only where has_gemm_f32
  void (*gemm_bf16)(const GemmBf16Args&) = nullptr;  // only where has_gemm_bf16
  void (*gemv)(const GemvArgs&) = nullptr;
  CrossEntropyRowsResult (*cross_entropy_rows)(const CrossEntropyRowsArgs&) = nullptr;
  int64_t (*multinomial_from_uniform)(const MultinomialArgs&) = nullptr;
};

// The best table this CPU supports, or the one named by NANOFAST_ISA / select_isa().
const KernelTable& kernels();
bool select_isa(const char* name);  // "generic", "avx2", "avx512" or "auto"; false if unsupported
const char* available_isas();       // comma-separated, best last
// Whether float32 matmuls should use nanofast's GEMM where the instruction set has one: NANOFAST_GEMM=0|1
// decides, else every CPU but Intel's (where torch's MKL has AVX-512 code of its own).
bool gemm_preferred();
// Whether matmuls use nanofast's GEMMs: the selected table has one and gemm_preferred().
bool use_gemm_f32();
bool use_gemm_bf16();
// Whether matrix-vector products use nanofast's (every instruction set has one): gemm_preferred().
bool use_gemv();

}  // namespace nanofast
