// bfloat16 matrix multiply with float32 accumulation, C (M, N) = A (M, K) @ B (K, N) (+ bias), for the
// CPUs with AVX512-BF16. Included by kernels_isa.cpp once per instruction set, inside namespace
// nanofast::NF_ISA, after gemm.h (whose blocking and thread split it reuses).
//
// Why: under bfloat16 autocast a training step casts every weight to bfloat16 before its matmul and
// every weight gradient back to float32 after it, and torch's bfloat16 matmul (oneDNN) packs its
// operands again inside. Here the rounding to bfloat16 happens while packing: A and B may be float32
// or bfloat16 (each rounded to nearest even, as a cast would, then multiplied exactly), and C may be
// float32 (weight gradients: no bfloat16 rounding of the sums at all) or bfloat16.
//
// VDPBF16PS multiplies pairs: lane j of the accumulator gains a[k] * b[k][j] + a[k+1] * b[k+1][j]. So
// the panels hold k in pairs: a 32-bit word per (row, k pair) in A's panels, per (column, k pair) in
// B's, a zero padding an odd K. The loop nest is gemm.h's (gemm_blocked), the microkernel its 12 x 32
// tile with the k loop halved.
//
// The instruction treats bfloat16 denormals as zero, and so does the conversion that rounds float32
// inputs (oneDNN's bfloat16 matmul on these CPUs uses the same two instructions).
// Determinism: as in gemm.h, each element is summed in the same order whatever the thread count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "kernel_table.h"
#include "scalar_types.h"
#include "simd.h"
#include "transpose.h"

namespace nanofast {
namespace NF_ISA {

// Only AVX512-BF16 has this GEMM (kernels_isa.cpp puts it in the table): below it, no bfloat16 dot product.
#if NF_BF16_DOT
#define NF_HAS_GEMM_BF16 1

// k pairs per slice: K up to 2048 in one (B's micro-panel, KP x NR words, 128 KB in L2)
constexpr int64_t kGemmKP = 1024;

inline __mmask32 lanes_mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1); }

// The first n (at most 32) elements at p as 32 bfloat16 in one register, zero beyond n.
inline __m512i bf16x32(const float* p, int64_t n) {
  const __m512 lo = _mm512_maskz_loadu_ps(lanes_mask(n), p);
  const __m512 hi = _mm512_maskz_loadu_ps(lanes_mask(std::max<int64_t>(0, n - 16)), p + 16);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}
inline __m512i bf16x32(const bf16* p, int64_t n) { return _mm512_maskz_loadu_epi16(lanes_mask32(n), p); }

// One element's bfloat16 bits, rounded by the same instruction as the vector paths.
inline uint32_t bf16_bits(float v) { return uint16_t(_mm_extract_epi16((__m128i)_mm_cvtneps_pbh(_mm_set_ss(v)), 0)); }
inline uint32_t bf16_bits(bf16 v) { return v.bits; }

