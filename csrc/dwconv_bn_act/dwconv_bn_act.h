// Shared by the CPU and CUDA depthwise conv + affine + activation kernels: geometry and input checks.
#pragma once

#include "fastblocks.h"

namespace fastblocks {
namespace dwconv {

struct DWGeometry {
  int64_t N, C, H, W;        // input
  int64_t K;                 // square kernel, 3, 5 or 7
  int64_t Ho, Wo;            // output
  int64_t sh, sw, ph, pw, dh, dw;
  bool channels_last;        // x, y, dy and dx are all channels_last (else NCHW-contiguous)
};

// Validates x ([N, C, H, W], NCHW or channels_last) and weight ([C, 1, K, K], contiguous, accumulation dtype).
DWGeometry make_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation);
// An uninitialised [N, C, Ho, Wo] tensor in x's memory format.
at::Tensor empty_output(const at::Tensor& x, const DWGeometry& g);
// A contiguous [C] tensor in the accumulation dtype on x's device.
void check_channel_param(const at::Tensor& t, const at::Tensor& x, const DWGeometry& g, const char* name);
// The output gradient: the output's shape, x's dtype, device and memory format.
void check_grad(const at::Tensor& grad, const at::Tensor& x, const DWGeometry& g);

}  // namespace dwconv
}  // namespace fastblocks
