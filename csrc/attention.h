// Flash attention on the CPU, forward and backward (FlashAttention-2's algorithm).
// Included by kernels_isa.cpp once per instruction set, inside namespace nanofast::NF_ISA.
//
// The T x T score matrix is never materialised: queries are processed in blocks of BR rows against
// keys in blocks of BC columns, with an online softmax. Operands are first packed into zero-padded,
// row-major buffers in the accumulation type (float for float32/bfloat16, double for float64), so
// every product below is one small register-blocked GEMM (small_gemm) whatever the input strides.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention_mask.h"
#include "kernel_table.h"
#include "philox.h"
#include "philox_vec.h"
#include "scalar_types.h"
#include "simd.h"
#include "transpose.h"

namespace nanofast {
namespace NF_ISA {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Block sizes: 64 x 64 score blocks amortise packing and loop overhead, and the causal diagonal's
// upper triangle costs little since diagonal blocks multiply only their visible part (causal_cols).
// Up to kOneBlockMax positions the whole sequence is one block, rounded up to 16 (a multiple of every
// vector width): at T = 65 two blocks of 64 would cost half as much again as one of 80, in the
// second block's fixed costs and a one-row query block that packs every key again.
constexpr int64_t kOneBlockMax = 96;
inline int64_t attention_block(int64_t T) { return T <= kOneBlockMax ? round_up(std::max<int64_t>(T, 1), 16) : 64; }

// The products below are small GEMMs on operands already packed row-major in the accumulation type,
// a block of up to 96 rows at a time. Not gemm.h's GEMM: that one packs its operands into panels
// first (which would cost more than these products), runs on AVX-512 float32 only, and adds C after
// summing a tile from zero, where these tiles sum onto C's old value (other bits).
//
// How a tile multiplies: FmaDot, one multiply-add per element of A's vectors; PairDot (below), two
// bfloat16 products per lane. Elem is the type of the a, b and c buffers, kWidth C's columns per vector.
template <class A> struct FmaDot {
  using Elem = A;
  using Acc = vec<A>;
  using Operand = vec<A>;
  static constexpr int kWidth = lanes<A>();
  static constexpr int kMaxPanel = NF_VBYTES == 64 ? 4 : 2;  // widest column panel, in vectors
  static Operand load(const A* p) { return vload(p); }
  static Operand broadcast(A s) { return vbroadcast<A>(s); }
  static void madd(Acc& acc, Operand a, Operand b) { acc += a * b; }
};

// C[MR x NV*W] (+)= op(A)[MR x K] * B[K x NV*W], accumulating in registers.
// op(A) is A (a[m*lda + k]) or, with TRANS_A, A transposed (a[k*lda + m]).
template <class Dot, int MR, int NV, bool TRANS_A, class E = typename Dot::Elem>
inline void small_gemm_tile(int64_t K, const E* a, int64_t lda, const E* b, int64_t ldb, E* c, int64_t ldc,
                            bool accumulate) {
  constexpr int W = Dot::kWidth;
  typename Dot::Acc acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = accumulate ? vload(c + m * ldc + v * W) : typename Dot::Acc{};
  for (int64_t k = 0; k < K; ++k) {
    typename Dot::Operand bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Dot::load(b + k * ldb + v * W);
    for (int m = 0; m < MR; ++m) {
      const typename Dot::Operand av = Dot::broadcast(TRANS_A ? a[k * lda + m] : a[m * lda + k]);
      for (int v = 0; v < NV; ++v) Dot::madd(acc[m][v], av, bv[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) vstore(c + m * ldc + v * W, acc[m][v]);
}

// Rows of C computed at once for a tile NV vectors wide: as many accumulators as the register file
// holds beside the NV vectors of B and one broadcast of A (32 registers with AVX-512, else 16).
template <int NV> constexpr int tile_rows() { return NF_VBYTES == 64 ? (NV == 4 ? 6 : 8) : (NV == 2 ? 4 : 8); }

// The last M % MR rows, as one shorter tile rather than row by row.
template <class Dot, int NV, bool TRANS_A, int R = tile_rows<NV>() - 1, class E = typename Dot::Elem>
inline void small_gemm_tail_rows(int64_t rem, int64_t K, const E* a, int64_t lda, const E* b, int64_t ldb, E* c,
                                 int64_t ldc, bool accumulate) {
  if constexpr (R > 0) {
    if (rem == R) return small_gemm_tile<Dot, R, NV, TRANS_A>(K, a, lda, b, ldb, c, ldc, accumulate);
    small_gemm_tail_rows<Dot, NV, TRANS_A, R - 1>(rem, K, a, lda, b, ldb, c, ldc, accumulate);
  }
}

template <class Dot, int NV, bool TRANS_A, class E = typename Dot::Elem>
inline void small_gemm_columns(int64_t M, int64_t K, const E* a, int64_t lda, const E* b, int64_t ldb, E* c,
                               int64_t ldc, bool accumulate) {
  constexpr int MR = tile_rows<NV>();
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    small_gemm_tile<Dot, MR, NV, TRANS_A>(K, TRANS_A ? a + m : a + m * lda, lda, b, ldb, c + m * ldc, ldc, accumulate);
  if (m < M)
    small_gemm_tail_rows<Dot, NV, TRANS_A>(M - m, K, TRANS_A ? a + m : a + m * lda, lda, b, ldb, c + m * ldc, ldc,
                                           accumulate);
}

// C[M x N] (+)= op(A)[M x K] * B[K x N]; N must be a multiple of the vector width. Column panels are
// as wide as the register file allows (Dot::kMaxPanel vectors), then narrower. For PairDot, K counts
// pairs and a, b hold a pair per word.
template <class Dot, bool TRANS_A, class E = typename Dot::Elem>
void small_gemm(int64_t M, int64_t N, int64_t K, const E* a, int64_t lda, const E* b, int64_t ldb, E* c, int64_t ldc,
                bool accumulate) {
  constexpr int W = Dot::kWidth, NV_MAX = Dot::kMaxPanel;
  int64_t n = 0;
  for (; n + NV_MAX * W <= N; n += NV_MAX * W)
    small_gemm_columns<Dot, NV_MAX, TRANS_A>(M, K, a, lda, b + n, ldb, c + n, ldc, accumulate);
  if (NV_MAX == 4 && n + 2 * W <= N) {
    small_gemm_columns<Dot, 2, TRANS_A>(M, K, a, lda, b + n, ldb, c + n, ldc, accumulate);
    n += 2 * W;
  }
  for (; n < N; n += W) small_gemm_columns<Dot, 1, TRANS_A>(M, K, a, lda, b + n, ldb, c + n, ldc, accumulate);
}

// dst[r][c] = src[r][c] for r < rows, c < cols, zero elsewhere in the (rows_p x ld) buffer.
template <class T, class A>
void pack_rows(const T* src, int64_t row_stride, int64_t rows, int64_t cols, A* dst, int64_t rows_p, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dst + r * ld;
    convert_row(src + r * row_stride, d, cols);
    std::fill(d + cols, d + ld, A(0));
  }
  std::fill(dst + rows * ld, dst + rows_p * ld, A(0));
}

// dst[c][r] = src[r][c]: rows become columns, zero padding to (cols_p x ld). float32 and bfloat16
// sources go through 16x16 (AVX-512) or 8x8 (AVX2) register transposes, bfloat16 rows widened TB at a
// time into a per-thread float buffer first; the rest element by element.
template <class T, class A>
void pack_transposed(const T* src, int64_t row_stride, int64_t rows, int64_t cols, A* dst, int64_t cols_p, int64_t ld) {
  // zero only the padding: columns rows..ld of the first cols rows, and rows cols..cols_p
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, A(0));
  std::fill(dst + cols * ld, dst + cols_p * ld, A(0));
  int64_t r0 = 0;
  if constexpr (std::is_same<A, float>::value) {
    constexpr int TB = transpose_block();
    thread_local std::vector<float> wide;
    if (TB > 1)
      for (; r0 + TB <= rows; r0 += TB) {
        const float* blk;
        int64_t blk_stride;
        if constexpr (std::is_same<T, float>::value) {
          blk = src + r0 * row_stride;
          blk_stride = row_stride;
        } else {
          wide.resize(TB * cols);
          for (int64_t r = 0; r < TB; ++r) convert_row(src + (r0 + r) * row_stride, wide.data() + r * cols, cols);
          blk = wide.data();
          blk_stride = cols;
        }
        int64_t c0 = 0;
        for (; c0 + TB <= cols; c0 += TB) transpose_block_f32(blk + c0, blk_stride, dst + c0 * ld + r0, ld);
        for (int64_t r = 0; r < TB; ++r)
          for (int64_t c = c0; c < cols; ++c) dst[c * ld + r0 + r] = blk[r * blk_stride + c];
      }
  }
  for (int64_t r = r0; r < rows; ++r) {
    const T* s = src + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = to_acc(s[c]);
  }
}

#if NF_BF16_DOT
// bfloat16 pairs: A's rows and B's columns in pairs of bfloat16 (element 2k in the low half of a
// 32-bit word, 2k + 1 in the high half), float32 sums. vdpbf16ps multiplies two pairs per lane,
// exactly (bf16 x bf16 fits float32), and adds them into the float32 sum (round to nearest even; bf16
// denormals read as zero). The words travel in float-typed buffers, bit patterns only. Panels of at
// most 2 vectors (8 x 2 accumulators).
struct PairDot {
  using Elem = float;
  using Acc = vec<float>;
  using Operand = __m512bh;
  static constexpr int kWidth = 16;
  static constexpr int kMaxPanel = 2;
  static Operand load(const float* p) { return (__m512bh)_mm512_loadu_ps(p); }
  static Operand broadcast(float s) { return (__m512bh)_mm512_set1_ps(s); }
  static void madd(Acc& acc, Operand a, Operand b) { acc = (Acc)_mm512_dpbf16_ps((__m512)acc, a, b); }
};

// 16 bf16 of row a and 16 of row b as 16 words: pair n = (a[n], b[n]).
inline __m512i interleave_rows(__m256i a, __m256i b) {
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kIdx), _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// The rows of a (rows x cols) matrix paired along the rows: dst[kp][n] = (src[2kp][n], src[2kp+1][n])
// as words, kp < rows_p / 2, n < ld (a multiple of 16), zero-padded. The B operand of a product that
// sums over those rows (P V, P^T dO, dS^T Q, dS K). float rows are rounded to bf16 first.
template <class T>
inline void pack_row_pairs(const T* src, int64_t row_stride, int64_t rows, int64_t cols, float* dst, int64_t rows_p,
                           int64_t ld) {
  auto load16 = [&](int64_t r, int64_t n) -> __m256i {
    const int64_t m = std::min<int64_t>(16, cols - n);
    if (r >= rows || m <= 0) return _mm256_setzero_si256();
    const __mmask16 mask = lanes_mask(m);
    if constexpr (std::is_same<T, float>::value)
      return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + r * row_stride + n));
    else return _mm256_maskz_loadu_epi16(mask, src + r * row_stride + n);
  };
  for (int64_t kp = 0; kp < rows_p / 2; ++kp)
    for (int64_t n = 0; n < ld; n += 16)
      _mm512_storeu_si512(dst + kp * ld + n, interleave_rows(load16(2 * kp, n), load16(2 * kp + 1, n)));
}

// float rows rounded to bf16 in place order: row r's words are its consecutive pairs (the A operand of a
// product that sums along the row: P V, dS K). cols a multiple of 16.
inline void pack_rounded_rows(const float* src, int64_t row_stride, int64_t rows, int64_t cols, float* dst,
                              int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < cols; n += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * ld + n / 2),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * row_stride + n)));
}