// Packs the W x kc block src[w * ws + k * ks] (w < W <= WIDTH) as words dst[kp * WIDTH + w] holding the
// pair (k = 2kp, 2kp + 1), zero beyond W and K: a panel of A (WIDTH = MR, w the row) or of B (WIDTH =
// NR, w the column). Three layouts: k contiguous (x and W^T: a pair is adjacent in memory, so the
// words are transposed 16 x 16 as floats), w contiguous (B row-major, dY^T: two k rows interleaved),
// or any strides (one element at a time).
template <int WIDTH, class T>
void gemm_pack_pairs(const T* src, int64_t ws, int64_t ks, int64_t W, int64_t kc, uint32_t* dst) {
  const int64_t kpairs = (kc + 1) / 2;
  if (ks == 1) {
    for (int64_t k0 = 0; k0 < kc; k0 += 32) {  // 16 pairs at a time
      const int64_t kn = std::min<int64_t>(32, kc - k0), pairs = (kn + 1) / 2;
      for (int w0 = 0; w0 < WIDTH; w0 += 16) {
        vec<float> r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = w0 + i < W ? (vec<float>)_mm512_castsi512_ps(bf16x32(src + (w0 + i) * ws + k0, kn)) : vec<float>{};
        transpose_registers(r);
        const __mmask16 m = lanes_mask(WIDTH - w0);
        for (int t = 0; t < pairs; ++t)
          _mm512_mask_storeu_ps(reinterpret_cast<float*>(dst + (k0 / 2 + t) * WIDTH + w0), m, (__m512)r[t]);
      }
    }
    return;
  }
  if (ws == 1) {
    // 16-bit lane e of the result: element e / 2 of the first row (e even) or of the second (e odd)
    alignas(64) static const uint16_t interleave[2][32] = {
        {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
         8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
        {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
         24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};
    const __m512i lo_idx = _mm512_load_si512(interleave[0]), hi_idx = _mm512_load_si512(interleave[1]);
    for (int64_t kp = 0; kp < kpairs; ++kp) {
      const __m512i r0 = bf16x32(src + 2 * kp * ks, W);
      const __m512i r1 = 2 * kp + 1 < kc ? bf16x32(src + (2 * kp + 1) * ks, W) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(dst + kp * WIDTH, lanes_mask(WIDTH), _mm512_permutex2var_epi16(r0, lo_idx, r1));
      if (WIDTH > 16)
        _mm512_mask_storeu_epi32(dst + kp * WIDTH + 16, lanes_mask(WIDTH - 16),
                                 _mm512_permutex2var_epi16(r0, hi_idx, r1));
    }
    return;
  }
  for (int64_t kp = 0; kp < kpairs; ++kp)
    for (int w = 0; w < WIDTH; ++w) {
      const int64_t k = 2 * kp;
      const uint32_t lo = w < W ? bf16_bits(src[w * ws + k * ks]) : 0;
      const uint32_t hi = w < W && k + 1 < kc ? bf16_bits(src[w * ws + (k + 1) * ks]) : 0;
      dst[kp * WIDTH + w] = lo | hi << 16;
    }
}

// The microkernel: an MR x NR tile of A_panel @ B_panel over kpairs pairs of k, written to C's first m
// rows and n columns: float32 C (c32) = tile (+ bias) on the first slice, += tile on later ones;
// bfloat16 C (c16, a single slice) = tile (+ bias), rounded.
inline void gemm_bf16_micro(int64_t kpairs, const uint32_t* ap, const uint32_t* bp, float* c32, bf16* c16, int64_t ldc,
                            int64_t m, int64_t n, bool first, const float* bias) {
  __m512 acc[kGemmMR][2];
  for (int i = 0; i < kGemmMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + kp * kGemmNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + kp * kGemmNR + 16);
    const uint32_t* a = ap + kp * kGemmMR;
#pragma GCC unroll 12
    for (int i = 0; i < kGemmMR; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(a[i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
  }
  const __mmask16 m0 = lanes_mask(n), m1 = lanes_mask(std::max<int64_t>(0, n - 16));
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  if (first && bias) {
    bias0 = _mm512_maskz_loadu_ps(m0, bias);
    bias1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
  for (int i = 0; i < m; ++i) {
    if (c16) {
      bf16* ci = c16 + i * ldc;
      _mm256_mask_storeu_epi16(ci, m0, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(bias0, acc[i][0])));
      _mm256_mask_storeu_epi16(ci + 16, m1, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(bias1, acc[i][1])));
      continue;
    }
    float* ci = c32 + i * ldc;
    const __m512 base0 = first ? bias0 : _mm512_maskz_loadu_ps(m0, ci);
    const __m512 base1 = first ? bias1 : _mm512_maskz_loadu_ps(m1, ci + 16);
    _mm512_mask_storeu_ps(ci, m0, _mm512_add_ps(base0, acc[i][0]));
    _mm512_mask_storeu_ps(ci + 16, m1, _mm512_add_ps(base1, acc[i][1]));
  }
}

// The bfloat16 GEMM's panels (words of k pairs) and tile for gemm.h's gemm_blocked. The products go
// to c32 (float32, row stride ldc) or, when K is one slice, straight to c16.
template <class TA, class TB>
struct GemmBf16Kernel {
  using Word = uint32_t;
  static constexpr int64_t kMaxDepth = 2 * kGemmKP, kDepthStep = 2;  // slices of whole pairs
  static int64_t depth(int64_t kc) { return (kc + 1) / 2; }
  const GemmBf16Args& g;
  const float* bias;
  float* c32;
  bf16* c16;
  int64_t ldc;

  bool accumulate() const { return g.accumulate; }
  void pack_b(int64_t p, int64_t kc, int64_t j, int64_t width, uint32_t* dst) const {
    gemm_pack_pairs<kGemmNR>(static_cast<const TB*>(g.b) + p * g.b_rs + j * g.b_cs, g.b_cs, g.b_rs, width, kc, dst);
  }
  void pack_a(int64_t p, int64_t kc, int64_t i0, int64_t i1, int64_t m1, uint32_t* dst) const {
    for (int64_t i = i0; i < i1; i += kGemmMR, dst += depth(kc) * kGemmMR)
      gemm_pack_pairs<kGemmMR>(static_cast<const TA*>(g.a) + i * g.a_rs + p * g.a_cs, g.a_rs, g.a_cs,
                               std::min<int64_t>(kGemmMR, m1 - i), kc, dst);
  }
  void tile(int64_t kpairs, const uint32_t* ap, const uint32_t* bp, int64_t i, int64_t j, int64_t m, int64_t n,
            bool first) const {
    gemm_bf16_micro(kpairs, ap, bp, c32 ? c32 + i * ldc + j : nullptr, c16 ? c16 + i * ldc + j : nullptr, ldc, m, n,
                    first, bias ? bias + j : nullptr);
  }
};

template <class TA, class TB>
void gemm_bf16_run(const GemmBf16Args& g, const float* bias) {
  bf16* c16 = g.c_dtype == kBFloat16 ? static_cast<bf16*>(g.c) : nullptr;
  // A bfloat16 C over several K slices sums in a float32 buffer first: one rounding, at the end.
  const bool buffered = c16 && g.K > 2 * kGemmKP;
  std::vector<float> buf(buffered ? g.M * g.N : 0);
  float* c32 = buffered ? buf.data() : c16 ? nullptr : static_cast<float*>(g.c);
  const int64_t ldc = buffered ? g.N : g.ldc;
  const GemmBf16Kernel<TA, TB> kern{g, bias, c32, buffered ? nullptr : c16, ldc};
  gemm_parallel(g.M, g.N, g.K, g.num_threads, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    gemm_blocked(kern, g.K, m0, m1, n0, n1);
    if (buffered)
      for (int64_t i = m0; i < m1; ++i)
        for (int64_t j = n0; j < n1; j += 16) {
          const __mmask16 m = lanes_mask(n1 - j);
          _mm256_mask_storeu_epi16(c16 + i * g.ldc + j, m,
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, c32 + i * ldc + j)));
        }
  });
}

