// hard-swish, hard-sigmoid and the hard-sigmoid gate: CUDA kernels. Memory-bound, so each is one
// pass with 16-byte vector loads (cuda_utils.cuh); math in fp32 for fp16 / bf16.
#include <limits>

#include "activations.h"
#include "cuda_utils.cuh"

#include <ATen/cuda/detail/IntegerDivider.cuh>  // after ATen: it relies on c10's macros

namespace fastblocks {
namespace {

using cuda::launch_map2;

at::Tensor prepare(const at::Tensor& x) {
  check_floating(x, "x");
  check_dense(x, "x");
  return at::empty_like(x);
}

at::Tensor hardswish_forward_cuda(const at::Tensor& x) {
  at::Tensor out = prepare(x);
  const c10::cuda::CUDAGuard guard(x.device());
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardswish_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_map2<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(), x.numel(),
                          [] __device__(int64_t, acc_t v, acc_t) -> acc_t { return hardswish(v); });
  });
  return out;
}

at::Tensor hardswish_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  at::Tensor out = prepare(x);
  check_same_layout(grad, "grad", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardswish_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_map2<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                          out.mutable_data_ptr<scalar_t>(), x.numel(),
                          [] __device__(int64_t, acc_t dy, acc_t v) -> acc_t { return dy * hardswish_grad(v); });
  });
  return out;
}

at::Tensor hardsigmoid_forward_cuda(const at::Tensor& x) {
  at::Tensor out = prepare(x);
  const c10::cuda::CUDAGuard guard(x.device());
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardsigmoid_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_map2<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(), x.numel(),
                          [] __device__(int64_t, acc_t v, acc_t) -> acc_t { return hardsigmoid(v); });
  });
  return out;
}

at::Tensor hardsigmoid_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  at::Tensor out = prepare(x);
  check_same_layout(grad, "grad", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardsigmoid_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_map2<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                          out.mutable_data_ptr<scalar_t>(), x.numel(),
                          [] __device__(int64_t, acc_t dy, acc_t v) -> acc_t { return dy * hardsigmoid_grad(v); });
  });
  return out;
}

void check_gate(const at::Tensor& x, const at::Tensor& g) {
  check_floating(x, "x");
  TORCH_CHECK(g.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == x.size(1) && g.is_contiguous(),
              "g must be a contiguous [N, C] = [", x.size(0), ", ", x.size(1), "] tensor, got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "g must have the dtype of x (", x.scalar_type(), "), got ",
              g.scalar_type());
  TORCH_CHECK(g.device() == x.device(), "g must be on the device of x");
}

// Index of the gate that multiplies flat element i of x, the flat index of its (image, channel).
// ATen's IntDivider divides by multiply-shift for index_t = uint32_t (tensors below 2^31 values) and
// plainly for uint64_t: two 64-bit divisions per value would bound this memory-bound map by integer
// throughput.
template <typename index_t>
struct GateIndex {
  at::cuda::detail::IntDivider<index_t> by_c, by_hw;
  index_t C;
  bool channels_last;

  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    if (!channels_last) return by_hw.div(static_cast<index_t>(i));
    const auto pixel = by_c.divmod(static_cast<index_t>(i));  // (image * HW + pixel, channel)
    return by_hw.div(pixel.div) * C + pixel.mod;
  }
};

template <typename scalar_t, typename index_t>
void gate_forward(const at::Tensor& x, const at::Tensor& g, bool channels_last, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t C = x.size(1);
  const GateIndex<index_t> gi{C, static_cast<index_t>(x.size(2) * x.size(3)), C, channels_last};
  const scalar_t* pg = g.const_data_ptr<scalar_t>();
  launch_map2<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(), x.numel(),
                        [=] __device__(int64_t i, acc_t v, acc_t) -> acc_t {
                          return v * hardsigmoid(static_cast<acc_t>(pg[gi(i)]));
                        });
}

at::Tensor hardsigmoid_gate_forward_cuda(const at::Tensor& x, const at::Tensor& g) {
  const bool channels_last = is_channels_last_4d(x, "x");
  check_gate(x, g);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;  // IntDivider needs positive divisors
  const c10::cuda::CUDAGuard guard(x.device());
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardsigmoid_gate_forward_cuda", [&] {
    if (x.numel() <= std::numeric_limits<int32_t>::max()) {
      gate_forward<scalar_t, uint32_t>(x, g, channels_last, out);
    } else {
      gate_forward<scalar_t, uint64_t>(x, g, channels_last, out);
    }
  });
  return out;
}