// rows of bf16 (row_stride apart) as rows of ld words: pairs, zero-padded to rows_p rows.
inline void pack_pairs(const bf16* src, int64_t row_stride, int64_t rows, int64_t cols, float* dst, int64_t rows_p,
                       int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    char* d = reinterpret_cast<char*>(dst + r * ld);
    std::memcpy(d, src + r * row_stride, cols * sizeof(bf16));
    std::memset(d + cols * sizeof(bf16), 0, (2 * ld - cols) * sizeof(bf16));
  }
  std::memset(static_cast<void*>(dst + rows * ld), 0, (rows_p - rows) * ld * sizeof(float));
}
#endif

// The score products of one head, S = X Y^T (Q K^T; in the backward also dO V^T), on operands packed
// once: X's rows in the accumulation type (x, also the backward's Q and dO), and Y transposed. For
// bfloat16 inputs on CPUs with AVX512-BF16, X and Y^T are also kept as bf16 pairs and the products run
// on vdpbf16ps, twice the multiplications per instruction: the products are exact either way, only the
// order of the float32 sums differs.
template <class T> struct ScoreOperands {
  using A = acc_t<T>;
  static constexpr bool kPairs = NF_BF16_DOT && std::is_same<T, bf16>::value;
  int64_t depth = 0, ld = 0;  // the products' depth (HSp, or pairs); Y^T's row length (keys, padded)
  std::vector<A> x, yt;
  std::vector<float> xp, ytp, stage;

  // X: rows (of cols elements, row_stride apart) padded to rows_p; Y: keys rows, transposed to ld columns.
  // With `need_x` false, X's rows in the accumulation type (x) are packed only when the products use them.
  void pack(const T* xs, int64_t x_stride, int64_t rows, int64_t rows_p, const T* ys, int64_t y_stride, int64_t keys,
            int64_t ld_p, int64_t cols, bool need_x = false) {
    constexpr int W = lanes<A>();
    const int64_t cols_p = round_up(cols, W);
    ld = ld_p;
    if (need_x || !kPairs) {
      x.resize(rows_p * cols_p);
      pack_rows(xs, x_stride, rows, cols, x.data(), rows_p, cols_p);
    }
#if NF_BF16_DOT
    if constexpr (kPairs) {
      depth = (cols + 1) / 2;
      xp.resize(rows_p * depth);
      pack_pairs(xs, x_stride, rows, cols, xp.data(), rows_p, depth);
      // Y's rows as pairs, then transposed word by word (the float transposes move bits only)
      stage.resize(keys * depth);
      pack_pairs(ys, y_stride, keys, cols, stage.data(), keys, depth);
      ytp.resize(depth * ld);
      pack_transposed(stage.data(), depth, keys, depth, ytp.data(), depth, ld);
      return;
    }
#endif
    depth = cols_p;
    yt.resize(depth * ld);
    pack_transposed(ys, y_stride, keys, cols, yt.data(), depth, ld);
  }

  // out[M x N] (ldo apart) = rows x_row0.. of X times columns y_col0.. of Y^T; N a multiple of W.
  void product(int64_t M, int64_t N, int64_t x_row0, int64_t y_col0, A* out, int64_t ldo) const {
#if NF_BF16_DOT
    if constexpr (kPairs)
      return small_gemm<PairDot, false>(M, N, depth, xp.data() + x_row0 * depth, depth, ytp.data() + y_col0, ld, out,
                                        ldo, false);
#endif
    small_gemm<FmaDot<A>, false>(M, N, depth, x.data() + x_row0 * depth, depth, yt.data() + y_col0, ld, out, ldo,
                                 false);
  }
};