inline void gemm_bf16(const GemmBf16Args& g) {
  if (g.M <= 0 || g.N <= 0) return;
  std::vector<float> bias;  // widened once
  if (g.bias && !g.accumulate) {
    bias.resize(g.N);
    for (int64_t j = 0; j < g.N; ++j)
      bias[j] = g.bias_dtype == kBFloat16 ? to_acc(static_cast<const bf16*>(g.bias)[j])
                                          : static_cast<const float*>(g.bias)[j];
  }
  if (g.K == 0) {  // an empty sum: C = bias or 0 (or unchanged when accumulating)
    for (int64_t i = 0; i < g.M && !g.accumulate; ++i)
      for (int64_t j = 0; j < g.N; ++j) {
        const float v = bias.empty() ? 0.0f : bias[j];
        if (g.c_dtype == kBFloat16) static_cast<bf16*>(g.c)[i * g.ldc + j] = bf16{uint16_t(bf16_bits(v))};
        else static_cast<float*>(g.c)[i * g.ldc + j] = v;
      }
    return;
  }
  const float* b = bias.empty() ? nullptr : bias.data();
  const bool a16 = g.a_dtype == kBFloat16, b16 = g.b_dtype == kBFloat16;
  if (a16 && b16) gemm_bf16_run<bf16, bf16>(g, b);
  else if (a16) gemm_bf16_run<bf16, float>(g, b);
  else if (b16) gemm_bf16_run<float, bf16>(g, b);
  else gemm_bf16_run<float, float>(g, b);
}

#else
#define NF_HAS_GEMM_BF16 0
#endif

}  // namespace NF_ISA
}  // namespace nanofast
