// Philox4x32-10, exactly as Triton's tl.rand computes it, so the CPU and CUDA kernels draw the same
// attention-dropout mask for the same seed. Key = the seed's two 32-bit halves; counter = the
// element's 64-bit offset in its two halves, then 0, 0. Only the first output word is used.
#pragma once
#include <cstdint>

namespace nanofast {

inline uint32_t philox_first_word(uint64_t seed, uint64_t offset) {
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// tl.rand's conversion: read as int32, fold negatives with bitwise NOT, scale into [0, 1).
inline float philox_uniform(uint64_t seed, uint64_t offset) {
  int32_t x = int32_t(philox_first_word(seed, offset));
  if (x < 0) x = ~x;
  return float(x) * 4.6566127342e-10f;
}

// The element at `offset` of the (B, NH, TQ, TK) score matrix survives dropout iff this is true.
inline bool dropout_keep(uint64_t seed, uint64_t offset, float p) { return philox_uniform(seed, offset) >= p; }

}  // namespace nanofast