template <class T> inline const T* head_ptr(const Strided4& t, int64_t b, int64_t h) {
  return static_cast<const T*>(t.ptr) + b * t.sb + h * t.sh;
}
template <class T> inline T* head_ptr_mut(const Strided4& t, int64_t b, int64_t h) {
  return const_cast<T*>(head_ptr<T>(t, b, h));
}

// Causal diagonal blocks: the columns of key block j0 (BK wide) that queries before q_end can see,
// rounded up to whole vectors. On a block the diagonal crosses, each slice of W query rows multiplies
// only these columns; the rest would be masked to exactly zero, so skipping them changes no result.
inline int64_t causal_cols(int64_t q_end, int64_t j0, int64_t BK, int64_t TK, int64_t W) {
  return std::min(BK, round_up(std::max<int64_t>(0, std::min(TK, q_end) - j0), W));
}

// A key block's columns that hold keys (kcols of BK: fewer only in the last block), rounded up to whole
// vectors. Past them a block has only the padding after the last key, whose scores and probabilities
// are exactly zero, so the products skip them: at T = 65 the last block would otherwise cost as much as
// the first for one key.
inline int64_t key_cols(int64_t kcols, int64_t BK, int64_t W) { return std::min(BK, round_up(kcols, W)); }

// Scales one score row, masks invisible keys to -inf and returns the row maximum.
template <class A>
inline A scale_mask_rowmax(A* s, int64_t ncols, int64_t valid, A scale) {
  constexpr int W = lanes<A>();
  vec<A> mv = vbroadcast<A>(-std::numeric_limits<A>::infinity());
  int64_t c = 0;
  for (; c + W <= valid; c += W) {
    vec<A> x = vload(s + c) * scale;
    vstore(s + c, x);
    mv = vmaxv<A>(mv, x);
  }
  if (c < valid && c + W <= ncols) {  // the vector the last visible key falls in, its later lanes masked
    using vi = typename VecOf<A>::itype;
    using I = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;  // vi's lanes
    vi lane;
    for (int i = 0; i < W; ++i) lane[i] = I(i);
    const vec<A> x = vload(s + c) * scale;
    const vec<A> masked = lane < vi{} + I(valid - c) ? x : vbroadcast<A>(-std::numeric_limits<A>::infinity());
    vstore(s + c, masked);
    mv = vmaxv<A>(mv, masked);
    c += W;
  }
  A m = vmax(mv);
  for (; c < valid; ++c) {
    s[c] *= scale;
    m = std::max(m, s[c]);
  }
  for (; c < ncols; ++c) s[c] = -std::numeric_limits<A>::infinity();
  return m;
}

// p = exp(s - m) in place; returns the row sum.
template <class A>
inline A exp_row(A* s, int64_t ncols, A m) {
  constexpr int W = lanes<A>();
  vec<A> sum{};
  for (int64_t c = 0; c < ncols; c += W) {  // ncols is a multiple of W
    vec<A> p = vexp(vload(s + c) - m);
    vstore(s + c, p);
    sum += p;
  }
  return vsum(sum);
}

// p *= keep / (1 - p_drop), keep drawn from the counter-based generator at this row's offsets.
template <class A>
inline void dropout_row(A* p, int64_t ncols, uint64_t seed, uint64_t row_offset, int64_t j0, float p_drop,
                        A keep_scale) {
  int64_t c = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<A, float>::value)  // 16 at a time, a masked multiply instead of a branch
    for (; c + 16 <= ncols; c += 16) {
      const __mmask16 keep = __mmask16(dropout_keep16(seed, row_offset + uint64_t(j0 + c), p_drop));
      vstore(p + c, (vec<float>)_mm512_maskz_mov_ps(keep, (__m512)(vload(p + c) * keep_scale)));
    }
#endif
  for (; c < ncols; ++c) p[c] = dropout_keep(seed, row_offset + uint64_t(j0 + c), p_drop) ? p[c] * keep_scale : A(0);
}

