// Storage types and their conversion to the accumulation type: bfloat16 and float32 accumulate in
// float32, float64 in float64 (as ATen does).
#pragma once
#include <cstdint>
#include <cstring>

#include "kernel_table.h"

namespace nanofast {

struct bf16 { uint16_t bits; };

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <class T> inline T from_acc(acc_t<T> v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }
// Round to nearest even, NaN kept quiet: the same rounding torch uses for float -> bfloat16.
template <> inline bf16 from_acc<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

// Calls f(T{}) with the storage type T a dtype code names; does nothing for another code (the Python
// layer validates dtypes first). The kernels' entry points pick their template instance with it.
template <class F> inline void with_storage_type(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat64: return f(double{});
    case kBFloat16: return f(bf16{});
  }
}

}  // namespace nanofast
