// Fused squeeze-and-excitation: CUDA. Two memory-bound passes over the [N, C, H, W] tensors (a
// per-plane reduction, a per-plane affine gate) with the [N, C] excitation between them as ATen ops
// (cuBLAS matmuls of a few MFLOP, shared with the CPU code). See squeeze_excite.cpp for the math and
// the schemas.
#include <array>

#include "cuda_utils.cuh"

#include <ATen/cuda/detail/IntegerDivider.cuh>  // after ATen's CUDA headers: it relies on their macros

namespace fastblocks {

// Defined in squeeze_excite.cpp (same extension): argument checks, and the [N, C] excitation as ATen ops.
using SqueezeExciteWeights = std::array<at::Tensor, 4>;
SqueezeExciteWeights squeeze_excite_check_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                               const at::Tensor& w2, const at::Tensor& b2, int64_t activation);
std::array<at::Tensor, 4> squeeze_excite_excitation(const at::Tensor& pooled, const SqueezeExciteWeights& w,
                                                    int64_t activation, bool hard_sigmoid);
std::array<at::Tensor, 5> squeeze_excite_excitation_backward(const at::Tensor& pooled, const at::Tensor& dyx,
                                                             const SqueezeExciteWeights& w, int64_t activation,
                                                             bool hard_sigmoid, int64_t HW);
std::array<at::Tensor, 4> squeeze_excite_weight_grads(const at::Tensor& pooled, const at::Tensor& a,
                                                      const at::Tensor& dz, const at::Tensor& dh, const at::Tensor& w1,
                                                      const at::Tensor& b1, const at::Tensor& w2,
                                                      const at::Tensor& b2);

namespace {

constexpr int kUnroll = 4;   // independent loads in flight per thread in the reductions
constexpr int kPixelRows = 8;  // channels_last reduction: blockDim.y

// NCHW: one warp per (n, c) plane: mean[nc] = mean_hw x and, with DY, dyx[nc] = sum_hw dy * x.
template <typename scalar_t, bool DY>
__global__ void pool_nchw_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                 at::opmath_type<scalar_t>* __restrict__ mean, at::opmath_type<scalar_t>* __restrict__ dyx,
                                 int64_t planes, int64_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
  for (int64_t nc = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; nc < planes; nc += warps) {
    const scalar_t* xp = x + nc * HW;
    const scalar_t* dp = DY ? dy + nc * HW : nullptr;
    acc_t sx = 0, sd = 0;
    for (int64_t i0 = lane; i0 < HW; i0 += 32 * kUnroll) {
      acc_t vx[kUnroll], vd[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t i = i0 + 32 * k;
        vx[k] = i < HW ? static_cast<acc_t>(xp[i]) : acc_t(0);
        if (DY) vd[k] = i < HW ? static_cast<acc_t>(dp[i]) : acc_t(0);
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        sx += vx[k];
        if (DY) sd += vd[k] * vx[k];
      }
    }
    sx = cuda::warp_sum(sx);
    if (DY) sd = cuda::warp_sum(sd);
    if (lane == 0) {
      mean[nc] = sx / static_cast<acc_t>(HW);
      if (DY) dyx[nc] = sd;
    }
  }
}

// channels_last: block (32 channels x kPixelRows pixel rows) per (image, pixel chunk, channel tile);
// threads along C read consecutive addresses. Writes the chunk's share of the mean (and of
// sum dy * x) to part[(n * split + chunk) * C + c]; the chunks are summed afterwards.
template <typename scalar_t, bool DY>
__global__ void pool_nhwc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                 at::opmath_type<scalar_t>* __restrict__ mean_part,
                                 at::opmath_type<scalar_t>* __restrict__ dyx_part, int64_t C, int64_t HW,
                                 int64_t chunk, int64_t split) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared_x[kPixelRows][32];
  __shared__ acc_t shared_d[kPixelRows][32];
  const int64_t n = blockIdx.x / split, part = blockIdx.x % split;
  const int64_t c = (int64_t)blockIdx.y * 32 + threadIdx.x;
  const int64_t p_end = min(HW, (part + 1) * chunk);
  acc_t sx = 0, sd = 0;
  if (c < C) {
#pragma unroll 4
    for (int64_t p = part * chunk + threadIdx.y; p < p_end; p += kPixelRows) {
      const int64_t i = (n * HW + p) * C + c;
      const acc_t v = static_cast<acc_t>(x[i]);
      sx += v;
      if (DY) sd += static_cast<acc_t>(dy[i]) * v;
    }
  }
  shared_x[threadIdx.y][threadIdx.x] = sx;
  shared_d[threadIdx.y][threadIdx.x] = sd;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t tx = 0, td = 0;
#pragma unroll
    for (int k = 0; k < kPixelRows; ++k) {
      tx += shared_x[k][threadIdx.x];
      td += shared_d[k][threadIdx.x];
    }
    const int64_t out = (n * split + part) * C + c;
    mean_part[out] = tx / static_cast<acc_t>(HW);
    if (DY) dyx_part[out] = td;
  }
}