template <class T>
void attention_forward_impl(const AttentionForwardArgs& a) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  const int64_t B = a.B, NH = a.NH, TQ = a.TQ, TK = a.TK, HS = a.HS, HSV = a.HSV, group = a.NH / a.NKV;
  const int64_t BQ = attention_block(std::max(TQ, TK)), BK = BQ;  // query rows, keys per block
  const int64_t HSp = round_up(HS, W), HSVp = round_up(HSV, W);
  const int64_t TKp = round_up(TK, BK);
  const int64_t q_blocks = (TQ + BQ - 1) / BQ;
  const A scale = A(a.scale);
  const A keep_scale = a.dropout_p > 0 ? A(1) / (A(1) - A(a.dropout_p)) : A(1);
  A* lse_out = static_cast<A*>(a.lse);
  constexpr bool kPairs = ScoreOperands<T>::kPairs;
  const bool has_mask = a.mask.ptr != nullptr;

#pragma omp parallel num_threads(a.num_threads)
  {
    ScoreOperands<T> QK;  // the query block's rows, the visible keys transposed
    std::vector<A> V(TKp * HSVp), S(BQ * BK), O(BQ * HSVp), m(BQ), l(BQ), madd(has_mask ? BK : 0);
    std::vector<float> V_pairs, P_pairs;  // bf16 on AVX512-BF16: V paired along keys, P rounded
    // Each task is one query block of one head and depends on nothing else, so the result does not
    // depend on which thread runs it; dynamic scheduling evens out the causal imbalance.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * NH * q_blocks; ++task) {
      const int64_t bh = task / q_blocks, b = bh / NH, h = bh % NH, hk = h / group;
      const int64_t i0 = (task % q_blocks) * BQ, rows = std::min(BQ, TQ - i0);
      // The keys any row of the block sees by position: [kv_lo, kv_len), kv_lo a whole block.
      const int64_t kv_len = visible_keys(a.causal, i0 + rows, TK);
      const int64_t kv_lo = std::min(first_visible_key(a.window, i0), kv_len) / BK * BK;
      const int64_t kv_len_p = round_up(kv_len, BK);
      // Pack: Q block (rows x HSp), K transposed (HSp x keys) and V (keys x HSVp) from key kv_lo on.
      QK.pack(head_ptr<T>(a.q, b, h) + i0 * a.q.st, a.q.st, rows, BQ, head_ptr<T>(a.k, b, hk) + kv_lo * a.k.st, a.k.st,
              kv_len - kv_lo, kv_len_p - kv_lo, HS);
      if constexpr (kPairs) {
#if NF_BF16_DOT
        V_pairs.resize((kv_len_p - kv_lo) / 2 * HSVp);
        pack_row_pairs(head_ptr<T>(a.v, b, hk) + kv_lo * a.v.st, a.v.st, kv_len - kv_lo, HSV, V_pairs.data(),
                       kv_len_p - kv_lo, HSVp);
        P_pairs.resize(BQ * BK / 2);
#endif
      } else {
        pack_rows(head_ptr<T>(a.v, b, hk) + kv_lo * a.v.st, a.v.st, kv_len - kv_lo, HSV, V.data(), kv_len_p - kv_lo,
                  HSVp);
      }
      std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
      std::fill(l.begin(), l.end(), A(0));
      std::fill(O.begin(), O.end(), A(0));

      for (int64_t j0 = kv_lo; j0 < kv_len; j0 += BK) {
        const int64_t kcols = std::min(BK, TK - j0), kcols_p = key_cols(kcols, BK, W);
        if (mask_block_empty(a.mask, b, h, i0, rows, j0, kcols)) continue;  // P is 0 on the whole block
        // Does the causal diagonal cross this block (some row sees only part of it)?
        const bool diagonal = a.causal && j0 + BK > i0 + 1;
        // S = Q K^T for this key block (on the diagonal, W rows at a time, visible columns only).
        if (!diagonal) {
          QK.product(rows, kcols_p, 0, j0 - kv_lo, S.data(), BK);
        } else {
          for (int64_t r0 = 0; r0 < rows; r0 += W) {
            const int64_t nr = std::min<int64_t>(W, rows - r0), nc = causal_cols(i0 + r0 + nr, j0, BK, TK, W);
            QK.product(nr, nc, r0, j0 - kv_lo, S.data() + r0 * BK, BK);
          }
        }
        // A broadcast query dim gives every row the same mask row: read it once per block.
        if (has_mask && a.mask.sq == 0) mask_row(a.mask, b, h, 0, j0, kcols, madd.data(), BK);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          A* s = S.data() + r * BK;
          const int64_t valid = std::max<int64_t>(0, std::min(BK, visible_keys(a.causal, i + 1, TK) - j0));
          const int64_t lo = std::clamp<int64_t>(first_visible_key(a.window, i) - j0, 0, BK);
          // Online softmax: new running max, rescale what was accumulated, exponentiate this block.
          // Only the vectors holding visible keys are exponentiated (on the diagonal, about half the
          // row): P is exactly 0 beyond them.
          const int64_t ncols = std::min(BK, round_up(valid, W));
          if (has_mask && a.mask.sq != 0) mask_row(a.mask, b, h, i, j0, kcols, madd.data(), BK);
          // A NaN score makes the row's maximum NaN (or is skipped by it): either way the NaN reaches l
          // and lse, as torch's softmax propagates it. std::max(m, NaN) would keep m, and a row whose
          // m stayed -inf would be skipped as empty.
          const A* mrow = has_mask ? madd.data() : nullptr;
          const A block_max = has_mask || lo > 0 ? scale_mask_rowmax_general(s, ncols, lo, valid, scale, mrow)
                                                 : scale_mask_rowmax(s, ncols, valid, scale);
          const A m_new = std::isnan(block_max) ? block_max : std::max(m[r], block_max);
          std::fill(s + ncols, s + BK, A(0));
          if (m_new == -std::numeric_limits<A>::infinity()) {  // nothing visible yet in this row
            // ... unless the maximum skipped NaN scores: then the row is NaN (l = NaN: not an empty row)
            if (std::any_of(s, s + ncols, [](A x) { return std::isnan(x); })) m[r] = l[r] = A(NAN);
            std::fill(s, s + ncols, A(0));
            continue;
          }
          const A alpha = std::exp(m[r] - m_new);
          l[r] = l[r] * alpha + exp_row(s, ncols, m_new);
          m[r] = m_new;
          A* o = O.data() + r * HSVp;
          for (int64_t c = 0; c < HSVp; c += W) vstore(o + c, vload(o + c) * alpha);
          if (a.dropout_p > 0)
            dropout_row(s, kcols, a.seed, uint64_t((bh * TQ + i) * TK), j0, float(a.dropout_p), keep_scale);
        }
        // O += P V (on the diagonal, each row slice over the keys it can see: P is 0 beyond them).
        const int64_t v_row = j0 - kv_lo;  // the block's first row in the packed V
        if constexpr (kPairs) {
#if NF_BF16_DOT
          // bf16 pairs: P rounded to bfloat16 first, as the GPU kernel rounds it for its P V dot (the
          // row sums l above took P unrounded)
          pack_rounded_rows(S.data(), BK, rows, BK, P_pairs.data(), BK / 2);
          for (int64_t r0 = 0; r0 < rows; r0 += diagonal ? W : rows) {
            const int64_t nr = diagonal ? std::min<int64_t>(W, rows - r0) : rows;
            const int64_t nc = diagonal ? causal_cols(i0 + r0 + nr, j0, BK, TK, W) : kcols_p;
            small_gemm<PairDot, false>(nr, HSVp, std::min<int64_t>(nc, kv_len_p - j0) / 2,
                                       P_pairs.data() + r0 * (BK / 2), BK / 2, V_pairs.data() + (v_row / 2) * HSVp,
                                       HSVp, O.data() + r0 * HSVp, HSVp, true);
          }
#endif
        } else if (!diagonal) {
          small_gemm<FmaDot<A>, false>(rows, HSVp, std::min<int64_t>(kcols_p, kv_len_p - j0), S.data(), BK,
                                       V.data() + v_row * HSVp, HSVp, O.data(), HSVp, true);
        } else {
          for (int64_t r0 = 0; r0 < rows; r0 += W) {
            const int64_t nr = std::min<int64_t>(W, rows - r0), nc = causal_cols(i0 + r0 + nr, j0, BK, TK, W);
            small_gemm<FmaDot<A>, false>(nr, HSVp, std::min<int64_t>(nc, kv_len_p - j0), S.data() + r0 * BK, BK,
                                         V.data() + v_row * HSVp, HSVp, O.data() + r0 * HSVp, HSVp, true);
          }
        }
      }
      // Normalise and write out; keep the logsumexp for the backward pass. A row that saw no key
      // (l = 0: every score masked) gets zeros, as torch's softmax over such a row gives, and
      // lse = +inf, so that the backward's exp(s - lse) is 0 on it.
      T* out = head_ptr_mut<T>(a.out, b, h) + i0 * a.out.st;
      for (int64_t r = 0; r < rows; ++r) {
        const bool seen = l[r] != A(0);
        store_row_scaled(out + r * a.out.st, O.data() + r * HSVp, HSV, seen ? A(1) / l[r] : A(0));
        lse_out[bh * TQ + i0 + r] = seen ? m[r] + std::log(l[r]) : std::numeric_limits<A>::infinity();
      }
    }
  }
}

