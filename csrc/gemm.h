// float32 matrix multiply, C (M, N) = A (M, K) @ B (K, N) (+ bias), for the CPUs with AVX-512.
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
//
// Why: torch's float32 matmul (MKL) runs its AVX2 code on AMD CPUs, where AVX-512 FMAs do twice the
// work per instruction. The matmuls are most of a float32 training step of nanoGPT's CPU config, so
// they bound every other lever.
//
// The blocking is BLIS's (Goto's): for each KC-deep slice of K, B's slice is packed into NR-wide
// column panels (one panel is reused across all of A's panels before the next), A's rows are packed
// MC at a time into MR-tall row panels (L2), and a register-resident MR x NR microkernel sweeps the
// panels. Slices are deep (up to 512) so that C, at nanoGPT's K = 384, is written once rather than
// read back per slice. Packing also absorbs any strides: A and B may be transposed views (nn.Linear's
// x @ W^T, dW = dY^T @ x).
//
// Determinism: each element of C is summed over k in the same order (KC slices in turn, k ascending
// within a slice) whatever the number of threads; threads only split the rows or columns of C.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernel_table.h"
#include "simd.h"
#include "transpose.h"

namespace nanofast {
namespace NF_ISA {

// Only AVX-512 has a GEMM here (kernels_isa.cpp puts it in the table): below it, torch's is as fast.
#if defined(__AVX512F__)
#define NF_HAS_GEMM_F32 1

constexpr int kGemmMR = 12;        // rows of the C tile held in registers
constexpr int kGemmNR = 32;        // its columns: two zmm vectors (12 x 2 = 24 accumulators of 32)
constexpr int64_t kGemmKC = 512;   // depth of a slice: B's micro-panel (KC x NR) is up to 64 KB, from L1/L2
constexpr int64_t kGemmMC = 192;   // rows of A packed at a time: MC x KC = up to 384 KB, in L2
constexpr int64_t kGemmNC = 2048;  // columns of B packed at a time

// Packs the W x kc block src[w * ws + k * ks] (w < W <= WIDTH, k < kc) as dst[k * WIDTH + w], zero
// beyond W: a panel of A (WIDTH = MR, w the row) or of B (WIDTH = NR, w the column).
template <int WIDTH>
void gemm_pack_panel(const float* src, int64_t ws, int64_t ks, int64_t W, int64_t kc, float* dst) {
  if (ws == 1) {  // the panel's width is contiguous: one masked copy per k
    for (int64_t k = 0; k < kc; ++k)
      for (int w0 = 0; w0 < WIDTH; w0 += 16) {
        const __mmask16 m = lanes_mask(std::max<int64_t>(0, W - w0));
        _mm512_mask_storeu_ps(dst + k * WIDTH + w0, lanes_mask(WIDTH - w0),
                              _mm512_maskz_loadu_ps(m, src + k * ks + w0));
      }
    return;
  }
  if (ks == 1) {  // k is contiguous: transpose 16 x 16 blocks (rows w0.., columns k0..)
    int64_t k0 = 0;
    for (; k0 + 16 <= kc; k0 += 16)
      for (int w0 = 0; w0 < WIDTH; w0 += 16) {
        vec<float> r[16];
        for (int i = 0; i < 16; ++i) r[i] = w0 + i < W ? vload(src + (w0 + i) * ws + k0) : vec<float>{};
        transpose_registers(r);
        const __mmask16 m = lanes_mask(WIDTH - w0);  // WIDTH = 12: a panel row is 12 wide
        for (int t = 0; t < 16; ++t) _mm512_mask_storeu_ps(dst + (k0 + t) * WIDTH + w0, m, (__m512)r[t]);
      }
    for (int64_t k = k0; k < kc; ++k)
      for (int w = 0; w < WIDTH; ++w) dst[k * WIDTH + w] = w < W ? src[w * ws + k] : 0.0f;
    return;
  }
  for (int64_t k = 0; k < kc; ++k)  // any other strides
    for (int w = 0; w < WIDTH; ++w) dst[k * WIDTH + w] = w < W ? src[w * ws + k * ks] : 0.0f;
}

// The microkernel: an MR x NR tile of A_panel @ B_panel over kc, then written to C (its first m rows
// and n columns): C = tile (+ bias) on the first slice, C += tile on the later ones.
inline void gemm_micro(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, int64_t m, int64_t n,
                       bool first, const float* bias) {
  __m512 acc[kGemmMR][2];
  for (int i = 0; i < kGemmMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(bp + k * kGemmNR), b1 = _mm512_loadu_ps(bp + k * kGemmNR + 16);
    const float* a = ap + k * kGemmMR;
#pragma GCC unroll 12
    for (int i = 0; i < kGemmMR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  const __mmask16 m0 = lanes_mask(n), m1 = lanes_mask(std::max<int64_t>(0, n - 16));
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  if (first && bias) {
    bias0 = _mm512_maskz_loadu_ps(m0, bias);
    bias1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
  for (int i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    const __m512 base0 = first ? bias0 : _mm512_maskz_loadu_ps(m0, ci);
    const __m512 base1 = first ? bias1 : _mm512_maskz_loadu_ps(m1, ci + 16);
    _mm512_mask_storeu_ps(ci, m0, _mm512_add_ps(base0, acc[i][0]));
    _mm512_mask_storeu_ps(ci + 16, m1, _mm512_add_ps(base1, acc[i][1]));
  }
}

// The loop nest both GEMMs share, over one thread's share C[m0:m1, n0:n1] with its own packing buffers.
// The kernel supplies the packed element (Word: a float, or a pair of bfloat16), how deep a K slice may
// go (kMaxDepth, in multiples of kDepthStep elements) and how many Words a slice of kc elements packs
// to per panel row (depth), and it packs B's and A's panels and runs a tile.
template <class Kernel>
void gemm_blocked(const Kernel& kern, int64_t K, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  using Word = typename Kernel::Word;
  thread_local std::vector<Word> a_buf, b_buf;
  constexpr int64_t step = Kernel::kDepthStep;
  const int64_t kslices = (K + Kernel::kMaxDepth - 1) / Kernel::kMaxDepth;
  // equal slices (K = 768 is 2 x 384, not 512 + 256), whole steps each
  const int64_t kc_even = ((K + kslices - 1) / kslices + step - 1) / step * step;
  for (int64_t nc0 = n0; nc0 < n1; nc0 += kGemmNC) {
    const int64_t nc = std::min(kGemmNC, n1 - nc0), npanels = (nc + kGemmNR - 1) / kGemmNR;
    for (int64_t p = 0; p < K; p += kc_even) {
      const int64_t kc = std::min(kc_even, K - p), depth = Kernel::depth(kc);
      const bool first = p == 0 && !kern.accumulate();
      // pass 1: B[p:p+kc, nc0:nc0+nc] into NR-wide panels
      b_buf.resize(npanels * depth * kGemmNR);
      for (int64_t jp = 0; jp < npanels; ++jp) {
        const int64_t j = nc0 + jp * kGemmNR;
        kern.pack_b(p, kc, j, std::min<int64_t>(kGemmNR, n1 - j), b_buf.data() + jp * depth * kGemmNR);
      }
      for (int64_t mc0 = m0; mc0 < m1; mc0 += kGemmMC) {
        const int64_t mc = std::min(kGemmMC, m1 - mc0), mpanels = (mc + kGemmMR - 1) / kGemmMR;
        // pass 2: A[mc0:mc0+mc, p:p+kc] into MR-tall panels
        a_buf.resize(mpanels * depth * kGemmMR);
        kern.pack_a(p, kc, mc0, mc0 + mc, m1, a_buf.data());
        // pass 3: every tile of this block, a B panel held in L1 across the A panels
        for (int64_t jp = 0; jp < npanels; ++jp) {
          const int64_t j = nc0 + jp * kGemmNR;
          for (int64_t ip = 0; ip < mpanels; ++ip) {
            const int64_t i = mc0 + ip * kGemmMR;
            kern.tile(depth, a_buf.data() + ip * depth * kGemmMR, b_buf.data() + jp * depth * kGemmNR, i, j,
                      std::min<int64_t>(kGemmMR, m1 - i), std::min<int64_t>(kGemmNR, n1 - j), first);
          }
        }
      }
    }
  }
}

// The float32 GEMM's panels and tile for gemm_blocked.
struct GemmF32Kernel {
  using Word = float;
  static constexpr int64_t kMaxDepth = kGemmKC, kDepthStep = 1;
  static int64_t depth(int64_t kc) { return kc; }
  const GemmArgs& g;

  bool accumulate() const { return g.accumulate; }
  void pack_b(int64_t p, int64_t kc, int64_t j, int64_t width, float* dst) const {
    gemm_pack_panel<kGemmNR>(g.b + p * g.b_rs + j * g.b_cs, g.b_cs, g.b_rs, width, kc, dst);
  }
  // rows [i0, i1) of A (none at or past m1) into consecutive MR-tall panels
  void pack_a(int64_t p, int64_t kc, int64_t i0, int64_t i1, int64_t m1, float* dst) const {
    const int64_t mpanels = (i1 - i0 + kGemmMR - 1) / kGemmMR;
    if (g.a_rs == 1 && g.a_cs != 1) {  // A's columns are contiguous (dY^T): read each one once, whole
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t ip = 0; ip < mpanels; ++ip) {
          const int64_t i = i0 + ip * kGemmMR;
          gemm_pack_panel<kGemmMR>(g.a + i + (p + k) * g.a_cs, 1, 0, std::min<int64_t>(kGemmMR, m1 - i), 1,
                                   dst + ip * kc * kGemmMR + k * kGemmMR);
        }
      return;
    }
    for (int64_t ip = 0; ip < mpanels; ++ip) {
      const int64_t i = i0 + ip * kGemmMR;
      gemm_pack_panel<kGemmMR>(g.a + i * g.a_rs + p * g.a_cs, g.a_rs, g.a_cs, std::min<int64_t>(kGemmMR, m1 - i), kc,
                               dst + ip * kc * kGemmMR);
    }
  }
  void tile(int64_t kc, const float* ap, const float* bp, int64_t i, int64_t j, int64_t m, int64_t n,
            bool first) const {
    gemm_micro(kc, ap, bp, g.c + i * g.ldc + j, g.ldc, m, n, first, g.bias ? g.bias + j : nullptr);
  }
};

// Splits C (M x N, inner dimension K) between the threads along its longer side, whole MR x NR tiles
// each, and runs block(m0, m1, n0, n1) for each share. Shared with gemm_bf16.h.
template <class Block>
void gemm_parallel(int64_t M, int64_t N, int64_t K, int num_threads, Block&& block) {
  const bool split_rows = (M + kGemmMR - 1) / kGemmMR >= (N + kGemmNR - 1) / kGemmNR;
  const int64_t unit = split_rows ? kGemmMR : kGemmNR, extent = split_rows ? M : N;
  const int64_t units = (extent + unit - 1) / unit;
  // below ~2 MFLOP a second thread costs more to wake than it saves
  const double mmacs = double(M) * double(N) * double(K) / double(1 << 20);  // (no int64 overflow)
  const int threads =
      int(std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), units, int64_t(std::min(mmacs, 1e6))})));
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
  for (int t = 0; t < threads; ++t) {
    const int64_t lo = std::min(extent, units * t / threads * unit);
    const int64_t hi = std::min(extent, units * (t + 1) / threads * unit);
    if (lo < hi) {
      if (split_rows) block(lo, hi, int64_t(0), N);
      else block(int64_t(0), M, lo, hi);
    }
  }
}

inline void gemm_f32(const GemmArgs& g) {
  if (g.M <= 0 || g.N <= 0) return;
  if (g.K == 0) {  // an empty sum: C = bias or 0 (or unchanged when accumulating)
    for (int64_t i = 0; i < g.M && !g.accumulate; ++i)
      for (int64_t j = 0; j < g.N; ++j) g.c[i * g.ldc + j] = g.bias ? g.bias[j] : 0.0f;
    return;
  }
  const GemmF32Kernel kern{g};
  gemm_parallel(g.M, g.N, g.K, g.num_threads,
                [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { gemm_blocked(kern, g.K, m0, m1, n0, n1); });
}

#else
#define NF_HAS_GEMM_F32 0
#endif

}  // namespace NF_ISA
}  // namespace nanofast
