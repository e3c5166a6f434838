// Depthwise conv + per-channel affine + activation: CUDA kernels (see dwconv_bn_act.cpp for the
// four raw kernels and their math). All of them are memory-bound; the design keeps every global
// access coalesced and reads each input once per pass, relying on L1/L2 for the K*K tap reuse:
//  - elementwise passes (forward, dx): one thread per output (input) element in memory order, so
//    consecutive threads touch consecutive addresses in both layouts (W for NCHW, C for NHWC);
//  - reductions (stats, grad_stats, dz + dw): a block of TC channel lanes x TP pixel lanes per
//    (channel tile, image, pixel split): TC = 32, TP = 8 for channels_last (a warp reads 32
//    consecutive channels), TC = 1, TP = 256 for NCHW (a warp reads 32 consecutive pixels). Each
//    thread accumulates in registers, the block combines its TP lanes in shared memory and writes
//    one partial row per (image, split); the host side finishes with a [P, C] reduction.
// The kernels read the filter tap-major, [K * K, C] (`taps_major`): a warp's 32 consecutive channels
// then read one 128-byte line per tap. In the [C, K * K] layout of the parameter, 32 channels K * K
// values apart touched K * K lines per tap, and those loads, not the input's, bound the forward pass
// on an H100 (first measurement: 160 GB/s for bf16 channels_last).
#include <algorithm>
#include <limits>

#include "activations.h"
#include "cuda_utils.cuh"
#include "dwconv_bn_act/dwconv_bn_act.h"

#include <ATen/cuda/detail/IntegerDivider.cuh>  // after ATen: it relies on c10's macros

namespace fastblocks {
namespace {

using dwconv::DWGeometry;
using cuda::kThreads;

template <typename F>
void dispatch_kernel_size(int64_t K, F&& f) {
  switch (K) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: TORCH_CHECK(false, "the depthwise kernels support kernel sizes 3, 5 and 7, got ", K);
  }
}

// Offsets of plane (n, c) and element strides along H and W of an [N, C, h, w] tensor in g's layout,
// in offset_t: 32-bit (uint32_t) in the elementwise passes over tensors below 2^31 values, which
// halves the integer work of the K * K taps.
template <typename offset_t>
struct PlaneIndex {
  offset_t base, sh, sw;
  __device__ __forceinline__ PlaneIndex(const DWGeometry& g, offset_t n, offset_t c, int64_t h, int64_t w)
      : base(g.channels_last ? (n * static_cast<offset_t>(h * w) * static_cast<offset_t>(g.C) + c)
                             : (n * static_cast<offset_t>(g.C) + c) * static_cast<offset_t>(h * w)),
        sh(static_cast<offset_t>(g.channels_last ? w * g.C : w)),
        sw(static_cast<offset_t>(g.channels_last ? g.C : 1)) {}
  // i, j >= 0 (callers check the bounds first)
  __device__ __forceinline__ offset_t operator()(int i, int j) const {
    return base + static_cast<offset_t>(i) * sh + static_cast<offset_t>(j) * sw;
  }
};

// (n, c, i, j) of flat element `idx` of an [N, C, h, w] tensor in g's memory order. ATen's IntDivider
// divides by multiply-shift for index_t = uint32_t (tensors below 2^31 values) and plainly for
// uint64_t: the three 64-bit divisions per element this took before cost more instructions than the
// element's K * K taps.
template <typename index_t>
struct Decoder {
  at::cuda::detail::IntDivider<index_t> by_c, by_h, by_w;
  bool channels_last;

  Decoder(const DWGeometry& g, int64_t h, int64_t w)
      : by_c(static_cast<index_t>(g.C)), by_h(static_cast<index_t>(h)), by_w(static_cast<index_t>(w)),
        channels_last(g.channels_last) {}

