// The shift operation: CUDA kernels (forward and adjoint are one kernel, see shift.h).
//
// Each thread produces 16 bytes of output (VEC elements) along the contiguous axis: a run of output
// columns of one (n, c, i) row for NCHW, a run of channels of one pixel for channels_last. The
// index decomposition (fast 32-bit IntDivider where sizes allow) is paid once per run; the VEC
// loads are independent (memory-level parallelism) and hit the same lines of L1 across the warp;
// the store is one 16-byte vector store when the runs are aligned.
#include "cuda_utils.cuh"
#include "shift.h"

#include <ATen/cuda/detail/IntegerDivider.cuh>  // after the ATen headers it relies on

namespace fastblocks {
namespace {

using at::cuda::detail::IntDivider;
using shift::Params;

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_run(scalar_t* o, const cuda::Vec<scalar_t, VEC>& v, int64_t count,
                                          bool aligned) {
  if (aligned && count >= VEC) {
    *reinterpret_cast<cuda::Vec<scalar_t, VEC>*>(o) = v;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (k < count) o[k] = v.v[k];
  }
}

// NCHW: run w covers output columns [j0, j0 + VEC) of row (n, c, i).
template <typename scalar_t, int VEC, typename U>
__global__ void shift_nchw_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, Params p,
                                  shift::Taps<IntDivider<U>> taps, IntDivider<U> runs_per_row,
                                  IntDivider<U> h_out, IntDivider<U> channels, U n_runs) {
  const bool aligned = p.w_out % VEC == 0;  // then every run starts 16-byte aligned
  for (U w = U(blockIdx.x) * blockDim.x + threadIdx.x; w < n_runs; w += U(blockDim.x) * gridDim.x) {
    const U row = runs_per_row.div(w);
    const int64_t j0 = static_cast<int64_t>(w - row * runs_per_row.divisor) * VEC;
    const U nc = h_out.div(row);
    const int64_t i = row - nc * h_out.divisor;
    int64_t dy, dx;
    taps.offset(channels.mod(nc), dy, dx);
    const int64_t sy = shift::source(i, dy, p.mul, p.div, p.h_in);
    const scalar_t* src = in + (static_cast<int64_t>(nc) * p.h_in + (sy < 0 ? 0 : sy)) * p.w_in;
    cuda::Vec<scalar_t, VEC> v;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t sx = shift::source(j0 + k, dx, p.mul, p.div, p.w_in);
      v.v[k] = (sy >= 0 && sx >= 0 && j0 + k < p.w_out) ? src[sx] : scalar_t(0);
    }
    store_run<scalar_t, VEC>(out + static_cast<int64_t>(row) * p.w_out + j0, v, p.w_out - j0, aligned);
  }
}

// channels_last: run w covers channels [c0, c0 + VEC) of output pixel (n, i, j).
template <typename scalar_t, int VEC, typename U>
__global__ void shift_nhwc_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, Params p,
                                  shift::Taps<IntDivider<U>> taps, IntDivider<U> runs_per_pixel,
                                  IntDivider<U> w_out, IntDivider<U> h_out, U n_runs) {
  const bool aligned = p.C % VEC == 0;
  for (U w = U(blockIdx.x) * blockDim.x + threadIdx.x; w < n_runs; w += U(blockDim.x) * gridDim.x) {
    const U pixel = runs_per_pixel.div(w);
    const int64_t c0 = static_cast<int64_t>(w - pixel * runs_per_pixel.divisor) * VEC;
    const U nh = w_out.div(pixel);
    const int64_t j = pixel - nh * w_out.divisor;
    const U n = h_out.div(nh);
    const int64_t i = nh - n * h_out.divisor;
    const scalar_t* img = in + static_cast<int64_t>(n) * p.h_in * p.w_in * p.C;
    cuda::Vec<scalar_t, VEC> v;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = c0 + k;
      v.v[k] = scalar_t(0);
      if (c < p.C) {
        int64_t dy, dx;
        taps.offset(static_cast<U>(c), dy, dx);
        const int64_t sy = shift::source(i, dy, p.mul, p.div, p.h_in);
        const int64_t sx = shift::source(j, dx, p.mul, p.div, p.w_in);
        if (sy >= 0 && sx >= 0) v.v[k] = img[(sy * p.w_in + sx) * p.C + c];
      }
    }
    store_run<scalar_t, VEC>(out + static_cast<int64_t>(pixel) * p.C + c0, v, p.C - c0, aligned);
  }
}

template <typename scalar_t, typename U>
void launch(const at::Tensor& in, const shift::Prepared& job, int64_t kernel_size, int64_t dilation, bool forward) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const Params& p = job.p;
  const auto taps = shift::make_taps<IntDivider<U>>(p.C, kernel_size, dilation, forward);
  const scalar_t* src = in.const_data_ptr<scalar_t>();
  scalar_t* dst = job.out.mutable_data_ptr<scalar_t>();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (job.channels_last) {
    const int64_t runs_per_pixel = (p.C + VEC - 1) / VEC;
    const int64_t n_runs = p.N * p.h_out * p.w_out * runs_per_pixel;
    shift_nhwc_kernel<scalar_t, VEC, U><<<cuda::num_blocks(n_runs), cuda::kThreads, 0, stream>>>(
        src, dst, p, taps, IntDivider<U>(runs_per_pixel), IntDivider<U>(p.w_out), IntDivider<U>(p.h_out),
        static_cast<U>(n_runs));
  } else {
    const int64_t runs_per_row = (p.w_out + VEC - 1) / VEC;
    const int64_t n_runs = p.N * p.C * p.h_out * runs_per_row;
    shift_nchw_kernel<scalar_t, VEC, U><<<cuda::num_blocks(n_runs), cuda::kThreads, 0, stream>>>(
        src, dst, p, taps, IntDivider<U>(runs_per_row), IntDivider<U>(p.h_out), IntDivider<U>(p.C),
        static_cast<U>(n_runs));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor shift_cuda(const at::Tensor& in, int64_t kernel_size, int64_t dilation, int64_t stride, bool forward,
                      int64_t height = 0, int64_t width = 0) {
  const shift::Prepared job = shift::prepare(in, kernel_size, dilation, stride, forward, height, width);
  if (job.out.numel() == 0) return job.out;
  const c10::cuda::CUDAGuard guard(in.device());
  // 32-bit index decomposition when every index, and the grid-stride loop's last step, fits.
  const int64_t max_threads = 65535LL * 8 * cuda::kThreads;
  const bool small = std::max(in.numel(), job.out.numel()) + max_threads < std::numeric_limits<int32_t>::max();
  FB_DISPATCH_FLOATING_TYPES(in.scalar_type(), "shift_cuda", [&] {
    if (small) {
      launch<scalar_t, uint32_t>(in, job, kernel_size, dilation, forward);
    } else {
      launch<scalar_t, uint64_t>(in, job, kernel_size, dilation, forward);
    }
  });
  return job.out;
}

at::Tensor shift_forward_cuda(const at::Tensor& x, int64_t kernel_size, int64_t dilation, int64_t stride) {
  return shift_cuda(x, kernel_size, dilation, stride, /*forward=*/true);
}

at::Tensor shift_backward_cuda(const at::Tensor& grad, int64_t kernel_size, int64_t dilation, int64_t stride,
                               int64_t height, int64_t width) {
  return shift_cuda(grad, kernel_size, dilation, stride, /*forward=*/false, height, width);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks_ext, CUDA, m) {
  m.impl("shift_forward", &shift_forward_cuda);
  m.impl("shift_backward", &shift_backward_cuda);
}

}  // namespace fastblocks
