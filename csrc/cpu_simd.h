// Fixed-width SIMD for the CPU kernels, through GCC / Clang vector extensions: a vector is
// FB_SIMD_BYTES bytes of the accumulation dtype, which the FB_CPU_MULTIVERSION clones lower to their
// registers. GCC's auto-vectoriser gives up on the tap loops of the depthwise convolution (or versions
// them into scalar code), so those are written with explicit vectors, and so are the BatchNorm +
// activation passes (whose piecewise activations it compiled to branches).
//
// setup.py sets FB_SIMD_BYTES to the width of the building CPU's registers: 64 with AVX-512, 32 with
// AVX2, 16 on other x86-64 CPUs; other architectures keep the default of 64. A vector wider than the
// clone's registers is correct but slow: in the AVX2 clone GCC lowers comparisons, selects and
// broadcasts of 64-byte vectors lane by lane through the stack (measured on an AVX2 EPYC, one thread:
// BatchNorm + ReLU 2.3-4.4x slower than eager's; with 32-byte vectors 3-5x faster, its statistics
// 7-10x). Every clone stays correct wherever it runs; the width only tunes them.
#pragma once

#include <cmath>
#include <cstring>
#include <type_traits>

#include "activations.h"

// Vectors are only passed between inlined helpers, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

// Helpers are forced inline: called from a multiversioned kernel, an outlined copy would be compiled
// for the baseline target only.
#define FB_SIMD_INLINE inline __attribute__((always_inline))
// The same for a lambda that a multiversioned kernel calls: `[&](...) FB_LAMBDA_INLINE { ... }`.
#define FB_LAMBDA_INLINE __attribute__((always_inline))

#ifndef FB_SIMD_BYTES
#define FB_SIMD_BYTES 64
#endif

namespace fastblocks {
namespace simd {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(FB_SIMD_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(FB_SIMD_BYTES)));
};

template <typename T>
using vec = typename VecOf<T>::type;

// The same vector at T's alignment, for loads and stores at any element. Typed accesses, not memcpy:
// a memcpy store may alias any object, so GCC reloaded every size, stride and data pointer of the
// enclosing loops after each store (measured: a channels_last BatchNorm pass 1.9x slower).
template <typename T>
struct UnalignedVecOf {
  typedef vec<T> type __attribute__((aligned(alignof(T))));
};
template <typename T>
using unaligned_vec = typename UnalignedVecOf<T>::type;
static_assert(alignof(unaligned_vec<float>) == alignof(float) && alignof(unaligned_vec<double>) == alignof(double));
template <typename T>
constexpr int lanes = FB_SIMD_BYTES / sizeof(T);