// out[c] = sum over r < n of src[r * stride + c], c < cols (a multiple of the vector width), in r's order.
template <class A> inline void sum_rows(const A* src, int64_t stride, int64_t n, int64_t cols, A* out) {
  constexpr int W = lanes<A>();
  for (int64_t c = 0; c < cols; c += W) {
    vec<A> acc = vload(src + c);
    for (int64_t r = 1; r < n; ++r) acc += vload(src + r * stride + c);
    vstore(out + c, acc);
  }
}

template <class T>
void attention_backward_impl(const AttentionBackwardArgs& a) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  const int64_t B = a.B, NH = a.NH, TQ = a.TQ, TK = a.TK, HS = a.HS, HSV = a.HSV, group = a.NH / a.NKV;
  const int64_t BQ = attention_block(std::max(TQ, TK)), BK = BQ;  // query rows, keys per block
  const int64_t HSp = round_up(HS, W), HSVp = round_up(HSV, W);
  const int64_t TQp = round_up(TQ, BQ), TKp = round_up(TK, BK);
  const A scale = A(a.scale);
  const bool dropout = a.dropout_p > 0;
  const A keep_scale = dropout ? A(1) / (A(1) - A(a.dropout_p)) : A(1);
  const A* lse_all = static_cast<const A*>(a.lse);
  constexpr bool kPairs = ScoreOperands<T>::kPairs;
  const bool has_mask = a.mask.ptr != nullptr;
  // Grouped-query attention: each query head's dK and dV (dK unscaled), rows padded to HSp and HSVp,
  // summed over the group in head order after every head is done (no atomics, no thread-dependent order).
  std::unique_ptr<A[]> dk_heads, dv_heads;
  if (group > 1) {
    dk_heads.reset(new A[B * NH * TK * HSp]);
    dv_heads.reset(new A[B * NH * TK * HSVp]);
  }

