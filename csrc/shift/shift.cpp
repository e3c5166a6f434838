// The shift operation (fastblocks/ops/shift.py): schemas and C++ CPU kernels; the CUDA kernels are
// in shift_cuda.cu. Pure data movement: one shifted copy per plane (NCHW, stride 1), a gather per row
// (NCHW, strided) or per-group channel copies (channels_last).
#include <ATen/Parallel.h>

#include <cstdlib>
#include <vector>

#include "shift.h"

namespace fastblocks {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task

using shift::Params;
using Taps = shift::Taps<shift::Divider>;

// NCHW, unit stride (H x W planes in and out): out[i, j] = in[i + dy, j + dx]. Flattened, the rows
// that have a source are one run of the plane moved by dy * W + dx: one copy, then the |dx| columns
// per row that came from the neighbouring row are zeroed. (A copy per row cost more than the data on
// small planes: 28 x 28 is 112 bytes a call.)
template <typename scalar_t>
void shift_plane(const scalar_t* in, scalar_t* out, int64_t H, int64_t W, int64_t dy, int64_t dx) {
  const scalar_t zero(0);
  const int64_t i0 = std::clamp<int64_t>(-dy, 0, H), i1 = std::clamp<int64_t>(H - dy, i0, H);  // rows with a source
  std::fill(out, out + i0 * W, zero);
  std::fill(out + i1 * W, out + H * W, zero);
  if (std::abs(dx) >= W) {
    std::fill(out + i0 * W, out + i1 * W, zero);
    return;
  }
  // out[k] = in[k + dy * W + dx] for k in [k0, k1): the first and last elements that stay inside the plane
  const int64_t k0 = i0 * W + std::max<int64_t>(-dx, 0), k1 = i1 * W - std::max<int64_t>(dx, 0);
  if (k1 > k0) std::copy(in + k0 + dy * W + dx, in + k1 + dy * W + dx, out + k0);
  const int64_t c0 = dx > 0 ? W - dx : 0;  // the columns [c0, c0 + |dx|) of each row are zero
  for (int64_t i = i0; i < i1; ++i) std::fill_n(out + i * W + c0, std::abs(dx), zero);
}

// NCHW: output row (n, c, i) reads input row (n, c, sy) at columns sx, zero where nothing enters.
template <typename scalar_t>
void shift_nchw(const scalar_t* in, scalar_t* out, const Params& p, const Taps& taps) {
  const int64_t plane_in = p.h_in * p.w_in, plane_out = p.h_out * p.w_out;
  const bool unit = p.mul == 1 && p.div == 1;
  const scalar_t zero(0);
  at::parallel_for(0, p.N * p.C, std::max<int64_t>(1, kGrain / std::max<int64_t>(plane_out, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      int64_t dy, dx;
      taps.offset(nc % p.C, dy, dx);
      if (unit) {
        shift_plane(in + nc * plane_in, out + nc * plane_out, p.h_out, p.w_out, dy, dx);
        continue;
      }
      for (int64_t i = 0; i < p.h_out; ++i) {
        scalar_t* o = out + nc * plane_out + i * p.w_out;
        const int64_t sy = shift::source(i, dy, p.mul, p.div, p.h_in);
        if (sy < 0) {
          std::fill_n(o, p.w_out, zero);
          continue;
        }
        const scalar_t* row = in + nc * plane_in + sy * p.w_in;
        for (int64_t j = 0; j < p.w_out; ++j) {
          const int64_t sx = shift::source(j, dx, p.mul, p.div, p.w_in);
          o[j] = sx < 0 ? zero : row[sx];
        }
      }
    }
  });
}

// channels_last: every output pixel is a row of C channels; each tap group is a contiguous run of
// channels copied from one source pixel. Per output row (n, i), one pass per group: the reads of a
// pass are one constant-stride stream (prefetcher-friendly) and the output row stays in cache.
template <typename scalar_t>
void shift_nhwc(const scalar_t* in, scalar_t* out, const Params& p, const Taps& taps) {
  struct Group {
    int64_t c0, c1, dy, dx;
  };
  std::vector<Group> groups;
  for (int64_t c = 0; c < p.C;) {
    Group g{c, c < taps.shifted ? c + taps.group.divisor : p.C, 0, 0};
    taps.offset(c, g.dy, g.dx);
    groups.push_back(g);
    c = g.c1;
  }
  const scalar_t zero(0);
  at::parallel_for(0, p.N * p.h_out, std::max<int64_t>(1, kGrain / std::max<int64_t>(p.w_out * p.C, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t ni = begin; ni < end; ++ni) {
      const int64_t n = ni / p.h_out, i = ni % p.h_out;
      scalar_t* orow = out + ni * p.w_out * p.C;
      for (const Group& g : groups) {
        const int64_t sy = shift::source(i, g.dy, p.mul, p.div, p.h_in);
        const scalar_t* irow = in + (n * p.h_in + std::max<int64_t>(sy, 0)) * p.w_in * p.C + g.c0;
        for (int64_t j = 0; j < p.w_out; ++j) {
          scalar_t* o = orow + j * p.C + g.c0;
          const int64_t sx = sy < 0 ? -1 : shift::source(j, g.dx, p.mul, p.div, p.w_in);
          if (sx < 0) {
            std::fill(o, o + (g.c1 - g.c0), zero);
          } else {
            std::copy_n(irow + sx * p.C, g.c1 - g.c0, o);
          }
        }
      }
    }
  });
}

at::Tensor shift_cpu(const at::Tensor& in, int64_t kernel_size, int64_t dilation, int64_t stride, bool forward,
                     int64_t height = 0, int64_t width = 0) {
  const shift::Prepared job = shift::prepare(in, kernel_size, dilation, stride, forward, height, width);
  if (job.out.numel() == 0) return job.out;
  const Taps taps = shift::make_taps<shift::Divider>(job.p.C, kernel_size, dilation, forward);
  FB_DISPATCH_FLOATING_TYPES(in.scalar_type(), "shift_cpu", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = job.out.mutable_data_ptr<scalar_t>();
    if (job.channels_last) {
      shift_nhwc<scalar_t>(src, dst, job.p, taps);
    } else {
      shift_nchw<scalar_t>(src, dst, job.p, taps);
    }
  });
  return job.out;
}

at::Tensor shift_forward_cpu(const at::Tensor& x, int64_t kernel_size, int64_t dilation, int64_t stride) {
  return shift_cpu(x, kernel_size, dilation, stride, /*forward=*/true);
}

at::Tensor shift_backward_cpu(const at::Tensor& grad, int64_t kernel_size, int64_t dilation, int64_t stride,
                              int64_t height, int64_t width) {
  return shift_cpu(grad, kernel_size, dilation, stride, /*forward=*/false, height, width);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastblocks_ext, m) {
  m.def("shift_forward(Tensor x, int kernel_size, int dilation, int stride) -> Tensor");
  m.def("shift_backward(Tensor grad, int kernel_size, int dilation, int stride, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastblocks_ext, CPU, m) {
  m.impl("shift_forward", &shift_forward_cpu);
  m.impl("shift_backward", &shift_backward_cpu);
}

}  // namespace fastblocks