// (mean_hw x, sum_hw dy * x) as [N, C] in the accumulation dtype; the second is undefined without dy.
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> pool(const at::Tensor& x, const at::Tensor* dy, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const scalar_t* pdy = dy ? dy->const_data_ptr<scalar_t>() : nullptr;
  if (!channels_last) {
    at::Tensor mean = at::empty({N, C}, opts), dyx = dy ? at::empty({N, C}, opts) : at::Tensor();
    if (N * C > 0) {
      const int warps_per_block = cuda::kThreads / 32;
      const int64_t blocks = std::min<int64_t>((N * C + warps_per_block - 1) / warps_per_block, 65535LL * 8);
      acc_t* pm = mean.mutable_data_ptr<acc_t>();
      if (dy) {
        pool_nchw_kernel<scalar_t, true><<<blocks, cuda::kThreads, 0, stream>>>(px, pdy, pm, dyx.mutable_data_ptr<acc_t>(),
                                                                               N * C, HW);
      } else {
        pool_nchw_kernel<scalar_t, false><<<blocks, cuda::kThreads, 0, stream>>>(px, nullptr, pm, nullptr, N * C, HW);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return {mean, dyx};
  }
  // Split the pixels into chunks when images x channel tiles cannot fill the GPU (about 8 blocks of
  // 256 threads per SM), keeping at least 64 pixels per chunk; chunks are summed by aten below
  // (deterministic, unlike atomics).
  const int64_t tiles = (C + 31) / 32;
  TORCH_CHECK(tiles <= 65535, "squeeze_excite: channels_last x with C > ", 65535 * 32, " is not supported");
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t split = std::max<int64_t>(1, std::min<int64_t>((8 * sms + N * tiles - 1) / std::max<int64_t>(N * tiles, 1),
                                                         (HW + 63) / 64));
  const int64_t chunk = (HW + split - 1) / split;
  split = (HW + chunk - 1) / chunk;
  at::Tensor mean = at::empty({N, split, C}, opts), dyx = dy ? at::empty({N, split, C}, opts) : at::Tensor();
  if (N * C > 0) {
    const dim3 grid(N * split, tiles), block(32, kPixelRows);
    acc_t* pm = mean.mutable_data_ptr<acc_t>();
    if (dy) {
      pool_nhwc_kernel<scalar_t, true><<<grid, block, 0, stream>>>(px, pdy, pm, dyx.mutable_data_ptr<acc_t>(), C, HW,
                                                                   chunk, split);
    } else {
      pool_nhwc_kernel<scalar_t, false><<<grid, block, 0, stream>>>(px, nullptr, pm, nullptr, C, HW, chunk, split);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto total = [&](const at::Tensor& t) { return split == 1 ? t.view({N, C}) : t.sum(1); };
  return {total(mean), dy ? total(dyx) : at::Tensor()};
}

// out = in * scale[n, c] (+ shift[n, c]) with 16-byte vector loads (cuda::launch_map2). index_t is
// 32-bit when the tensor allows it, so that the channel lookup divides by multiply-shift.
template <typename scalar_t, typename index_t>
void launch_gate(const at::Tensor& in, const at::Tensor& scale, const at::Tensor* shift, at::Tensor& out,
                 bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t C = in.size(1);
  const at::cuda::detail::IntDivider<index_t> div_hw(in.size(2) * in.size(3)), div_c(C);
  const acc_t* ps = scale.const_data_ptr<acc_t>();
  const acc_t* pt = shift ? shift->const_data_ptr<acc_t>() : nullptr;
  cuda::launch_map2<scalar_t>(in.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(), in.numel(),
                              [=] __device__(int64_t i, acc_t v, acc_t) -> acc_t {
                                index_t g;  // flat index of (n, c) in the [N, C] operands
                                if (channels_last) {
                                  const auto pixel = div_c.divmod(static_cast<index_t>(i));
                                  g = div_hw.div(pixel.div) * C + pixel.mod;
                                } else {
                                  g = div_hw.div(static_cast<index_t>(i));
                                }
                                return pt == nullptr ? v * ps[g] : v * ps[g] + pt[g];
                              });
}

template <typename scalar_t>
void gate(const at::Tensor& in, const at::Tensor& scale, const at::Tensor* shift, at::Tensor& out,
          bool channels_last) {
  if (in.numel() == 0) return;  // IntDivider needs a positive divisor
  if (in.numel() <= std::numeric_limits<int32_t>::max()) {
    launch_gate<scalar_t, uint32_t>(in, scale, shift, out, channels_last);
  } else {
    launch_gate<scalar_t, uint64_t>(in, scale, shift, out, channels_last);
  }
}

at::Tensor squeeze_excite_forward_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                       const at::Tensor& w2, const at::Tensor& b2, int64_t activation,
                                       bool hard_sigmoid) {
  const SqueezeExciteWeights w = squeeze_excite_check_args(x, w1, b1, w2, b2, activation);
  const bool channels_last = is_channels_last_4d(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squeeze_excite_forward_cuda", [&] {
    const at::Tensor pooled = pool<scalar_t>(x, nullptr, channels_last).first;
    gate<scalar_t>(x, squeeze_excite_excitation(pooled, w, activation, hard_sigmoid)[3], nullptr, y, channels_last);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> squeeze_excite_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, int64_t activation, bool hard_sigmoid) {
  const SqueezeExciteWeights w = squeeze_excite_check_args(x, w1, b1, w2, b2, activation);
  const bool channels_last = is_channels_last_4d(x, "x");
  check_same_layout(grad, "grad", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x), pooled, dyx;
  std::array<at::Tensor, 5> e;  // {s, shift, a, dz, dh}
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squeeze_excite_backward_cuda", [&] {
    std::tie(pooled, dyx) = pool<scalar_t>(x, &grad, channels_last);
    e = squeeze_excite_excitation_backward(pooled, dyx, w, activation, hard_sigmoid, x.size(2) * x.size(3));
    gate<scalar_t>(grad, e[0], &e[1], dx, channels_last);
  });
  const auto g = squeeze_excite_weight_grads(pooled, e[2], e[3], e[4], w1, b1, w2, b2);
  return {dx, g[0], g[1], g[2], g[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks_ext, CUDA, m) {
  m.impl("squeeze_excite_forward", &squeeze_excite_forward_cuda);
  m.impl("squeeze_excite_backward", &squeeze_excite_backward_cuda);
}

}  // namespace fastblocks