  __device__ __forceinline__ void operator()(index_t idx, index_t& n, index_t& c, index_t& i, index_t& j) const {
    if (channels_last) {
      const auto cj = by_c.divmod(idx), ji = by_w.divmod(cj.div), in = by_h.divmod(ji.div);
      c = cj.mod, j = ji.mod, i = in.mod, n = in.div;
    } else {
      const auto ji = by_w.divmod(idx), ic = by_h.divmod(ji.div), cn = by_c.divmod(ic.div);
      j = ji.mod, i = ic.mod, c = cn.mod, n = cn.div;
    }
  }
};

// Calls launch(index_t{}) with the narrowest index type for `total` elements.
template <typename F>
void with_index_type(int64_t total, F&& launch) {
  if (total <= std::numeric_limits<int32_t>::max()) {  // then idx + grid stride < 2^32: no wrap-around
    launch(uint32_t{});
  } else {
    launch(uint64_t{});
  }
}

// The output row (column) that input row (column) t + padding - tap offset reads from with stride
// s: t / s when t is a multiple of s in [0, s * limit), else -1. 32-bit, and no division for the
// strides 1 and 2 of every real network (64-bit divisions per tap dominated the dx pass).
__device__ __forceinline__ int source_row(int t, int s, int limit) {
  if (t < 0) return -1;
  const int q = s == 1 ? t : s == 2 ? ((t & 1) ? -1 : t >> 1) : (t % s ? -1 : t / s);
  return q < limit ? q : -1;
}

// z = conv(x, w)[n, c, oh, ow] with wc = the tap-major filter + c; also returns the K*K taps (zero in
// the padding) when `taps` is given.
// Spatial sizes, strides, padding and dilation are far below 2^31: 32-bit tap arithmetic.
template <int K, typename scalar_t, typename acc_t, typename offset_t>
__device__ __forceinline__ acc_t conv_at(const scalar_t* __restrict__ x, const acc_t* __restrict__ wc,
                                         const DWGeometry& g, const PlaneIndex<offset_t>& xi, int oh, int ow,
                                         acc_t* taps = nullptr) {
  const int H = g.H, W = g.W, C = g.C;
  const int ih0 = oh * static_cast<int>(g.sh) - static_cast<int>(g.ph);
  const int iw0 = ow * static_cast<int>(g.sw) - static_cast<int>(g.pw);
  acc_t z = 0;
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const int ih = ih0 + kh * static_cast<int>(g.dh);
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int iw = iw0 + kw * static_cast<int>(g.dw);
      const acc_t v = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? static_cast<acc_t>(x[xi(ih, iw)]) : acc_t(0);
      if (taps != nullptr) taps[kh * K + kw] = v;
      z += wc[(kh * K + kw) * C] * v;
    }
  }
  return z;
}

// ---- reductions: block layout, pixel splits, shared-memory combination over the TP lanes ----

struct ReduceShape {
  int tc, tp;
  int64_t splits, chunk;  // pixel range [split * chunk, min(pixels, (split + 1) * chunk))
};

ReduceShape reduce_shape(const DWGeometry& g) {
  ReduceShape r;
  r.tc = g.channels_last ? 32 : 1;
  r.tp = kThreads / r.tc;
  const int64_t pixels = g.Ho * g.Wo;
  // Split the pixels only as far as it takes to give each SM ~8 blocks (and a thread at least ~16
  // pixels): every split adds a partial row per image, of C values, or C * K * K for dz's weight
  // gradient. Splitting to ~16 pixels per thread regardless of the batch made those partials of a
  // channels_last dz pass at batch 128 ([128, 96, 112, 112], K = 3) 43 MB written and read again,
  // against 308 MB of bf16 input; now ~1 MB.
  const int64_t blocks = std::max<int64_t>(1, (g.C + r.tc - 1) / r.tc * g.N);
  const int64_t wanted = 8LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t most = std::clamp<int64_t>(pixels / (r.tp * 16), 1, 65535);
  r.splits = std::clamp<int64_t>((wanted + blocks - 1) / blocks, 1, most);
  r.chunk = (pixels + r.splits - 1) / r.splits;
  TORCH_CHECK(g.N <= 65535, "dwconv_bn_act: batch size above 65535 is not supported by the CUDA kernels");
  return r;
}

dim3 reduce_grid(const DWGeometry& g, const ReduceShape& r) {
  return dim3((g.C + r.tc - 1) / r.tc, g.N, r.splits);
}

// Sums v over threadIdx.y in shared memory; the result is valid in the threads with threadIdx.y == 0.
template <typename acc_t>
__device__ acc_t block_sum_over_pixels(acc_t v, acc_t* smem) {
  const int tx = threadIdx.x, ty = threadIdx.y, tc = blockDim.x;
  smem[ty * tc + tx] = v;
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (ty < s) smem[ty * tc + tx] += smem[(ty + s) * tc + tx];
    __syncthreads();
  }
  const acc_t total = smem[tx];
  __syncthreads();  // smem is reused by the next call
  return total;
}