#pragma omp parallel num_threads(a.num_threads)
  {
    ScoreOperands<T> QK, dOV;  // for P = exp(Q K^T - lse) and dP = dO V^T; QK.x is Q (without pairs), dOV.x dO
    std::vector<A> K(TKp * HSp), delta(TQp), dQ(TQp * HSp), P(BQ * BK), dP(BQ * BK), dK(BK * HSp), dV(BK * HSVp),
        row_buf(TQp * HSVp), madd(has_mask ? BK : 0);
    // bf16 on AVX512-BF16: Q, dO and K paired along their rows, and per block P^T, dS^T and dS rounded
    // to bfloat16 (as the GPU kernel rounds them for its dV, dK and dQ dots)
    std::vector<float> Q_pairs, dO_pairs, K_pairs, Pt_pairs, dSt_pairs, dS_pairs;
    // One task per head: dQ accumulates over key blocks in a buffer this task owns, so there are no
    // atomics and no order that depends on the threads.
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * NH; ++bh) {
      const int64_t b = bh / NH, h = bh % NH, hk = h / group;
      const A* lse = lse_all + bh * TQ;
      QK.pack(head_ptr<T>(a.q, b, h), a.q.st, TQ, TQp, head_ptr<T>(a.k, b, hk), a.k.st, TK, TKp, HS);
      dOV.pack(head_ptr<T>(a.dout, b, h), a.dout.st, TQ, TQp, head_ptr<T>(a.v, b, hk), a.v.st, TK, TKp, HSV,
               /*need_x=*/true);  // dO's rows: delta below
      if constexpr (kPairs) {
#if NF_BF16_DOT
        Q_pairs.resize(TQp / 2 * HSp);
        dO_pairs.resize(TQp / 2 * HSVp);
        K_pairs.resize(TKp / 2 * HSp);
        Pt_pairs.resize(BQ / 2 * BK);
        dSt_pairs.resize(BQ / 2 * BK);
        dS_pairs.resize(BQ * BK / 2);
        pack_row_pairs(head_ptr<T>(a.q, b, h), a.q.st, TQ, HS, Q_pairs.data(), TQp, HSp);
        pack_row_pairs(head_ptr<T>(a.dout, b, h), a.dout.st, TQ, HSV, dO_pairs.data(), TQp, HSVp);
        pack_row_pairs(head_ptr<T>(a.k, b, hk), a.k.st, TK, HS, K_pairs.data(), TKp, HSp);
#endif
      } else {
        pack_rows(head_ptr<T>(a.k, b, hk), a.k.st, TK, HS, K.data(), TKp, HSp);
      }
      const A* Q = QK.x.data();
      const A* dO = dOV.x.data();
      // delta_i = rowsum(dO_i * O_i): the softmax-backward correction (O already includes dropout).
      const T* o = head_ptr<T>(a.out, b, h);
      pack_rows(o, a.out.st, TQ, HSV, row_buf.data(), TQ, HSVp);
      for (int64_t i = 0; i < TQ; ++i) {
        vec<A> s{};
        for (int64_t c = 0; c < HSVp; c += W) s += vload(dO + i * HSVp + c) * vload(row_buf.data() + i * HSVp + c);
        delta[i] = vsum(s);
      }
      std::fill(dQ.begin(), dQ.end(), A(0));

      for (int64_t j0 = 0; j0 < TK; j0 += BK) {
        const int64_t kcols = std::min(BK, TK - j0), kcols_p = key_cols(kcols, BK, W);
        std::fill(dK.begin(), dK.end(), A(0));
        std::fill(dV.begin(), dV.end(), A(0));
        // Causal: query blocks that end before this key block starts see none of it; a window: nor do
        // queries from j0 + kcols - 1 + window on.
        const int64_t i_start = a.causal ? std::min(TQ, j0) / BQ * BQ : 0;
        const int64_t i_end = a.window > 0 ? std::min(TQ, j0 + kcols - 1 + a.window) : TQ;
        if (has_mask && a.mask.sq == 0) mask_row(a.mask, b, h, 0, j0, kcols, madd.data(), BK);
        for (int64_t i0 = i_start; i0 < i_end; i0 += BQ) {
          const int64_t rows = std::min(BQ, TQ - i0);
          if (mask_block_empty(a.mask, b, h, i0, rows, j0, kcols)) continue;  // P and dS are 0 on it
          // Does the causal diagonal cross this block? Then passes 1, 2 and 4 run W query rows (or W
          // keys) at a time over the part that is visible: the rest of P and dS is exactly zero.
          const bool diagonal = a.causal && j0 + BK > i0 + 1;
          // pass 1: recompute P = exp(scale * Q K^T - lse), zero where masked.
          // pass 2: dP = dO V^T.
          if (!diagonal) {
            QK.product(rows, kcols_p, i0, j0, P.data(), BK);
            dOV.product(rows, kcols_p, i0, j0, dP.data(), BK);
          } else {
            for (int64_t r0 = 0; r0 < rows; r0 += W) {
              const int64_t nr = std::min<int64_t>(W, rows - r0), nc = causal_cols(i0 + r0 + nr, j0, BK, TK, W);
              QK.product(nr, nc, i0 + r0, j0, P.data() + r0 * BK, BK);
              dOV.product(nr, nc, i0 + r0, j0, dP.data() + r0 * BK, BK);
              for (int64_t r = r0; r < r0 + nr; ++r) {  // the columns not computed: finite, then masked
                std::fill(P.data() + r * BK + nc, P.data() + (r + 1) * BK, A(0));
                std::fill(dP.data() + r * BK + nc, dP.data() + (r + 1) * BK, A(0));
              }
            }
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r;
            A* p = P.data() + r * BK;
            A* dp = dP.data() + r * BK;
            const int64_t valid = std::max<int64_t>(0, std::min(kcols, visible_keys(a.causal, i + 1, TK) - j0));
            const int64_t lo = std::clamp<int64_t>(first_visible_key(a.window, i) - j0, 0, BK);
            const vec<A> lse_i = vbroadcast<A>(lse[i]), delta_i = vbroadcast<A>(delta[i]);
            // exp over the vectors holding visible keys only (on the diagonal, about half the row)
            const int64_t ncols = std::min(BK, round_up(valid, W));
            // A mask or a window's lower edge: the general row, which also zeroes dS on the keys not seen.
            const bool general = has_mask || lo > 0;
            if (has_mask && a.mask.sq != 0) mask_row(a.mask, b, h, i, j0, kcols, madd.data(), BK);
            const A* mrow = has_mask ? madd.data() : nullptr;
            if (general) masked_probs_row(p, ncols, lo, valid, scale, mrow, lse[i]);
            else
              for (int64_t c = 0; c < ncols; c += W) vstore(p + c, vexp(vload(p + c) * scale - lse_i));
            std::fill(p + valid, p + BK, A(0));
            // pass 3: dS = P * (dP_dropped - delta); P itself becomes the dropped P for dV.
            if (!dropout) {
              for (int64_t c = 0; c < ncols; c += W) vstore(dp + c, vload(p + c) * (vload(dp + c) - delta_i));
              // masked keys get exactly 0, not 0 * (dP - delta): a NaN delta must not reach them
              if (general) zero_unseen(dp, ncols, lo, valid, mrow);
              std::fill(dp + valid, dp + BK, A(0));
              continue;
            }
            const uint64_t row_offset = uint64_t((bh * TQ + i) * TK);
            int64_t c = 0;
#if defined(__AVX512F__)
            if constexpr (std::is_same<A, float>::value)  // the same, 16 at a time without branches
              for (; c + 16 <= kcols; c += 16) {
                const __mmask16 keep =
                    __mmask16(dropout_keep16(a.seed, row_offset + uint64_t(j0 + c), float(a.dropout_p)));
                const vec<float> pc = vload(p + c);
                // kept: dp * keep_scale - delta as one FMA (as the compiler contracts the scalar loop below);
                // dropped: -delta
                const __m512 kept = _mm512_fmsub_ps((__m512)vload(dp + c), _mm512_set1_ps(keep_scale), (__m512)delta_i);
                const vec<float> ds = (vec<float>)_mm512_mask_mov_ps((__m512)(-delta_i), keep, kept);
                vstore(dp + c, pc * ds);  // dS
                vstore(p + c, (vec<float>)_mm512_maskz_mov_ps(keep, (__m512)(pc * keep_scale)));
              }
#endif
            for (; c < kcols; ++c) {
              const bool keep = dropout_keep(a.seed, row_offset + uint64_t(j0 + c), float(a.dropout_p));
              dp[c] = p[c] * ((keep ? dp[c] * keep_scale : A(0)) - delta[i]);  // dS
              p[c] = keep ? p[c] * keep_scale : A(0);
            }
            if (general) zero_unseen(dp, ncols, lo, valid, mrow);
            std::fill(dp + valid, dp + BK, A(0));  // masked keys: exactly 0, as above
          }
          // pass 4: dV += P_dropped^T dO, dK += dS^T Q, dQ += dS K (scale applied at the end).
          if constexpr (kPairs) {
#if NF_BF16_DOT
            // bf16 pairs: P and dS rounded; P^T and dS^T pair up query rows, dS pairs up keys. On the
            // diagonal, the same skipping as below (r_lo and nc are multiples of 16, so pairs stay whole).
            const int64_t rows_p = round_up(rows, 2);
            pack_row_pairs(P.data(), BK, rows, BK, Pt_pairs.data(), rows_p, BK);
            pack_row_pairs(dP.data(), BK, rows, BK, dSt_pairs.data(), rows_p, BK);
            pack_rounded_rows(dP.data(), BK, rows, BK, dS_pairs.data(), BK / 2);
            for (int64_t c0 = 0; c0 < kcols_p; c0 += diagonal ? W : kcols_p) {
              const int64_t mc = diagonal ? W : kcols_p;
              const int64_t r_lo = diagonal ? std::min(rows, std::max<int64_t>(0, j0 + c0 - i0)) : 0;
              if (r_lo == rows) continue;
              const int64_t kp = (rows_p - r_lo) / 2, p0 = r_lo / 2;
              small_gemm<PairDot, true>(mc, HSVp, kp, Pt_pairs.data() + p0 * BK + c0, BK,
                                        dO_pairs.data() + (i0 / 2 + p0) * HSVp, HSVp, dV.data() + c0 * HSVp, HSVp,
                                        true);
              small_gemm<PairDot, true>(mc, HSp, kp, dSt_pairs.data() + p0 * BK + c0, BK,
                                        Q_pairs.data() + (i0 / 2 + p0) * HSp, HSp, dK.data() + c0 * HSp, HSp, true);
            }
            for (int64_t r0 = 0; r0 < rows; r0 += diagonal ? W : rows) {
              const int64_t nr = diagonal ? std::min<int64_t>(W, rows - r0) : rows;
              const int64_t nc = diagonal ? causal_cols(i0 + r0 + nr, j0, BK, TK, W) : kcols_p;
              small_gemm<PairDot, false>(nr, HSp, nc / 2, dS_pairs.data() + r0 * (BK / 2), BK / 2,
                                         K_pairs.data() + (j0 / 2) * HSp, HSp, dQ.data() + (i0 + r0) * HSp, HSp, true);
            }
#endif
          } else if (!diagonal) {
            small_gemm<FmaDot<A>, true>(kcols_p, HSVp, rows, P.data(), BK, dO + i0 * HSVp, HSVp, dV.data(), HSVp, true);
            small_gemm<FmaDot<A>, true>(kcols_p, HSp, rows, dP.data(), BK, Q + i0 * HSp, HSp, dK.data(), HSp, true);
            small_gemm<FmaDot<A>, false>(rows, HSp, kcols_p, dP.data(), BK, K.data() + j0 * HSp, HSp,
                                         dQ.data() + i0 * HSp, HSp, true);
          } else {
            // dV, dK: W keys at a time, over the query rows that see them (rows before r_lo see none).
            for (int64_t c0 = 0; c0 < BK; c0 += W) {
              const int64_t r_lo = std::min(rows, std::max<int64_t>(0, j0 + c0 - i0));
              if (r_lo == rows) continue;
              small_gemm<FmaDot<A>, true>(W, HSVp, rows - r_lo, P.data() + r_lo * BK + c0, BK, dO + (i0 + r_lo) * HSVp,
                                          HSVp, dV.data() + c0 * HSVp, HSVp, true);
              small_gemm<FmaDot<A>, true>(W, HSp, rows - r_lo, dP.data() + r_lo * BK + c0, BK, Q + (i0 + r_lo) * HSp,
                                          HSp, dK.data() + c0 * HSp, HSp, true);
            }
            // dQ: W rows at a time, over the keys they see.
            for (int64_t r0 = 0; r0 < rows; r0 += W) {
              const int64_t nr = std::min<int64_t>(W, rows - r0), nc = causal_cols(i0 + r0 + nr, j0, BK, TK, W);
              small_gemm<FmaDot<A>, false>(nr, HSp, nc, dP.data() + r0 * BK, BK, K.data() + j0 * HSp, HSp,
                                           dQ.data() + (i0 + r0) * HSp, HSp, true);
            }
          }
        }
        if (group > 1) {
          std::copy(dK.begin(), dK.begin() + kcols * HSp, dk_heads.get() + (bh * TK + j0) * HSp);
          std::copy(dV.begin(), dV.begin() + kcols * HSVp, dv_heads.get() + (bh * TK + j0) * HSVp);
          continue;
        }
        T* dk = head_ptr_mut<T>(a.dk, b, h) + j0 * a.dk.st;
        T* dv = head_ptr_mut<T>(a.dv, b, h) + j0 * a.dv.st;
        for (int64_t r = 0; r < kcols; ++r) {
          store_row_scaled(dk + r * a.dk.st, dK.data() + r * HSp, HS, scale);
          store_row_scaled(dv + r * a.dv.st, dV.data() + r * HSVp, HSV, A(1));
        }
      }
      T* dq = head_ptr_mut<T>(a.dq, b, h);
      for (int64_t i = 0; i < TQ; ++i) store_row_scaled(dq + i * a.dq.st, dQ.data() + i * HSp, HS, scale);
    }
    if (group > 1) {
      // (after the loop's barrier) each key/value head's row: its group's rows summed in head order
#pragma omp for schedule(static)
      for (int64_t row = 0; row < B * a.NKV * TK; ++row) {
        const int64_t bg = row / TK, t = row % TK, b = bg / a.NKV, g = bg % a.NKV;
        const int64_t first = (b * NH + g * group) * TK + t;  // the group's first head's row
        sum_rows(dk_heads.get() + first * HSp, TK * HSp, group, HSp, dK.data());
        sum_rows(dv_heads.get() + first * HSVp, TK * HSVp, group, HSVp, dV.data());
        store_row_scaled(head_ptr_mut<T>(a.dk, b, g) + t * a.dk.st, dK.data(), HS, scale);
        store_row_scaled(head_ptr_mut<T>(a.dv, b, g) + t * a.dv.st, dV.data(), HSV, A(1));
      }
    }
  }
}

