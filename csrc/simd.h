// Portable SIMD through GCC/Clang vector extensions: the same source becomes SSE2, AVX2 or AVX-512
// code depending on the flags the including translation unit is compiled with (see CMakeLists.txt).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define NF_VBYTES 64
#elif defined(__AVX2__) || defined(__AVX__)
#define NF_VBYTES 32
#else
#define NF_VBYTES 16
#endif

// AVX512-BF16: one instruction rounds 16 floats to bfloat16, another multiplies pairs of bfloat16.
#if defined(__AVX512BF16__) && NF_VBYTES == 64
#define NF_BF16_DOT 1
#else
#define NF_BF16_DOT 0
#endif

namespace nanofast {
namespace NF_ISA {

template <class A> struct VecOf;
template <> struct VecOf<float> {
  typedef float type __attribute__((vector_size(NF_VBYTES)));
  typedef int32_t itype __attribute__((vector_size(NF_VBYTES)));
};
template <> struct VecOf<double> {
  typedef double type __attribute__((vector_size(NF_VBYTES)));
  typedef int64_t itype __attribute__((vector_size(NF_VBYTES)));
};

template <class A> using vec = typename VecOf<A>::type;
template <class A> constexpr int lanes() { return NF_VBYTES / sizeof(A); }

template <class A> inline vec<A> vload(const A* p) {
  vec<A> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class A> inline void vstore(A* p, vec<A> v) { std::memcpy(p, &v, sizeof v); }
// Every lane = s. Written as s - 0, which is s exactly (also for -0), so the compiler folds it to a
// plain splat, and on AVX-512 into the instruction that uses it (an embedded {1to16} broadcast).
// `vec<A>{} + s` is not an identity (+0 + -0 is +0): it costs a scalar add and a separate broadcast
// in inner loops; a lane-by-lane loop is worse still (GCC inserts lane after lane).
template <class A> inline vec<A> vbroadcast(A s) { return s - vec<A>{}; }

// v as rounded, never contracted into the operation that consumes it. With FMA the compiler may turn
// a * b - c into one rounding: a product two passes must see alike (LayerNorm's g = dy * w, summed in
// one pass and its mean subtracted from it in the next) would be rounded in one and exact in the other.
// An empty asm that takes v in a register and gives it back: the compiler cannot see through it, so
// it cannot contract the product, and v never leaves the register (GCC's __builtin_assoc_barrier does
// the same with a cost in the backward's inner loops).
template <class V> inline V rounded(V v) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#else
  asm("" : "+m"(v));  // through memory: the value the product rounded to
#endif
  return v;
}

// Horizontal reductions, as a tree of shuffles: log2(lanes) dependent steps. (A plain loop over the
// lanes is a dependent chain the compiler may not reassociate, and it costs more than the row it sums.)
#if defined(__AVX512F__)
inline float vsum(vec<float> v) { return _mm512_reduce_add_ps((__m512)v); }
inline double vsum(vec<double> v) { return _mm512_reduce_add_pd((__m512d)v); }
inline float vmax(vec<float> v) { return _mm512_reduce_max_ps((__m512)v); }
inline double vmax(vec<double> v) { return _mm512_reduce_max_pd((__m512d)v); }
#elif NF_VBYTES == 32
inline float vsum(vec<float> v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
inline double vsum(vec<double> v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128((__m256d)v), _mm256_extractf128_pd((__m256d)v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
inline float vmax(vec<float> v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}
inline double vmax(vec<double> v) {
  __m128d s = _mm_max_pd(_mm256_castpd256_pd128((__m256d)v), _mm256_extractf128_pd((__m256d)v, 1));
  return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
}
#else
inline float vsum(vec<float> v) { return (v[0] + v[2]) + (v[1] + v[3]); }
inline double vsum(vec<double> v) { return v[0] + v[1]; }
inline float vmax(vec<float> v) {
  float a = v[0] > v[2] ? v[0] : v[2], b = v[1] > v[3] ? v[1] : v[3];
  return a > b ? a : b;
}
inline double vmax(vec<double> v) { return v[0] > v[1] ? v[0] : v[1]; }
#endif
template <class A> inline vec<A> vmaxv(vec<A> a, vec<A> b) { return a > b ? a : b; }

#if defined(__AVX512F__)
// The AVX-512 mask of the first n (clamped to 0..16) lanes: masked loads and stores of a row's tail.
inline __mmask16 lanes_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
#endif

// Streaming (non-temporal) stores, for outputs too large to stay in the last-level cache anyway: a
// plain store first reads the line it writes, so a kernel that reads one array and writes another
// moves a third more bytes than it needs. p must be aligned to the vector; stream_fence() orders the
// streamed data before whatever the thread stores next (the barrier that ends a parallel loop).
inline void vstream(float* p, vec<float> v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#elif NF_VBYTES == 32
  _mm256_stream_ps(p, (__m256)v);
#elif defined(__SSE2__)
  _mm_stream_ps(p, (__m128)v);
#else
  vstore(p, v);
#endif
}
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Whether a kernel streams an output of `bytes` whose rows are `row_bytes` apart: outputs of 16 MiB and
// more (the size of a laptop's last-level cache, half a server CCX's), each row starting on a 64-byte
// boundary so every vector store is aligned. The bits are the same either way.
constexpr int64_t kStreamingStoreBytes = int64_t(16) << 20;
inline bool stream_output(const void* p, int64_t bytes, int64_t row_bytes) {
  return bytes >= kStreamingStoreBytes && reinterpret_cast<uintptr_t>(p) % 64 == 0 && row_bytes % 64 == 0;
}

// bfloat16 <-> float32 for a whole vector: widening is a 16-bit shift; narrowing rounds to nearest
// even and keeps NaNs quiet, exactly as the scalar from_acc<bf16> does.
typedef uint16_t vbf16 __attribute__((vector_size(NF_VBYTES / 2)));
typedef uint32_t vu32 __attribute__((vector_size(NF_VBYTES)));

inline vec<float> vload_bf16(const void* p) {
#if NF_VBYTES == 64
  // one vpmovzxwd over the whole vector (the generic widening below is split in two halves)
  vu32 u = reinterpret_cast<vu32>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)))) << 16;
#else
  vbf16 h;
  std::memcpy(&h, p, sizeof h);
  vu32 u = __builtin_convertvector(h, vu32) << 16;
#endif
  vec<float> f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void vstore_bf16(void* p, vec<float> f) {
#if NF_BF16_DOT
  // vcvtneps2bf16: the same rounding and quiet NaNs in one instruction (the sequence below takes
  // several, the bulk of a bf16 LayerNorm's or GELU's time). It differs only on
  // float32 denormals, below 1.2e-38, which it flushes to a signed zero.
  const __m256bh rounded = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(f));
  std::memcpy(p, &rounded, sizeof rounded);
#else
  vu32 u;
  std::memcpy(&u, &f, sizeof u);
  const vu32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu32 quiet_nan = (u >> 16) | 0x40u;
  const vu32 r = (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
#if NF_VBYTES == 64
  // one vpmovdw: the generic narrowing below becomes a two-source permute on AVX-512
  const __m256i h = _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(r));
#else
  const vbf16 h = __builtin_convertvector(r, vbf16);
#endif
  std::memcpy(p, &h, sizeof h);
#endif
}

// exp(x) for a float vector: round x/ln2 to n with the 1.5*2^23 trick, a degree-6 polynomial on the
// remainder, and 2^n spliced into the exponent bits. About 1 ulp; exactly 0 below -103 (so masked
// scores, set to -inf, vanish) and clamped at the top.
inline vec<float> vexp(vec<float> x) {
  using vf = vec<float>;
  using vi = VecOf<float>::itype;
  const vf zero_below = x < -103.0f ? vf{} + 1.0f : vf{};
  x = x > 88.3762626647949f ? vf{} + 88.3762626647949f : x;
  x = x < -87.0f ? vf{} - 87.0f : x;
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23
  vf t = x * 1.44269504088896341f + magic;
  vf n = t - magic;
  vf r = x - n * 0.693145751953125f;  // ln2 split in two for an exact product with n
  r = r - n * 1.428606765330187045e-06f;
  vf p = vf{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  vi bits;
  std::memcpy(&bits, &t, sizeof bits);
  vi e = (bits - 0x4B400000) << 23;  // n as an integer, moved into the exponent field
  vi pb;
  std::memcpy(&pb, &p, sizeof pb);
  pb += e;
  vf out;
  std::memcpy(&out, &pb, sizeof out);
  return zero_below != 0.0f ? vf{} : out;
}

inline vec<double> vexp(vec<double> x) {
  for (int i = 0; i < lanes<double>(); ++i) x[i] = std::exp(x[i]);
  return x;
}

}  // namespace NF_ISA
}  // namespace nanofast