// Per-channel (mean, M2) of z over this block's pixels: Welford per thread, Chan's combination over
// the TP lanes. Reads x once; writes one partial row.
template <typename scalar_t, int K>
__global__ void stats_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ w,
                             at::opmath_type<scalar_t>* __restrict__ mean_out, at::opmath_type<scalar_t>* __restrict__ m2_out,
                             at::opmath_type<scalar_t>* __restrict__ count_out, DWGeometry g, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);  // [3][TP][TC]
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
  // 32-bit pixel arithmetic: a plane has far fewer than 2^31 pixels
  const int Wo = g.Wo, start = blockIdx.z * chunk, end = std::min<int64_t>(g.Ho * g.Wo, start + chunk);
  acc_t cnt = 0, mean = 0, m2 = 0;
  if (c < g.C) {
    const PlaneIndex<int64_t> xi(g, n, c, g.H, g.W);
    for (int p = start + threadIdx.y; p < end; p += blockDim.y) {
      const acc_t z = conv_at<K>(x, w + c, g, xi, p / Wo, p % Wo);
      cnt += 1;
      const acc_t d = z - mean;
      mean += d / cnt;
      m2 += d * (z - mean);
    }
  }
  const int tc = blockDim.x, tx = threadIdx.x, ty = threadIdx.y, lanes = blockDim.x * blockDim.y;
  acc_t *sc = smem, *sm = smem + lanes, *s2 = smem + 2 * lanes;
  sc[ty * tc + tx] = cnt, sm[ty * tc + tx] = mean, s2[ty * tc + tx] = m2;
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const int a = ty * tc + tx, b = (ty + s) * tc + tx;
      const acc_t na = sc[a], nb = sc[b], nt = na + nb;
      if (nb > 0) {
        const acc_t delta = sm[b] - sm[a];
        sm[a] += delta * nb / nt;
        s2[a] += s2[b] + delta * delta * na * nb / nt;
        sc[a] = nt;
      }
    }
    __syncthreads();
  }
  const int64_t row = n * gridDim.z + blockIdx.z;
  if (ty == 0 && c < g.C) {
    mean_out[row * g.C + c] = sm[tx];
    m2_out[row * g.C + c] = s2[tx];
  }
  if (ty == 0 && tx == 0 && blockIdx.x == 0) count_out[row] = static_cast<acc_t>(std::max<int64_t>(end - start, 0));
}

// Reads x; writes y = act(scale * z + shift). One thread per output element, memory order.
template <typename scalar_t, int K, int ACT, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ w,
                               const at::opmath_type<scalar_t>* __restrict__ scale,
                               const at::opmath_type<scalar_t>* __restrict__ shift, scalar_t* __restrict__ y,
                               DWGeometry g, Decoder<index_t> decode, index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (index_t)blockDim.x * gridDim.x) {
    index_t n, c, oh, ow;
    decode(idx, n, c, oh, ow);
    const acc_t z = conv_at<K>(x, w + c, g, PlaneIndex<index_t>(g, n, c, g.H, g.W), oh, ow);
    y[idx] = static_cast<scalar_t>(activate<ACT>(scale[c] * z + shift[c]));
  }
}

