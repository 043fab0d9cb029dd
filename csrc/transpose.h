// A square block of float32 transposed in registers: lanes x lanes (16x16 with AVX-512, 8x8 with AVX2).
// The GEMMs' packing (gemm.h, gemm_bf16.h) and attention's transposed operands (attention.h) share it.
#pragma once
#include <cstdint>
#include <utility>

#include "simd.h"

namespace nanofast {
namespace NF_ISA {

constexpr int transpose_block() { return NF_VBYTES >= 32 ? lanes<float>() : 1; }

#if defined(__AVX512F__)
// out[j][i] = r[i][j] for the 16 x 16 block in r (in place), in three rounds of one-instruction
// shuffles: unpack pairs within 128-bit lanes, then quads, then gather the 128-bit lanes. (The
// butterfly below does the same in two-source permutes, which run slower at this width.)
inline void transpose_registers(vec<float> r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved within each 128-bit lane
    t[2 * i] = _mm512_unpacklo_ps((__m512)r[2 * i], (__m512)r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps((__m512)r[2 * i], (__m512)r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // quads of rows: lane l of u[4g + c] holds column 4l + c of rows 4g..4g+3
    const __m512d t0 = _mm512_castps_pd(t[4 * g]), t1 = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * g + 2]), t3 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {  // gather lane l of the four quads: column 4l + c of all 16 rows
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = (vec<float>)_mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + c] = (vec<float>)_mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + c] = (vec<float>)_mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + c] = (vec<float>)_mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}
#else
// log2(lanes) butterfly stages; stage h swaps the off-diagonal h x h sub-blocks of every 2h x 2h
// block, using one two-source shuffle per row.
template <int W, int H> constexpr int butterfly_lo(int j) { return (j & H) == 0 ? j : W + j - H; }
template <int W, int H> constexpr int butterfly_hi(int j) { return (j & H) == 0 ? j + H : W + j; }

template <int H, std::size_t... J>
inline void butterfly_stage(vec<float>* r, std::index_sequence<J...>) {
  constexpr int W = lanes<float>();
  for (int i = 0; i < W; ++i) {
    if (i & H) continue;
    const vec<float> a = r[i], b = r[i + H];
    r[i] = __builtin_shufflevector(a, b, butterfly_lo<W, H>(J)...);
    r[i + H] = __builtin_shufflevector(a, b, butterfly_hi<W, H>(J)...);
  }
}

// out[j][i] = r[i][j] for the lanes x lanes block in r (in place).
inline void transpose_registers(vec<float>* r) {
  constexpr int W = lanes<float>();
  using seq = std::make_index_sequence<W>;
  if constexpr (W >= 8) butterfly_stage<4>(r, seq{});
  butterfly_stage<2>(r, seq{});
  butterfly_stage<1>(r, seq{});
}
#endif

// dst[c * dst_stride + r] = src[r * src_stride + c] for r, c < lanes.
inline void transpose_block_f32(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  constexpr int W = lanes<float>();
  vec<float> r[W];
  for (int i = 0; i < W; ++i) r[i] = vload(src + i * src_stride);
  transpose_registers(r);
  for (int i = 0; i < W; ++i) vstore(dst + i * dst_stride, r[i]);
}

}  // namespace NF_ISA
}  // namespace nanofast