// lanes<acc_t> consecutive elements of p (any dtype) as acc_t (unaligned).
template <typename acc_t, typename scalar_t>
FB_SIMD_INLINE vec<acc_t> load(const scalar_t* p) {
  vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v = *reinterpret_cast<const unaligned_vec<acc_t>*>(p);
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

// lanes<acc_t> elements when n is a whole vector or `readable` (a whole vector at p stays inside the
// buffer: the lanes past n belong to the next row and are ignored), else the first n and zeros.
template <typename acc_t, typename scalar_t>
FB_SIMD_INLINE vec<acc_t> load_n(const scalar_t* p, int n, bool readable = false) {
  return readable || n == lanes<acc_t> ? load<acc_t>(p) : load_partial<acc_t>(p, n);
}

template <typename acc_t>
FB_SIMD_INLINE void store(acc_t* p, const vec<acc_t>& v) {
  *reinterpret_cast<unaligned_vec<acc_t>*>(p) = v;
}

// The first n lanes of v into out, converted to out's dtype.
template <typename acc_t, typename out_t>
FB_SIMD_INLINE void store_n(out_t* out, const vec<acc_t>& v, int n) {
  if constexpr (std::is_same_v<acc_t, out_t>) {
    if (n == lanes<acc_t>) store(out, v);
    else for (int j = 0; j < n; ++j) out[j] = v[j];
  } else {
    for (int j = 0; j < n; ++j) out[j] = static_cast<out_t>(v[j]);
  }
}

template <typename acc_t>
FB_SIMD_INLINE vec<acc_t> broadcast(acc_t s) {
  return vec<acc_t>{} + s;
}

// v with the lanes from n on set to zero.
template <typename acc_t>
FB_SIMD_INLINE vec<acc_t> keep_first(const vec<acc_t>& v, int n) {
  using mask_t = decltype(v < v);  // the signed integer vector of the lane width
  mask_t lane;
  for (int j = 0; j < lanes<acc_t>; ++j) lane[j] = j;
  return lane < mask_t{} + n ? v : vec<acc_t>{};
}

template <typename acc_t>
FB_SIMD_INLINE vec<acc_t> clamp(const vec<acc_t>& v, acc_t lo, acc_t hi) {
  const vec<acc_t> l = broadcast(lo), h = broadcast(hi), below_hi = v > h ? h : v;
  return v < l ? l : below_hi;
}

// e^x per lane: expf_vectorizable's arithmetic (activations.h) on vectors, same result.
// (A lane loop over the scalar function vectorised on its own, but not inside the kernels' loop nests,
// where GCC kept its clamps as branches: with 32-byte vectors SiLU ran scalar, ~3x slower than eager's.)
FB_SIMD_INLINE vec<float> exp(const vec<float>& x) {
  return expf_cephes<vec<float>, decltype(x < x)>(x);  // int32 lanes
}

// float64 (gradcheck): libm's exp, lane by lane.
FB_SIMD_INLINE vec<double> exp(vec<double> x) {
  for (int j = 0; j < lanes<double>; ++j) x[j] = std::exp(x[j]);
  return x;
}

template <typename acc_t>
FB_SIMD_INLINE vec<acc_t> sigmoid(const vec<acc_t>& v) {
  return acc_t(1) / (acc_t(1) + exp(-v));
}

// The activations of activations.h and their derivatives, same formulas. The piecewise ones are
// written as vector selects: as a lane loop GCC compiles their comparisons to branches, which random
// signs mispredict half of the time. (Checked in the assembly: a select on a combined mask, e.g. of
// 0 < v < 6, is lowered to scalar code in these helpers, so relu6' avoids one.)
template <int ACT, typename acc_t>
FB_SIMD_INLINE vec<acc_t> activate(const vec<acc_t>& v) {
  const vec<acc_t> zero{};
  if constexpr (ACT == kReLU) return v < zero ? zero : v;  // NaN stays NaN, as in PyTorch
  else if constexpr (ACT == kReLU6) return clamp<acc_t>(v, 0, 6);
  else if constexpr (ACT == kSiLU) return v * sigmoid<acc_t>(v);
  else if constexpr (ACT == kHardSwish) return v * clamp<acc_t>(v + acc_t(3), 0, 6) / acc_t(6);
  else return v;
}

template <int ACT, typename acc_t>
FB_SIMD_INLINE vec<acc_t> activate_grad(const vec<acc_t>& v) {
  const vec<acc_t> zero{}, one = broadcast(acc_t(1));
  if constexpr (ACT == kReLU) return v > zero ? one : zero;
  else if constexpr (ACT == kReLU6) {  // 1 on (0, 6), as a difference of two steps (see above)
    const vec<acc_t> positive = v > zero ? one : zero, from_6 = v >= broadcast(acc_t(6)) ? one : zero;
    return positive - from_6;
  }
  else if constexpr (ACT == kSiLU) {  // s * (1 + x * (1 - s)) with s = sigmoid(x), as silu_grad
    const vec<acc_t> s = sigmoid<acc_t>(v);
    return s * (one + v * (one - s));
  }
  else if constexpr (ACT == kHardSwish) {
    const vec<acc_t> slope = v / acc_t(3) + acc_t(0.5), below_3 = v < broadcast(acc_t(3)) ? slope : one;
    return v <= broadcast(acc_t(-3)) ? zero : below_3;
  }
  else return one;
}

template <typename acc_t>
FB_SIMD_INLINE vec<acc_t> hardsigmoid(const vec<acc_t>& v) {
  return clamp<acc_t>(v / acc_t(6) + acc_t(0.5), 0, 1);
}

// 1/6 on (-3, 3), as a difference of two steps (see above).
template <typename acc_t>
FB_SIMD_INLINE vec<acc_t> hardsigmoid_grad(const vec<acc_t>& v) {
  const vec<acc_t> zero{}, sixth = broadcast(acc_t(1) / acc_t(6));
  const vec<acc_t> above = v > broadcast(acc_t(-3)) ? sixth : zero, from_3 = v >= broadcast(acc_t(3)) ? sixth : zero;
  return above - from_3;
}

// out[j] = act(v[j]) for the first n lanes, converted to out's dtype.
template <int ACT, typename acc_t, typename out_t>
FB_SIMD_INLINE void store_activated(out_t* out, const vec<acc_t>& v, int n) {
  store_n<acc_t>(out, activate<ACT, acc_t>(v), n);
}

// Sum of the lanes, pairwise: log2(lanes) dependent adds instead of a chain of lanes - 1 (the chain
// dominated reductions over small planes).
template <typename acc_t>
FB_SIMD_INLINE acc_t reduce_add(const vec<acc_t>& v) {
  acc_t t[lanes<acc_t>];
  std::memcpy(t, &v, sizeof v);
  for (int width = lanes<acc_t> / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) t[j] += t[j + width];
  return t[0];
}

}  // namespace simd
}  // namespace fastblocks