// ---- One query row (sampling's decode step): ----
// the query blocks above would multiply a block of 16 or more rows holding one, after packing every key
// and value of the head. Here the one row reads each key and value once, straight from the input
// (a view of a key/value cache), and the keys of a head are split into fixed spans of kDecodeKeys, so
// that the threads have work at batch 1: each span keeps its own maximum, sum and weighted values,
// which are then combined span by span in order (the split depends on the number of keys alone, so the
// bits do not depend on the threads).
constexpr int64_t kDecodeKeys = 256;

// q . k over HS elements of the storage type, the query already in the accumulation type.
template <class T, class A>
inline A decode_dot(const A* q, const T* k, int64_t HS) {
  constexpr int W = lanes<A>();
  vec<A> acc{};
  int64_t c = 0;
  for (; c + W <= HS; c += W) acc += vload(q + c) * vload_as(k + c);
  A tail = 0;
  for (; c < HS; ++c) tail += q[c] * to_acc(k[c]);
  return vsum(acc) + tail;
}

// o += p * v over HSV elements; o is padded to a multiple of the vector width.
template <class T, class A>
inline void decode_axpy(A* o, A p, const T* v, int64_t HSV) {
  constexpr int W = lanes<A>();
  const vec<A> pv = vbroadcast<A>(p);
  int64_t c = 0;
  for (; c + W <= HSV; c += W) vstore(o + c, vload(o + c) + pv * vload_as(v + c));
  for (; c < HSV; ++c) o[c] += p * to_acc(v[c]);
}