#include "scalar_types.h"

namespace nanofast {
namespace NF_ISA {

// A vector of the accumulation type from W consecutive elements of storage type T, and back.
inline vec<float> vload_as(const float* p) { return vload(p); }
inline vec<double> vload_as(const double* p) { return vload(p); }
inline vec<float> vload_as(const bf16* p) { return vload_bf16(p); }
inline void vstore_as(float* p, vec<float> v) { vstore(p, v); }
inline void vstore_as(double* p, vec<double> v) { vstore(p, v); }
inline void vstore_as(bf16* p, vec<float> v) { vstore_bf16(p, v); }
// vstore_as, streamed when `stream` and the storage is float32 (see stream_output)
inline void vput(float* p, vec<float> v, bool stream) { stream ? vstream(p, v) : vstore(p, v); }
inline void vput(double* p, vec<double> v, bool) { vstore(p, v); }
inline void vput(bf16* p, vec<float> v, bool) { vstore_bf16(p, v); }

// C elements converted between storage and accumulation types, a vector at a time (element by
// element, the conversions cost more than the bfloat16 LayerNorm's arithmetic).
template <class From, class To> inline void convert_row(const From* src, To* dst, int64_t C) {
  constexpr int W = lanes<decltype(to_acc(From{}))>();
  int64_t c = 0;
  for (; c + W <= C; c += W) vstore_as(dst + c, vload_as(src + c));
  for (; c < C; ++c) dst[c] = from_acc<To>(to_acc(src[c]));
}

// The elementwise kernels' loop: f(c0, c1) over [0, n) in fixed chunks of 4096, split across threads
// once there is enough work (the chunks, not the threads, fix what each call computes). `streamed`:
// f streams stores, and each thread fences them before the loop ends.
template <class F> inline void for_each_chunk(int64_t n, int num_threads, F&& f, bool streamed = false) {
  constexpr int64_t kChunk = 4096;
#pragma omp parallel num_threads(num_threads) if (n > 32768)
  {
#pragma omp for schedule(static) nowait
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) f(c0, std::min(n, c0 + kChunk));
    if (streamed) stream_fence();
  }
}

// dst[c] = src[c] * scale in the storage type, a vector at a time (the kernels' output rows).
template <class T, class A> inline void store_row_scaled(T* dst, const A* src, int64_t n, A scale) {
  constexpr int W = lanes<A>();
  const vec<A> s = vbroadcast<A>(scale);
  int64_t c = 0;
  for (; c + W <= n; c += W) vstore_as(dst + c, vload(src + c) * s);
  for (; c < n; ++c) dst[c] = from_acc<T>(src[c] * scale);
}

}  // namespace NF_ISA
}  // namespace nanofast