// Reads dy and x; writes partial sums of g = dy * act'(scale * z + shift) and g * (z - center).
template <typename scalar_t, int K, int ACT>
__global__ void grad_stats_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  const at::opmath_type<scalar_t>* __restrict__ w,
                                  const at::opmath_type<scalar_t>* __restrict__ scale,
                                  const at::opmath_type<scalar_t>* __restrict__ shift,
                                  const at::opmath_type<scalar_t>* __restrict__ center,
                                  at::opmath_type<scalar_t>* __restrict__ sum_g, at::opmath_type<scalar_t>* __restrict__ sum_gz,
                                  DWGeometry g, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
  // 32-bit pixel arithmetic: a plane has far fewer than 2^31 pixels
  const int Wo = g.Wo, start = blockIdx.z * chunk, end = std::min<int64_t>(g.Ho * g.Wo, start + chunk);
  acc_t sg = 0, sgz = 0;
  if (c < g.C) {
    const PlaneIndex<int64_t> xi(g, n, c, g.H, g.W), yi(g, n, c, g.Ho, g.Wo);
    const acc_t s = scale[c], t = shift[c], mu = center[c];
    for (int p = start + threadIdx.y; p < end; p += blockDim.y) {
      const int oh = p / Wo, ow = p % Wo;
      const acc_t z = conv_at<K>(x, w + c, g, xi, oh, ow);
      const acc_t gv = static_cast<acc_t>(dy[yi(oh, ow)]) * activate_grad<ACT>(s * z + t);
      sg += gv;
      sgz += gv * (z - mu);
    }
  }
  sg = block_sum_over_pixels(sg, smem);
  sgz = block_sum_over_pixels(sgz, smem);
  const int64_t row = n * gridDim.z + blockIdx.z;
  if (threadIdx.y == 0 && c < g.C) {
    sum_g[row * g.C + c] = sg;
    sum_gz[row * g.C + c] = sgz;
  }
}

// Reads dy and x; writes dz = scale * g + p + q * z (dy's dtype and layout) and the partial weight
// gradient sum(dz * tap) per channel and tap.
template <typename scalar_t, int K, int ACT>
__global__ void dz_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                          const at::opmath_type<scalar_t>* __restrict__ w, const at::opmath_type<scalar_t>* __restrict__ scale,
                          const at::opmath_type<scalar_t>* __restrict__ shift, const at::opmath_type<scalar_t>* __restrict__ p_,
                          const at::opmath_type<scalar_t>* __restrict__ q_, scalar_t* __restrict__ dz_out,
                          at::opmath_type<scalar_t>* __restrict__ dw_part, DWGeometry g, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
  // 32-bit pixel arithmetic: a plane has far fewer than 2^31 pixels
  const int Wo = g.Wo, start = blockIdx.z * chunk, end = std::min<int64_t>(g.Ho * g.Wo, start + chunk);
  acc_t dw[K * K];
#pragma unroll
  for (int k = 0; k < K * K; ++k) dw[k] = 0;
  if (c < g.C) {
    const PlaneIndex<int64_t> xi(g, n, c, g.H, g.W), yi(g, n, c, g.Ho, g.Wo);
    const acc_t s = scale[c], t = shift[c], pc = p_[c], qc = q_[c];
    acc_t taps[K * K];
    for (int p = start + threadIdx.y; p < end; p += blockDim.y) {
      const int oh = p / Wo, ow = p % Wo;
      const acc_t z = conv_at<K>(x, w + c, g, xi, oh, ow, taps);
      const int64_t o = yi(oh, ow);
      const acc_t dz = s * static_cast<acc_t>(dy[o]) * activate_grad<ACT>(s * z + t) + pc + qc * z;
      dz_out[o] = static_cast<scalar_t>(dz);
#pragma unroll
      for (int k = 0; k < K * K; ++k) dw[k] += dz * taps[k];
    }
  }
  // Block total of each tap's dw, summed in a fixed order (deterministic, unlike shared-memory
  // atomics): NCHW blocks (TC = 1) sum each warp's 32 pixel lanes with shuffles and then the warps'
  // totals; channels_last blocks (TC = 32) sum the TP pixel lanes of a tap through a double buffer.
  const int tc = blockDim.x, tp = blockDim.y;
  acc_t* out = dw_part + ((n * gridDim.z + blockIdx.z) * g.C + c) * K * K;
  if (tc == 1) {
    const int warps = tp / 32;
#pragma unroll
    for (int k = 0; k < K * K; ++k) {
      const acc_t v = cuda::warp_sum(dw[k]);
      if (threadIdx.y % 32 == 0) smem[k * warps + threadIdx.y / 32] = v;
    }
    __syncthreads();
    for (int k = threadIdx.y; k < K * K && c < g.C; k += tp) {
      acc_t total = 0;
      for (int i = 0; i < warps; ++i) total += smem[k * warps + i];
      out[k] = total;
    }
  } else {
#pragma unroll
    for (int k = 0; k < K * K; ++k) {
      acc_t* buf = smem + (k % 2) * tp * tc;  // the other buffer is still being read for tap k - 1
      buf[threadIdx.y * tc + threadIdx.x] = dw[k];
      __syncthreads();
      if (threadIdx.y == 0 && c < g.C) {
        acc_t total = 0;
        for (int i = 0; i < tp; ++i) total += buf[i * tc + threadIdx.x];
        out[k] = total;
      }
    }
  }
}

