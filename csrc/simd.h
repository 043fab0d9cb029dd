// Portable SIMD through GCC/Clang vector extensions: the same source becomes SSE2, AVX2 or AVX-512
// code depending on the flags the including translation unit is compiled with (see CMakeLists.txt).
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__AVX512F__)
#define NF_VBYTES 64
#elif defined(__AVX2__) || defined(__AVX__)
#define NF_VBYTES 32
#else
#define NF_VBYTES 16
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

template <class A> inline vec<A> vload(const A* p) { vec<A> v; std::memcpy(&v, p, sizeof v); return v; }
template <class A> inline void vstore(A* p, vec<A> v) { std::memcpy(p, &v, sizeof v); }
template <class A> inline vec<A> vbroadcast(A s) { return vec<A>{} + s; }

template <class A> inline A vsum(vec<A> v) {
  A s = 0;
  for (int i = 0; i < lanes<A>(); ++i) s += v[i];
  return s;
}
template <class A> inline A vmax(vec<A> v) {
  A m = v[0];
  for (int i = 1; i < lanes<A>(); ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <class A> inline vec<A> vmaxv(vec<A> a, vec<A> b) { return a > b ? a : b; }

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