// NCHW: one warp per (n, c) plane; dx and the plane's dot(dy, x) in one pass.
template <typename scalar_t>
__global__ void gate_backward_nchw_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                                          scalar_t* __restrict__ dg, int64_t planes, int64_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
  for (int64_t nc = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; nc < planes; nc += warps) {
    const acc_t gv = static_cast<acc_t>(g[nc]);
    const acc_t s = hardsigmoid(gv);
    acc_t sum = 0;
    for (int64_t i = nc * HW + lane; i < (nc + 1) * HW; i += 32) {
      const acc_t d = static_cast<acc_t>(dy[i]);
      sum += d * static_cast<acc_t>(x[i]);
      dx[i] = static_cast<scalar_t>(d * s);
    }
    sum = cuda::warp_sum(sum);
    if (lane == 0) dg[nc] = static_cast<scalar_t>(sum * hardsigmoid_grad(gv));
  }
}

// channels_last: block (32 channels x 8 pixel lanes) per (image, channel tile); threads along C
// read consecutive addresses, the 8 pixel lanes are reduced in shared memory.
template <typename scalar_t>
__global__ void gate_backward_nhwc_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                                          scalar_t* __restrict__ dg, int64_t C, int64_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[8][32];
  const int64_t n = blockIdx.y;
  const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
  acc_t sum = 0;
  if (c < C) {
    const acc_t gv = static_cast<acc_t>(g[n * C + c]);
    const acc_t s = hardsigmoid(gv);
    for (int64_t p = threadIdx.y; p < HW; p += 8) {
      const int64_t i = (n * HW + p) * C + c;
      const acc_t d = static_cast<acc_t>(dy[i]);
      sum += d * static_cast<acc_t>(x[i]);
      dx[i] = static_cast<scalar_t>(d * s);
    }
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t total = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += partial[k][threadIdx.x];
    dg[n * C + c] = static_cast<scalar_t>(total * hardsigmoid_grad(static_cast<acc_t>(g[n * C + c])));
  }
}

std::tuple<at::Tensor, at::Tensor> hardsigmoid_gate_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& g) {
  const bool channels_last = is_channels_last_4d(x, "x");
  check_gate(x, g);
  check_same_layout(grad, "grad", x, "x");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dg = at::empty_like(g);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.numel() == 0) return {dx, dg.zero_()};
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardsigmoid_gate_backward_cuda", [&] {
    const auto *pdy = grad.const_data_ptr<scalar_t>(), *px = x.const_data_ptr<scalar_t>(),
               *pg = g.const_data_ptr<scalar_t>();
    auto *pdx = dx.mutable_data_ptr<scalar_t>(), *pdg = dg.mutable_data_ptr<scalar_t>();
    if (!channels_last) {
      const int warps_per_block = cuda::kThreads / 32;
      const int64_t blocks = std::min<int64_t>((N * C + warps_per_block - 1) / warps_per_block, 65535LL * 8);
      gate_backward_nchw_kernel<scalar_t><<<blocks, cuda::kThreads, 0, stream>>>(pdy, px, pg, pdx, pdg, N * C, HW);
    } else {
      TORCH_CHECK(N <= 65535, "hardsigmoid_gate_backward: channels_last with N > 65535 is not supported");
      const dim3 grid((C + 31) / 32, N), block(32, 8);
      gate_backward_nhwc_kernel<scalar_t><<<grid, block, 0, stream>>>(pdy, px, pg, pdx, pdg, C, HW);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dg};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks_ext, CUDA, m) {
  m.impl("hardswish_forward", &hardswish_forward_cuda);
  m.impl("hardswish_backward", &hardswish_backward_cuda);
  m.impl("hardsigmoid_forward", &hardsigmoid_forward_cuda);
  m.impl("hardsigmoid_backward", &hardsigmoid_backward_cuda);
  m.impl("hardsigmoid_gate_forward", &hardsigmoid_gate_forward_cuda);
  m.impl("hardsigmoid_gate_backward", &hardsigmoid_gate_backward_cuda);
}

}  // namespace fastblocks
