// Fused BatchNorm + activation over a tensor or a channel slice of a block buffer: CUDA kernels. Same
// contract as the CPU kernels in bn_act.cpp; the layout (Geometry) is in bn_act.h.
//
// Per-channel sums run in two steps with a fixed order (deterministic, no atomics): a kernel writes
// one partial sum per (channel, split), and a one-thread-per-channel kernel adds up the splits and
// turns the totals into the pass's per-channel results (mean and variance, or the backward terms).
// The elementwise passes compute scale and shift per value from the [C] parameters (L1-resident).
// A training layer thus takes 4 + 1 launches forward (statistics, then y) and 3 backward.
#include <limits>

#include "bn_act.h"
#include "cuda_utils.cuh"

#include <ATen/cuda/detail/IntegerDivider.cuh>  // after ATen: it relies on c10's macros

namespace fastblocks {
namespace bn_act {
namespace {

using cuda::kThreads;
using cuda::warp_sum;

// NCHW: block (c, s) sums f over images s, s + S, ... of channel c; its threads walk the contiguous
// pixels of each image. partial is [K][C][S].
template <typename acc_t, int K, typename F>
__global__ void sums_nchw_kernel(Geometry g, F f, acc_t* __restrict__ partial) {
  const int64_t c = blockIdx.x, S = gridDim.y, s = blockIdx.y;
  acc_t acc[K] = {};
  for (int64_t n = s; n < g.N; n += S) {
    const int64_t xi = n * g.x_stride + c * g.HW, oi = (n * g.C + c) * g.HW;
    for (int64_t p = threadIdx.x; p < g.HW; p += blockDim.x) f(c, xi + p, oi + p, acc);
  }
  __shared__ acc_t warp_sums[K][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const acc_t v = warp_sum(acc[k]);
    if (lane == 0) warp_sums[k][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t v = warp_sum(lane < kThreads / 32 ? warp_sums[k][lane] : acc_t(0));
      if (lane == 0) partial[(k * g.C + c) * S + s] = v;
    }
  }
}

// channels_last: block (32 channels, 8 pixel lanes) per (channel tile, split); the 32 threads of a
// warp read 32 consecutive channels of one pixel. The 8 lanes are summed in shared memory.
constexpr int kTileC = 32, kLanesP = 8;

template <typename acc_t, int K, typename F>
__global__ void sums_nhwc_kernel(Geometry g, F f, acc_t* __restrict__ partial) {
  const int64_t c = (int64_t)blockIdx.x * kTileC + threadIdx.x, S = gridDim.y, s = blockIdx.y;
  acc_t acc[K] = {};
  if (c < g.C) {
    for (int64_t r = s * kLanesP + threadIdx.y; r < g.count(); r += S * kLanesP) f(c, r * g.x_stride + c, r * g.C + c, acc);
  }
  __shared__ acc_t lane_sums[K][kLanesP][kTileC];
#pragma unroll
  for (int k = 0; k < K; ++k) lane_sums[k][threadIdx.y][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && c < g.C) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t total = 0;
#pragma unroll
      for (int j = 0; j < kLanesP; ++j) total += lane_sums[k][j][threadIdx.x];
      partial[(k * g.C + c) * S + s] = total;
    }
  }
}

// finish(c, totals) per channel c, with totals[k] the sum over the S splits of partial [K][C][S] (in
// a fixed order).
template <typename acc_t, int K, typename F>
__global__ void finish_sums_kernel(const acc_t* __restrict__ partial, int64_t C, int64_t S, F finish) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t totals[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    acc_t t = 0;
    for (int64_t s = 0; s < S; ++s) t += partial[(k * C + c) * S + s];
    totals[k] = t;
  }
  finish(c, totals);
}