// Reads dz; writes dx = conv_transpose(dz, w), gathered per input element (no atomics).
template <typename scalar_t, int K, typename index_t>
__global__ void dx_kernel(const scalar_t* __restrict__ dz, const at::opmath_type<scalar_t>* __restrict__ w,
                          scalar_t* __restrict__ dx, DWGeometry g, Decoder<index_t> decode, index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int sh = g.sh, sw = g.sw, Ho = g.Ho, Wo = g.Wo, C = g.C;
  for (index_t idx = (index_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (index_t)blockDim.x * gridDim.x) {
    index_t n, c, ih, iw;
    decode(idx, n, c, ih, iw);
    const PlaneIndex<index_t> yi(g, n, c, g.Ho, g.Wo);
    const int th0 = static_cast<int>(ih + g.ph), tw0 = static_cast<int>(iw + g.pw);
    acc_t acc = 0;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int oh = source_row(th0 - kh * static_cast<int>(g.dh), sh, Ho);
      if (oh < 0) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int ow = source_row(tw0 - kw * static_cast<int>(g.dw), sw, Wo);
        if (ow < 0) continue;
        acc += w[(kh * K + kw) * C + c] * static_cast<acc_t>(dz[yi(oh, ow)]);
      }
    }
    dx[idx] = static_cast<scalar_t>(acc);
  }
}

// ---- host wrappers ----

template <typename F>
void dispatch(const at::Tensor& x, int64_t K, int64_t act, const char* name, F&& f) {
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_act_cuda", [&] {
    dispatch_kernel_size(K, [&](auto k) {
      const bool known = dispatch_activation(act, [&](auto a) { f(scalar_t(), k, a); });
      TORCH_CHECK(known, name, ": unknown activation code ", act);
    });
  });
}

// Per-channel mean and biased variance from the stats kernel's partials: rows of (mean, M2 = sum of
// squared deviations from that mean) over count[row] values (Chan et al.).
std::tuple<at::Tensor, at::Tensor> combine_mean_m2(const at::Tensor& mean, const at::Tensor& m2,
                                                   const at::Tensor& count) {
  const at::Tensor total = count.sum(), weight = count.unsqueeze(1);
  const at::Tensor combined = (mean * weight).sum(0) / total;
  const at::Tensor spread = (weight * (mean - combined).square()).sum(0);
  return {combined, (m2.sum(0) + spread) / total};
}

template <typename acc_t>
const acc_t* cptr(const at::Tensor& t) {
  return t.const_data_ptr<acc_t>();
}