template <class T>
void attention_decode_impl(const AttentionForwardArgs& a) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>();
  const int64_t B = a.B, NH = a.NH, HS = a.HS, HSV = a.HSV;
  const int64_t keys = visible_keys(a.causal, 1, a.TK);
  const int64_t spans = (keys + kDecodeKeys - 1) / kDecodeKeys, tasks = B * NH * spans;
  const int64_t HSp = round_up(HS, W), HSVp = round_up(HSV, W);
  const A scale = A(a.scale);
  std::vector<A> span_max(tasks), span_sum(tasks), span_out(tasks * HSVp, A(0));
  const bool parallel = B * NH * keys * (HS + HSV) >= (int64_t(1) << 15);
#pragma omp parallel num_threads(a.num_threads) if (parallel)
  {
    std::vector<A> q(HSp), S(round_up(kDecodeKeys, W));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bh = task / spans, b = bh / NH, h = bh % NH;
      const int64_t j0 = (task % spans) * kDecodeKeys, n = std::min(kDecodeKeys, keys - j0);
      convert_row(head_ptr<T>(a.q, b, h), q.data(), HS);
      const T* k = head_ptr<T>(a.k, b, h) + j0 * a.k.st;
      for (int64_t j = 0; j < n; ++j) S[j] = decode_dot(q.data(), k + j * a.k.st, HS);
      const int64_t ncols = round_up(n, W);
      const A m = scale_mask_rowmax(S.data(), ncols, n, scale);
      A* o = span_out.data() + task * HSVp;
      span_max[task] = m;
      if (m == -std::numeric_limits<A>::infinity()) continue;  // nothing to add (sum and values stay 0)
      span_sum[task] = exp_row(S.data(), ncols, m);
      const T* v = head_ptr<T>(a.v, b, h) + j0 * a.v.st;
      for (int64_t j = 0; j < n; ++j) decode_axpy(o, S[j], v + j * a.v.st, HSV);
    }
  }
  // Combine each head's spans: rescale each to the largest maximum (std::max skips a NaN maximum, whose
  // span's factor is then NaN and reaches the sum), as the online softmax does block by block.
  A* lse = static_cast<A*>(a.lse);
  std::vector<A> o(HSVp);
  for (int64_t bh = 0; bh < B * NH; ++bh) {
    A m = -std::numeric_limits<A>::infinity();
    for (int64_t s = 0; s < spans; ++s) m = std::max(m, span_max[bh * spans + s]);
    A l = 0;
    std::fill(o.begin(), o.end(), A(0));
    if (m != -std::numeric_limits<A>::infinity())
      for (int64_t s = 0; s < spans; ++s) {
        const int64_t t = bh * spans + s;
        if (span_max[t] == -std::numeric_limits<A>::infinity()) continue;
        const A f = std::exp(span_max[t] - m);
        l += span_sum[t] * f;
        const vec<A> fv = vbroadcast<A>(f);
        for (int64_t c = 0; c < HSVp; c += W)
          vstore(o.data() + c, vload(o.data() + c) + fv * vload(span_out.data() + t * HSVp + c));
      }
    store_row_scaled(head_ptr_mut<T>(a.out, bh / NH, bh % NH), o.data(), HSV, A(1) / l);
    lse[bh] = m + std::log(l);
  }
}

inline void attention_forward(const AttentionForwardArgs& a) {
  // The decode path reads keys with neither a mask, a window nor grouped heads (sampling's own calls);
  // other one-row calls take the general path.
  const bool decode = a.TQ == 1 && a.dropout_p == 0 && a.mask.ptr == nullptr && a.window == 0 && a.NKV == a.NH;
  with_storage_type(a.dtype, [&](auto t) {
    if (decode) attention_decode_impl<decltype(t)>(a);
    else attention_forward_impl<decltype(t)>(a);
  });
}

inline void attention_backward(const AttentionBackwardArgs& a) {
  with_storage_type(a.dtype, [&](auto t) { attention_backward_impl<decltype(t)>(a); });
}

inline void dropout_mask(uint64_t seed, int64_t B, int64_t NH, int64_t TQ, int64_t TK, float p, uint8_t* out,
                         int num_threads) {
  const int64_t rows = B * NH * TQ;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < TK; ++j) out[r * TK + j] = dropout_keep(seed, uint64_t(r * TK + j), p) ? 1 : 0;
}

}  // namespace NF_ISA
}  // namespace nanofast
