// Helpers shared by the CUDA kernels: launch sizing, 16-byte vectorised elementwise maps and
// warp reductions.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include "fastblocks.h"

namespace fastblocks {
namespace cuda {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t work, int threads = kThreads) {
  const int64_t max_blocks = 65535LL * 8;  // grid-stride loops cover the rest
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, max_blocks));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// out[i] = op(i, a[i], b[i]) with 16-byte loads/stores when every pointer is aligned, scalar
// otherwise. `op` gets the flat index so that callers can look up per-channel operands.
template <typename scalar_t, int VEC, typename Op>
__global__ void map2_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                            int64_t n, Op op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  const int64_t n_vec = n / VEC;
  for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < n_vec; v += stride) {
    Vec<scalar_t, VEC> va = reinterpret_cast<const Vec<scalar_t, VEC>*>(a)[v], vb, vo;
    if (b != nullptr) vb = reinterpret_cast<const Vec<scalar_t, VEC>*>(b)[v];
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      vo.v[k] = static_cast<scalar_t>(op(v * VEC + k, static_cast<acc_t>(va.v[k]),
                                         b != nullptr ? static_cast<acc_t>(vb.v[k]) : acc_t(0)));
    reinterpret_cast<Vec<scalar_t, VEC>*>(out)[v] = vo;
  }
  for (int64_t i = n_vec * VEC + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = static_cast<scalar_t>(
        op(i, static_cast<acc_t>(a[i]), b != nullptr ? static_cast<acc_t>(b[i]) : acc_t(0)));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launches map2_kernel on the current stream; b may be null (unary map).
template <typename scalar_t, typename Op>
void launch_map2(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, Op op) {
  if (n == 0) return;
  constexpr int VEC = 16 / sizeof(scalar_t);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (aligned16(a) && aligned16(out) && (b == nullptr || aligned16(b))) {
    map2_kernel<scalar_t, VEC><<<num_blocks((n + VEC - 1) / VEC), kThreads, 0, stream>>>(a, b, out, n, op);
  } else {
    map2_kernel<scalar_t, 1><<<num_blocks(n), kThreads, 0, stream>>>(a, b, out, n, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

}  // namespace cuda
}  // namespace fastblocks
