// Activation functions and their derivatives, shared by the CPU and CUDA kernels.
// Derivatives at the kinks follow PyTorch's own backward formulas exactly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FB_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Forced inline so that CPU loops over these vectorise inside the multiversioned kernels that call them.
#define FB_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace fastblocks {

template <typename T>
FB_HOST_DEVICE T clamp_(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T>
FB_HOST_DEVICE T hardsigmoid(T x) {
  return clamp_(x / T(6) + T(0.5), T(0), T(1));
}

// d/dx hardsigmoid: 1/6 strictly inside (-3, 3), 0 elsewhere (aten hardsigmoid_backward).
template <typename T>
FB_HOST_DEVICE T hardsigmoid_grad(T x) {
  return (x > T(-3) && x < T(3)) ? T(1) / T(6) : T(0);
}

template <typename T>
FB_HOST_DEVICE T hardswish(T x) {
  return x * clamp_(x + T(3), T(0), T(6)) / T(6);
}

// d/dx hardswish: 0 up to -3, x/3 + 1/2 strictly inside (-3, 3), 1 from 3 on (aten hardswish_backward).
template <typename T>
FB_HOST_DEVICE T hardswish_grad(T x) {
  return x <= T(-3) ? T(0) : (x < T(3) ? x / T(3) + T(0.5) : T(1));
}

template <typename T>
FB_HOST_DEVICE T relu(T x) {
  return x < T(0) ? T(0) : x;  // NaN stays NaN, as in PyTorch
}

// d/dx relu: 1 for x > 0, 0 from 0 down (aten threshold_backward).
template <typename T>
FB_HOST_DEVICE T relu_grad(T x) {
  return x > T(0) ? T(1) : T(0);
}

template <typename T>
FB_HOST_DEVICE T relu6(T x) {
  return clamp_(x, T(0), T(6));
}

// d/dx relu6: 1 strictly inside (0, 6), 0 elsewhere (aten hardtanh_backward).
template <typename T>
FB_HOST_DEVICE T relu6_grad(T x) {
  return (x > T(0) && x < T(6)) ? T(1) : T(0);
}

// e^x for float on the host as branch-free arithmetic (Cephes expf: reduction by ln 2 in two parts, a
// degree-6 polynomial, the power of two built in the exponent bits; rounding by the 1.5 * 2^23 shifter
// instead of floor), so that CPU loops calling it vectorise, where libm's expf is a scalar call. Error
// about 1 ulp; inputs are clamped to [-87.3, 88], where the result is still a normal float (sigmoid and
// SiLU are unaffected). NaN propagates. F, I: float and int32_t, or GCC vectors of them (cpu_simd.h).
template <typename F, typename I>
inline __attribute__((always_inline)) F expf_cephes(F x) {
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.0f ? 88.0f : x;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: n = round(x / ln 2) lands in the low mantissa bits
  const F shifted = x * 1.44269504088896341f + kShifter;
  const F n = shifted - kShifter;
  F r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - (0x4B400000 - 127)) << 23;  // (n + bias) in the exponent field: 2^n
  F two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

inline __attribute__((always_inline)) float expf_vectorizable(float x) {
  return expf_cephes<float, int32_t>(x);
}

template <typename T>
FB_HOST_DEVICE T exp_(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  if constexpr (std::is_same_v<T, float>) {
    return expf_vectorizable(x);
  } else {
    using std::exp;
    return exp(x);
  }
#endif
}

template <typename T>
FB_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

template <typename T>
FB_HOST_DEVICE T silu(T x) {
  return x * sigmoid(x);
}

// d/dx silu = s * (1 + x * (1 - s)) with s = sigmoid(x) (aten silu_backward).
template <typename T>
FB_HOST_DEVICE T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// Activation codes shared with Python (index in fastblocks/ops/dwconv_bn_act.py: ACTIVATIONS), and the
// compile-time selection that fused kernels take as a template argument.
enum Activation : int { kIdentity = 0, kReLU = 1, kReLU6 = 2, kSiLU = 3, kHardSwish = 4, kNumActivations = 5 };

template <int ACT, typename T>
FB_HOST_DEVICE T activate(T x) {
  if constexpr (ACT == kReLU) return relu(x);
  else if constexpr (ACT == kReLU6) return relu6(x);
  else if constexpr (ACT == kSiLU) return silu(x);
  else if constexpr (ACT == kHardSwish) return hardswish(x);
  else return x;
}

template <int ACT, typename T>
FB_HOST_DEVICE T activate_grad(T x) {
  if constexpr (ACT == kReLU) return relu_grad(x);
  else if constexpr (ACT == kReLU6) return relu6_grad(x);
  else if constexpr (ACT == kSiLU) return silu_grad(x);
  else if constexpr (ACT == kHardSwish) return hardswish_grad(x);
  else return T(1);
}

// Calls f(std::integral_constant<int, ACT>{}) for a runtime activation code; false if unknown.
template <typename F>
bool dispatch_activation(int64_t act, F&& f) {
  switch (act) {
    case kIdentity: f(std::integral_constant<int, kIdentity>{}); return true;
    case kReLU: f(std::integral_constant<int, kReLU>{}); return true;
    case kReLU6: f(std::integral_constant<int, kReLU6>{}); return true;
    case kSiLU: f(std::integral_constant<int, kSiLU>{}); return true;
    case kHardSwish: f(std::integral_constant<int, kHardSwish>{}); return true;
    default: return false;
  }
}

}  // namespace fastblocks
