// Geometry of the shift, shared by the CPU and CUDA kernels (the convention is documented in
// fastblocks/ops/shift.py).
//
// One routine serves the forward and its adjoint. Along each spatial axis, output index o reads
// source index (o * mul + off) / div when that is an integer inside the source, else 0:
//   forward  out[i] = x[i * stride + dy]           mul = stride, div = 1,      off = dy
//   adjoint  dx[y]  = grad[(y - dy) / stride]      mul = 1,      div = stride, off = -dy
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "activations.h"  // FB_HOST_DEVICE
#include "fastblocks.h"

namespace fastblocks {
namespace shift {

// Source index along one axis for output index o, or -1 when nothing enters.
FB_HOST_DEVICE int64_t source(int64_t o, int64_t off, int64_t mul, int64_t div, int64_t n_in) {
  int64_t t = o * mul + off;
  if (div != 1) {
    if (t < 0 || t % div != 0) return -1;
    t /= div;
  }
  return t >= 0 && t < n_in ? t : -1;
}

// Plain division with the interface of at::cuda::detail::IntDivider (which CUDA uses for speed).
struct Divider {
  Divider(int64_t d) : divisor(d) {}
  int64_t div(int64_t n) const { return n / divisor; }
  int64_t mod(int64_t n) const { return n % divisor; }
  int64_t divisor;
};

// Channel c -> offset (dy, dx): tap t = c / (C / k^2) of a k x k kernel in row-major order.
template <typename Div>
struct Taps {
  Div group;        // C / k^2 channels per tap (divisor clamped to 1 when C < k^2)
  Div k;            // the kernel size
  int64_t shifted;  // k^2 * (C / k^2): channels from here on are in the centre tap, not moved
  int64_t half;     // k / 2
  int64_t scale;    // dilation, negated for the adjoint

  template <typename U>
  FB_HOST_DEVICE void offset(U c, int64_t& dy, int64_t& dx) const {
    if (static_cast<int64_t>(c) >= shifted) {
      dy = dx = 0;
      return;
    }
    const U tap = group.div(c);
    const U row = k.div(tap);
    dy = (static_cast<int64_t>(row) - half) * scale;
    dx = (static_cast<int64_t>(tap - row * k.divisor) - half) * scale;
  }
};

template <typename Div>
Taps<Div> make_taps(int64_t C, int64_t k, int64_t dilation, bool forward) {
  const int64_t group = C / (k * k);
  return {Div(std::max<int64_t>(group, 1)), Div(k), k * k * group, k / 2, forward ? dilation : -dilation};
}

// Sizes, and the axis map (mul, div) described above.
struct Params {
  int64_t N, C, h_in, w_in, h_out, w_out, mul, div;
};

// Checks the arguments of shift_forward (forward) or shift_backward (the adjoint, whose input is
// the gradient of an output computed from a height x width input) and allocates the output in the
// input's memory format.
struct Prepared {
  at::Tensor out;
  Params p;
  bool channels_last;
};

inline Prepared prepare(const at::Tensor& in, int64_t kernel_size, int64_t dilation, int64_t stride, bool forward,
                        int64_t height = 0, int64_t width = 0) {
  const char* name = forward ? "x" : "grad";
  check_floating(in, name);
  const bool channels_last = is_channels_last_4d(in, name);
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "kernel_size must be an odd integer >= 1, got ",
              kernel_size);
  TORCH_CHECK(dilation >= 1, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK(stride >= 1, "stride must be >= 1, got ", stride);
  const int64_t N = in.size(0), C = in.size(1);
  Params p;
  if (forward) {
    p = {N, C, in.size(2), in.size(3), (in.size(2) + stride - 1) / stride, (in.size(3) + stride - 1) / stride,
         stride, 1};
  } else {
    TORCH_CHECK(height >= 0 && width >= 0, "height and width must be >= 0, got ", height, " and ", width);
    p = {N, C, in.size(2), in.size(3), height, width, 1, stride};
    TORCH_CHECK(in.size(2) == (height + stride - 1) / stride && in.size(3) == (width + stride - 1) / stride,
                "grad must be [N, C, ceil(height / stride), ceil(width / stride)] = [", N, ", ", C, ", ",
                (height + stride - 1) / stride, ", ", (width + stride - 1) / stride, "], got ", in.sizes());
  }
  at::Tensor out = at::empty({N, C, p.h_out, p.w_out},
                             in.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous));
  return {out, p, channels_last};
}

}  // namespace shift
}  // namespace fastblocks