// The [C, 1, K, K] filter as the kernels read it: [K * K, C] (see the top of this file).
at::Tensor taps_major(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), -1}).t().contiguous();
}

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  const ReduceShape r = reduce_shape(g);
  const auto opts = weight.options();
  at::Tensor mean = at::zeros({g.N * r.splits, g.C}, opts), m2 = at::zeros({g.N * r.splits, g.C}, opts);
  at::Tensor count = at::zeros({g.N * r.splits}, opts);
  if (g.N * g.C == 0) return combine_mean_m2(mean, m2, count);  // H or W may be 0 with output pixels from padding
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = taps_major(weight);
  dispatch(x, g.K, kIdentity, "dwconv_bn_stats_cuda", [&](auto s, auto k, auto) {
    using scalar_t = decltype(s);
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t, decltype(k)::value>
        <<<reduce_grid(g, r), dim3(r.tc, r.tp), 3 * kThreads * sizeof(acc_t), at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), cptr<acc_t>(w), mean.mutable_data_ptr<acc_t>(),
            m2.mutable_data_ptr<acc_t>(), count.mutable_data_ptr<acc_t>(), g, r.chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return combine_mean_m2(mean, m2, count);
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  dwconv::check_channel_param(scale, x, g, "scale");
  dwconv::check_channel_param(shift, x, g, "shift");
  at::Tensor y = dwconv::empty_output(x, g);
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = taps_major(weight);
  dispatch(x, g.K, act, "dwconv_affine_act_forward_cuda", [&](auto s, auto k, auto a) {
    using scalar_t = decltype(s);
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(y.numel(), [&](auto i) {
      using index_t = decltype(i);
      forward_kernel<scalar_t, decltype(k)::value, decltype(a)::value, index_t>
          <<<cuda::num_blocks(y.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), cptr<acc_t>(w), cptr<acc_t>(scale), cptr<acc_t>(shift),
              y.mutable_data_ptr<scalar_t>(), g, Decoder<index_t>(g, g.Ho, g.Wo), static_cast<index_t>(y.numel()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_stats_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& scale, const at::Tensor& shift,
                                                   const at::Tensor& center, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  dwconv::check_channel_param(scale, x, g, "scale");
  dwconv::check_channel_param(shift, x, g, "shift");
  dwconv::check_channel_param(center, x, g, "center");
  dwconv::check_grad(grad, x, g);
  const ReduceShape r = reduce_shape(g);
  at::Tensor sum_g = at::zeros({g.N * r.splits, g.C}, weight.options()), sum_gz = at::zeros_like(sum_g);
  if (grad.numel() == 0) return {sum_g.sum(0), sum_gz.sum(0)};
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = taps_major(weight);
  dispatch(x, g.K, act, "dwconv_affine_act_grad_stats_cuda", [&](auto s, auto k, auto a) {
    using scalar_t = decltype(s);
    using acc_t = at::opmath_type<scalar_t>;
    grad_stats_kernel<scalar_t, decltype(k)::value, decltype(a)::value>
        <<<reduce_grid(g, r), dim3(r.tc, r.tp), kThreads * sizeof(acc_t), at::cuda::getCurrentCUDAStream()>>>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), cptr<acc_t>(w), cptr<acc_t>(scale),
            cptr<acc_t>(shift), cptr<acc_t>(center), sum_g.mutable_data_ptr<acc_t>(), sum_gz.mutable_data_ptr<acc_t>(),
            g, r.chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_g.sum(0), sum_gz.sum(0)};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                 const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& p,
                                                 const at::Tensor& q, at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  for (auto [t, name] : {std::pair{&scale, "scale"}, {&shift, "shift"}, {&p, "p"}, {&q, "q"}})
    dwconv::check_channel_param(*t, x, g, name);
  dwconv::check_grad(grad, x, g);
  const ReduceShape r = reduce_shape(g);
  at::Tensor dw = at::zeros({g.N * r.splits, g.C, g.K, g.K}, weight.options());
  if (grad.numel() == 0 || x.numel() == 0) return {at::zeros_like(x), at::zeros_like(weight)};
  at::Tensor dx = at::empty_like(x), dz = at::empty_like(grad);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor w = taps_major(weight);
  dispatch(x, g.K, act, "dwconv_affine_act_backward_cuda", [&](auto s, auto k, auto a) {
    using scalar_t = decltype(s);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int K = decltype(k)::value;
    const int64_t smem = (r.tc == 1 ? K * K * (r.tp / 32) : 2 * r.tc * r.tp) * sizeof(acc_t);
    dz_kernel<scalar_t, K, decltype(a)::value><<<reduce_grid(g, r), dim3(r.tc, r.tp), smem, stream>>>(
        grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), cptr<acc_t>(w), cptr<acc_t>(scale),
        cptr<acc_t>(shift), cptr<acc_t>(p), cptr<acc_t>(q), dz.mutable_data_ptr<scalar_t>(),
        dw.mutable_data_ptr<acc_t>(), g, r.chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    with_index_type(x.numel(), [&](auto i) {
      using index_t = decltype(i);
      dx_kernel<scalar_t, K, index_t><<<cuda::num_blocks(x.numel()), kThreads, 0, stream>>>(
          dz.const_data_ptr<scalar_t>(), cptr<acc_t>(w), dx.mutable_data_ptr<scalar_t>(), g,
          Decoder<index_t>(g, g.H, g.W), static_cast<index_t>(x.numel()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dw.sum(0).view(weight.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks_ext, CUDA, m) {
  m.impl("dwconv_bn_stats", &stats_cuda);
  m.impl("dwconv_affine_act_forward", &forward_cuda);
  m.impl("dwconv_affine_act_grad_stats", &grad_stats_cuda);
  m.impl("dwconv_affine_act_backward", &backward_cuda);
}

}  // namespace fastblocks