// finish(c, totals) with totals[k] the per-channel sum of the k-th of the K terms f(c, x_index,
// out_index, acc) adds into acc, over channel c's N * HW values.
template <typename acc_t, int K, typename F, typename Finish>
void channel_sums(const Geometry& g, const at::Tensor& x, F f, Finish finish) {
  if (g.C == 0) return;
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t wanted = 4LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;  // blocks
  auto stream = at::cuda::getCurrentCUDAStream();
  int64_t splits = 0;  // none without values: the totals are zero
  at::Tensor partial;
  if (g.count() > 0 && !g.channels_last) {
    TORCH_CHECK(g.C <= std::numeric_limits<int32_t>::max(), "bn_act: too many channels");
    splits = std::clamp<int64_t>((wanted + g.C - 1) / g.C, 1, std::min<int64_t>(g.N, 65535));
    partial = at::empty({K, g.C, splits}, opts);
    sums_nchw_kernel<acc_t, K><<<dim3(g.C, splits), kThreads, 0, stream>>>(g, f, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (g.count() > 0) {
    const int64_t tiles = (g.C + kTileC - 1) / kTileC;
    splits = std::clamp<int64_t>((wanted + tiles - 1) / tiles, 1, std::min<int64_t>((g.count() + kLanesP - 1) / kLanesP, 65535));
    partial = at::empty({K, g.C, splits}, opts);
    sums_nhwc_kernel<acc_t, K><<<dim3(tiles, splits), dim3(kTileC, kLanesP), 0, stream>>>(g, f, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const acc_t* pp = partial.defined() ? partial.const_data_ptr<acc_t>() : nullptr;
  finish_sums_kernel<acc_t, K><<<cuda::num_blocks(g.C), kThreads, 0, stream>>>(pp, g.C, splits, finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Geometry::x_index with 32-bit multiply-shift divisions (ATen's IntDivider) for tensors of fewer
// than 2^31 values: a 64-bit integer division costs ~100 instructions, and one or two per value would
// bound the elementwise kernels by integer throughput, far below the memory bandwidth they need.
struct FastGeometry {
  at::cuda::detail::IntDivider<uint32_t> by_c, by_hw;
  int64_t x_stride, HW;
  bool channels_last;

  explicit FastGeometry(const Geometry& g)
      : by_c(static_cast<uint32_t>(g.C)), by_hw(static_cast<uint32_t>(g.HW)), x_stride(g.x_stride), HW(g.HW),
        channels_last(g.channels_last) {}

  __device__ __forceinline__ int64_t x_index(uint32_t i, int64_t& c) const {
    if (channels_last) {
      const auto rc = by_c.divmod(i);  // (pixel, channel)
      c = rc.mod;
      return rc.div * x_stride + rc.mod;
    }
    const auto rp = by_hw.divmod(i);  // (image * C + channel, pixel)
    const auto nc = by_c.divmod(rp.div);
    c = nc.mod;
    return nc.div * x_stride + nc.mod * HW + rp.mod;
  }
};

// For every value: v = load(c, x_index, out_index), then apply(c, x_index, out_index, v). A thread takes
// kValuesPerThread values a block apart (each step coalesced) and issues all their loads before any
// apply: with one load in flight per thread, the bytes in flight per SM (Little's law) would hold a
// 2-byte dtype to a fraction of the memory bandwidth (ATen's elementwise kernels do the same).
constexpr int kValuesPerThread = 4;

template <typename index_t, typename Index, typename Load, typename Apply>
__global__ void for_each_value_kernel(Index geometry, index_t n, Load load, Apply apply) {
  using V = decltype(load(int64_t(), int64_t(), int64_t()));
  const index_t step = (index_t)blockDim.x * gridDim.x * kValuesPerThread;
  for (index_t base = (index_t)blockIdx.x * blockDim.x * kValuesPerThread + threadIdx.x; base < n; base += step) {
    int64_t c[kValuesPerThread], xi[kValuesPerThread];
    V v[kValuesPerThread];
#pragma unroll
    for (int u = 0; u < kValuesPerThread; ++u) {
      const index_t i = base + u * blockDim.x;
      if (i < n) {
        xi[u] = geometry.x_index(i, c[u]);
        v[u] = load(c[u], xi[u], static_cast<int64_t>(i));
      }
    }
#pragma unroll
    for (int u = 0; u < kValuesPerThread; ++u) {
      const index_t i = base + u * blockDim.x;
      if (i < n) apply(c[u], xi[u], static_cast<int64_t>(i), v[u]);
    }
  }
}

template <typename Load, typename Apply>
void for_each_value(const Geometry& g, Load load, Apply apply) {
  const int64_t n = g.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = cuda::num_blocks((n + kValuesPerThread - 1) / kValuesPerThread);
  // below 2^31 values every index a thread forms (up to n + the grid's step) stays below 2^32
  if (n <= std::numeric_limits<int32_t>::max()) {
    for_each_value_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(FastGeometry(g), static_cast<uint32_t>(n), load, apply);
  } else {
    for_each_value_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(g, n, load, apply);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& x) {
  const Geometry g = geometry(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor mean, var;
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mean = at::empty({g.C}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    var = at::empty_like(mean);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    acc_t *mu = mean.mutable_data_ptr<acc_t>(), *pv = var.mutable_data_ptr<acc_t>();
    const acc_t inv_count = g.count() > 0 ? acc_t(1) / acc_t(g.count()) : acc_t(0);
    channel_sums<acc_t, 1>(
        g, x, [=] __device__(int64_t, int64_t xi, int64_t, acc_t* acc) { acc[0] += static_cast<acc_t>(px[xi]); },
        [=] __device__(int64_t c, const acc_t* total) { mu[c] = total[0] * inv_count; });
    channel_sums<acc_t, 2>(
        g, x,
        [=] __device__(int64_t c, int64_t xi, int64_t, acc_t* acc) {
          const acc_t d = static_cast<acc_t>(px[xi]) - mu[c];
          acc[0] += d;
          acc[1] += d * d;
        },
        [=] __device__(int64_t c, const acc_t* total) {  // the first mean's rounding error, removed from both
          const acc_t shift = total[0] * inv_count;
          mu[c] += shift;
          pv[c] = std::max(total[1] * inv_count - shift * shift, acc_t(0));
        });
  });
  return {mean, var};
}

// The per-channel [C] inputs of the elementwise passes.
template <typename acc_t>
struct ChannelParams {
  const acc_t *mean, *invstd, *weight, *bias;

  ChannelParams(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias)
      : mean(mean.const_data_ptr<acc_t>()), invstd(invstd.const_data_ptr<acc_t>()),
        weight(weight.const_data_ptr<acc_t>()), bias(bias.const_data_ptr<acc_t>()) {}

  __device__ __forceinline__ void affine(int64_t c, acc_t& scale, acc_t& shift) const {
    channel_affine(mean[c], invstd[c], weight[c], bias[c], scale, shift);
  }
};

// y = act(x * scale + shift) for one activation; a named function template because nvcc allows no
// extended (__device__) lambda inside the generic lambda that dispatches the activation.
template <int ACT, typename scalar_t>
void forward_act(const Geometry& g, const at::Tensor& x, const ChannelParams<at::opmath_type<scalar_t>>& p,
                 at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  scalar_t* py = y.mutable_data_ptr<scalar_t>();
  for_each_value(
      g, [=] __device__(int64_t, int64_t xi, int64_t) { return px[xi]; },
      [=] __device__(int64_t c, int64_t, int64_t oi, scalar_t xv) {
        acc_t scale, shift;
        p.affine(c, scale, shift);
        py[oi] = static_cast<scalar_t>(activate<ACT>(static_cast<acc_t>(xv) * scale + shift));
      });
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                        const at::Tensor& bias, int64_t activation) {
  const Geometry g = geometry(x);
  check_channel_params(x, {{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&bias, "bias"}});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = empty_out(x, g);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_forward_cuda", [&] {
    const ChannelParams<at::opmath_type<scalar_t>> p(mean, invstd, weight, bias);
    with_activation(activation, [&](auto act) { forward_act<decltype(act)::value, scalar_t>(g, x, p, y); });
  });
  return y;
}

// What the dx pass loads for one value: x, dy and, when accumulating, dx's old value.
template <typename T>
struct DxInputs {
  T x, dy, old;
};

// dweight and dbias for one activation, with g = dy * act'(u) and u recomputed from x; dx is stored
// into `out` at the dense output index, or with `accumulate` added into `out` at x's index (out laid
// out like x). One thread per value: no two threads touch one element.
template <int ACT, typename scalar_t>
BackwardTerms backward_act(const Geometry& g, const at::Tensor& grad, const at::Tensor& x,
                           const ChannelParams<at::opmath_type<scalar_t>>& p, bool batch_stats, at::Tensor& out,
                           bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *px = x.const_data_ptr<scalar_t>(), *pdy = grad.const_data_ptr<scalar_t>();
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  BackwardTerms terms{at::empty({g.C}, opts), at::empty({g.C}, opts)};
  const at::Tensor ab = at::empty({2, g.C}, opts);  // the batch-statistics terms a, b
  acc_t *dweight = terms.dweight.mutable_data_ptr<acc_t>(), *dbias = terms.dbias.mutable_data_ptr<acc_t>();
  acc_t *a = ab.mutable_data_ptr<acc_t>(), *b = a + g.C;
  const int64_t count = g.count();
  channel_sums<acc_t, 2>(
      g, x,
      [=] __device__(int64_t c, int64_t xi, int64_t oi, acc_t* acc) {
        acc_t scale, shift;
        p.affine(c, scale, shift);
        const acc_t xv = static_cast<acc_t>(px[xi]);
        const acc_t d = static_cast<acc_t>(pdy[oi]) * activate_grad<ACT>(xv * scale + shift);
        acc[0] += d;
        acc[1] += d * (xv - p.mean[c]);
      },
      [=] __device__(int64_t c, const acc_t* total) {
        backward_terms(total[0], total[1], p.invstd[c], count, batch_stats, dweight[c], dbias[c], a[c], b[c]);
      });
  scalar_t* po = out.mutable_data_ptr<scalar_t>();
  for_each_value(
      g,
      [=] __device__(int64_t, int64_t xi, int64_t oi) {
        return DxInputs<scalar_t>{px[xi], pdy[oi], accumulate ? po[xi] : scalar_t(0)};
      },
      [=] __device__(int64_t c, int64_t xi, int64_t oi, const DxInputs<scalar_t>& v) {
        acc_t scale, shift;
        p.affine(c, scale, shift);
        const acc_t xv = static_cast<acc_t>(v.x);
        const acc_t d = static_cast<acc_t>(v.dy) * activate_grad<ACT>(xv * scale + shift);
        const acc_t dx = scale * (d - a[c] - (xv - p.mean[c]) * b[c]);
        if (accumulate) {
          po[xi] = static_cast<scalar_t>(static_cast<acc_t>(v.old) + dx);
        } else {
          po[oi] = static_cast<scalar_t>(dx);
        }
      });
  return terms;
}

// The CUDA BackwardImpl (bn_act.h).
BackwardTerms backward_cuda_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                 bool batch_stats, int64_t activation, at::Tensor& out, bool accumulate) {
  const Geometry g = geometry(x);
  check_grad(grad, x, g);
  check_channel_params(x, {{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&bias, "bias"}});
  const c10::cuda::CUDAGuard guard(x.device());
  BackwardTerms terms;
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_cuda", [&] {
    const ChannelParams<at::opmath_type<scalar_t>> p(mean, invstd, weight, bias);
    with_activation(activation, [&](auto act) {
      terms = backward_act<decltype(act)::value, scalar_t>(g, grad, x, p, batch_stats, out, accumulate);
    });
  });
  return terms;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks_ext, CUDA, m) {
  m.impl("bn_act_stats", &stats_cuda);
  m.impl("bn_act_forward", &forward_cuda);
  m.impl("bn_act_backward", &backward_op<backward_cuda_impl>);
  m.impl("bn_act_backward_into", &backward_into_op<backward_cuda_impl>);
}

}  // namespace bn_act
}  // namespace fastblocks
