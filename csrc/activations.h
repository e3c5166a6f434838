// Activation functions and their derivatives, shared by the CPU and CUDA kernels.
// Derivatives at the kinks follow PyTorch's own backward formulas exactly.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FB_HOST_DEVICE inline
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

}  // namespace fastblocks
