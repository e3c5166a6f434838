// Fused BatchNorm + activation over a tensor or a channel slice of a DenseNet block buffer: the layout
// and algebra shared by the CPU (bn_act.cpp) and CUDA (bn_act_cuda.cu) kernels.
#pragma once

#include "activations.h"
#include "fastblocks.h"

namespace fastblocks {
namespace bn_act {

// Where the values of x live. x may be a channel slice buf[:, :C] of a larger buffer, so it is
// indexed with its own stride: in NCHW each image's [C, H, W] block is contiguous and images are
// x_stride apart; in channels_last each pixel's C channels are contiguous and pixels are x_stride
// apart. y, grad and dx are dense in the same layout: flat index (n * C + c) * HW + p (NCHW) or
// r * C + c with pixel r = n * HW + p (channels_last).
struct Geometry {
  int64_t N, C, HW;
  int64_t x_stride;
  bool channels_last;

  FB_HOST_DEVICE int64_t count() const { return N * HW; }  // values per channel
  FB_HOST_DEVICE int64_t numel() const { return N * C * HW; }

  // Index into x, and the channel, of flat index i of the dense output.
  FB_HOST_DEVICE int64_t x_index(int64_t i, int64_t& c) const {
    if (channels_last) {
      const int64_t r = i / C;
      c = i - r * C;
      return r * x_stride + c;
    }
    const int64_t row = i / HW, p = i - row * HW, n = row / C;
    c = row - n * C;
    return n * x_stride + c * HW + p;
  }
};

// The layout of x, or an error naming it. Mirrors _slice_layout in fastblocks/ops/bn_act.py.
inline Geometry geometry(const at::Tensor& x) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  if (x.numel() == 0 || x.select(0, 0).is_contiguous()) return {N, C, HW, N > 1 ? x.stride(0) : C * HW, false};
  int64_t s = C;  // the pixel stride, read from the first pixel dimension that has more than one entry
  if (W > 1) s = x.stride(3);
  else if (H > 1) s = x.stride(2);
  else if (N > 1) s = x.stride(0);
  const bool nhwc = (C == 1 || x.stride(1) == 1) && (W == 1 || x.stride(3) == s) && (H == 1 || x.stride(2) == W * s) &&
                    (N == 1 || x.stride(0) == HW * s);
  TORCH_CHECK(nhwc, "x must be NCHW or channels_last with each image's (NCHW) or pixel's (channels_last) channels "
              "contiguous, e.g. a channel slice of such a tensor; got strides ", x.strides());
  return {N, C, HW, s, true};
}

inline at::MemoryFormat out_format(const Geometry& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The dense output (y, dx) for x.
inline at::Tensor empty_out(const at::Tensor& x, const Geometry& g) {
  return at::empty(x.sizes(), x.options().memory_format(out_format(g)));
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& x, const Geometry& g) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "grad must have the shape, dtype and device of x");
  TORCH_CHECK(grad.is_contiguous(out_format(g)), "grad must be dense in the layout of the output (",
              g.channels_last ? "channels_last" : "contiguous", "), got strides ", grad.strides());
}

// The target of bn_act_backward_into: x's shape, dtype, device and strides (so x's indices address it).
inline void check_laid_out_like_x(const at::Tensor& grad_x, const at::Tensor& x) {
  TORCH_CHECK(grad_x.sizes() == x.sizes() && grad_x.strides() == x.strides() &&
                  grad_x.scalar_type() == x.scalar_type() && grad_x.device() == x.device(),
              "grad_x must have the shape, strides, dtype and device of x");
}

// mean, invstd, weight and bias: contiguous [C] in x's accumulation dtype (float64 for float64 x,
// else float32), on x's device.
inline void check_channel_params(const at::Tensor& x, std::initializer_list<std::pair<const at::Tensor*, const char*>> ts) {
  const auto acc = at::toOpMathType(x.scalar_type());
  for (const auto& [t, name] : ts) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->is_contiguous(), name, " must be a contiguous [C] = [",
                x.size(1), "] tensor, got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == acc, name, " must be ", acc, " for ", x.scalar_type(), " x, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), name, " must be on the device of x");
  }
}

// f(std::integral_constant<int, ACT>{}) for an activation code of csrc/activations.h, or an error.
template <typename F>
void with_activation(int64_t activation, F&& f) {
  TORCH_CHECK(dispatch_activation(activation, std::forward<F>(f)),
              "activation must be a code of csrc/activations.h (0 none, 1 relu, 2 relu6, 3 silu, 4 hardswish), got ",
              activation);
}

// u = x * scale + shift, y = act(u), with scale = weight * invstd and shift = bias - mean * scale: one
// formula for the forward and for u recomputed in backward, on both devices. Each device computes
// these per-channel values in its kernels (a few ATen ops on [C] tensors would cost a launch or an
// allocation each, more than the kernels of a small layer).
template <typename T>
FB_HOST_DEVICE void channel_affine(T mean, T invstd, T weight, T bias, T& scale, T& shift) {
  scale = weight * invstd;
  shift = bias - mean * scale;
}

// Backward from the per-channel sums of g = grad * act'(u) and g * (x - mean):
// dbias = sum g, dweight = invstd * sum g (x - mean), and dx = scale * (g - a - (x - mean) * b) with
// the batch-statistics terms a = dbias / count, b = dweight * invstd / count (zero when the statistics
// were constants, i.e. eval mode).
template <typename T>
FB_HOST_DEVICE void backward_terms(T sum_g, T sum_gxmu, T invstd, int64_t count, bool batch_stats, T& dweight,
                                   T& dbias, T& a, T& b) {
  dbias = sum_g;
  dweight = sum_gxmu * invstd;
  const bool through_stats = batch_stats && count > 0;
  a = through_stats ? sum_g / T(count) : T(0);
  b = through_stats ? dweight * invstd / T(count) : T(0);
}

struct BackwardTerms {
  at::Tensor dweight, dbias;
};

// A device's backward (backward_cpu_impl, backward_cuda_impl): dweight and dbias; dx is stored into
// `out` at the dense output indices or, with `accumulate`, added into `out` at x's indices (out laid
// out like x). The two registered backward ops wrap it.
using BackwardImpl = BackwardTerms (*)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                       const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                       bool batch_stats, int64_t activation, at::Tensor& out, bool accumulate);

// bn_act_backward -> (dx, dweight, dbias), dx dense in x's layout.
template <BackwardImpl impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& mean, const at::Tensor& invstd,
                                                           const at::Tensor& weight, const at::Tensor& bias,
                                                           bool batch_stats, int64_t activation) {
  at::Tensor dx = empty_out(x, geometry(x));
  const BackwardTerms terms = impl(grad, x, mean, invstd, weight, bias, batch_stats, activation, dx, false);
  return {dx, terms.dweight, terms.dbias};
}

// bn_act_backward_into -> (dweight, dbias), dx added into grad_x.
template <BackwardImpl impl>
std::tuple<at::Tensor, at::Tensor> backward_into_op(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                                    const at::Tensor& invstd, const at::Tensor& weight,
                                                    const at::Tensor& bias, bool batch_stats, int64_t activation,
                                                    at::Tensor& grad_x) {
  check_laid_out_like_x(grad_x, x);
  const BackwardTerms terms = impl(grad, x, mean, invstd, weight, bias, batch_stats, activation, grad_x, true);
  return {terms.dweight, terms.dbias};
}

}  // namespace bn_act
}  // namespace fastblocks
