// A square block of float32 transposed in registers: lanes x lanes (16x16 with AVX-512, 8x8 with AVX2).
// log2(lanes) butterfly stages; stage h swaps the off-diagonal h x h sub-blocks of every 2h x 2h
// block, using one two-source shuffle per row.
#pragma once
#include <cstdint>
#include <utility>

#include "simd.h"

namespace nanofast {
namespace NF_ISA {

constexpr int transpose_block() { return NF_VBYTES >= 32 ? lanes<float>() : 1; }

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

// dst[c * dst_stride + r] = src[r * src_stride + c] for r, c < lanes.
inline void transpose_block_f32(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  constexpr int W = lanes<float>();
  using seq = std::make_index_sequence<W>;
  vec<float> r[W];
  for (int i = 0; i < W; ++i) r[i] = vload(src + i * src_stride);
  if constexpr (W >= 16) butterfly_stage<8>(r, seq{});
  if constexpr (W >= 8) butterfly_stage<4>(r, seq{});
  butterfly_stage<2>(r, seq{});
  butterfly_stage<1>(r, seq{});
  for (int i = 0; i < W; ++i) vstore(dst + i * dst_stride, r[i]);
}

}  // namespace NF_ISA
}  // namespace nanofast
