// Fixed-width SIMD for the CPU kernels, through GCC / Clang vector extensions: a vector is 64 bytes of
// the accumulation dtype (16 floats or 8 doubles), which the FB_CPU_MULTIVERSION clones lower to one
// AVX-512 register, two AVX2 or four SSE registers. GCC's auto-vectoriser gives up on the tap loops of
// the depthwise convolution (or versions them into scalar code), so those are written with explicit
// vectors; simple elementwise and reduction loops are left to it.
#pragma once

#include <cstring>
#include <type_traits>

#include "activations.h"

// Vectors are only passed between inlined helpers, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

// Helpers are forced inline: called from a multiversioned kernel, an outlined copy would be compiled
// for the baseline target only.
#define FB_SIMD_INLINE inline __attribute__((always_inline))

namespace fastblocks {
namespace simd {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename T>
using vec = typename VecOf<T>::type;
template <typename T>
constexpr int lanes = 64 / sizeof(T);

// lanes<acc_t> consecutive elements of p (any dtype) as acc_t (unaligned).
template <typename acc_t, typename scalar_t>
FB_SIMD_INLINE vec<acc_t> load(const scalar_t* p) {
  vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    acc_t tmp[lanes<acc_t>];
    for (int j = 0; j < lanes<acc_t>; ++j) tmp[j] = static_cast<acc_t>(p[j]);
    std::memcpy(&v, tmp, sizeof v);
  }
  return v;
}

// The first n lanes of p, zeros after: a row's last, partial vector without reading past its end.
template <typename acc_t, typename scalar_t>
FB_SIMD_INLINE vec<acc_t> load_partial(const scalar_t* p, int n) {
  acc_t tmp[lanes<acc_t>] = {};
  for (int j = 0; j < n; ++j) tmp[j] = static_cast<acc_t>(p[j]);
  vec<acc_t> v;
  std::memcpy(&v, tmp, sizeof v);
  return v;
}

template <typename acc_t>
FB_SIMD_INLINE void store(acc_t* p, const vec<acc_t>& v) {
  std::memcpy(p, &v, sizeof v);
}

// out[j] = act(v[j]) for the first n lanes, converted to out's dtype.
template <int ACT, typename acc_t, typename out_t>
FB_SIMD_INLINE void store_activated(out_t* out, const vec<acc_t>& v, int n) {
  acc_t buf[lanes<acc_t>];
  std::memcpy(buf, &v, sizeof buf);
  for (int j = 0; j < lanes<acc_t>; ++j) buf[j] = activate<ACT>(buf[j]);
  if constexpr (std::is_same_v<acc_t, out_t>) {
    if (n == lanes<acc_t>) return void(std::memcpy(out, buf, sizeof buf));
  }
  for (int j = 0; j < n; ++j) out[j] = static_cast<out_t>(buf[j]);
}

// Sum of the lanes.
template <typename acc_t>
FB_SIMD_INLINE acc_t reduce_add(const vec<acc_t>& v) {
  acc_t s = 0;
  for (int j = 0; j < lanes<acc_t>; ++j) s += v[j];
  return s;
}

}  // namespace simd
}  // namespace fastblocks
