// Depthwise conv + per-channel affine + activation, the building block of the fused
// depthwise conv + BatchNorm + activation op (fastblocks/ops/dwconv_bn_act.py):
//
//   z = dwconv(x, w)            per-channel K x K filter, any stride / padding / dilation
//   y = act(scale[c] * z + shift[c])
//
// Four raw kernels (schemas below; CPU kernels here, CUDA kernels in dwconv_bn_act_cuda.cu):
//   dwconv_bn_stats            partial (mean, M2, count) of z per channel   (training forward, phase 1)
//   dwconv_affine_act_forward  y                                            (training phase 2 and eval)
//   dwconv_affine_act_grad_stats  partial sums of g and g * (z - center), g = dy * act'(scale * z + shift)
//   dwconv_affine_act_backward dx and partial dw for dz = scale * g + p[c] + q[c] * z
// Reductions return per-partition partials (rows of a [P, C] tensor); Python combines them, so the
// CPU and CUDA kernels share one finalisation. Parameters (w, scale, shift, ...) are contiguous
// tensors in the accumulation dtype (fp32, or fp64 for fp64 x); x / y / dy keep x's dtype and are
// NCHW-contiguous or channels_last (y and dx keep x's layout).
#include <ATen/Parallel.h>

#include <vector>

#include "activations.h"
#include "dwconv_bn_act/dwconv_bn_act.h"

namespace fastblocks {
namespace dwconv {

DWGeometry make_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  DWGeometry g;
  check_floating(x, "x");
  g.channels_last = is_channels_last_4d(x, "x");
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == g.C && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "weight must have shape [C, 1, k, k] = [", g.C, ", 1, k, k], got ", weight.sizes());
  g.K = weight.size(2);
  TORCH_CHECK(g.K == 3 || g.K == 5 || g.K == 7, "the depthwise kernels support kernel sizes 3, 5 and 7, got ", g.K);
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::toOpMathType(x.scalar_type()),
              "weight must be contiguous ", at::toOpMathType(x.scalar_type()), " (the accumulation dtype of x), got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight must be on the device of x");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have two entries each");
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
              "stride and dilation must be positive and padding non-negative, got stride ", stride, ", padding ",
              padding, ", dilation ", dilation);
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.K - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.K - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= g.dh * (g.K - 1) + 1 && g.W + 2 * g.pw >= g.dw * (g.K - 1) + 1,
              "input of size ", x.sizes(), " is too small for a ", g.K, "x", g.K, " kernel with this padding and dilation");
  return g;
}

at::Tensor empty_output(const at::Tensor& x, const DWGeometry& g) {
  return at::empty({g.N, g.C, g.Ho, g.Wo},
                   x.options().memory_format(g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

void check_channel_param(const at::Tensor& t, const at::Tensor& x, const DWGeometry& g, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == g.C && t.is_contiguous(), name, " must be a contiguous [C] = [", g.C,
              "] tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::toOpMathType(x.scalar_type()), name, " must be ",
              at::toOpMathType(x.scalar_type()), " (the accumulation dtype of x), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on the device of x");
}

void check_grad(const at::Tensor& grad, const at::Tensor& x, const DWGeometry& g) {
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({g.N, g.C, g.Ho, g.Wo}), "grad must have the output's shape [", g.N,
              ", ", g.C, ", ", g.Ho, ", ", g.Wo, "], got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "grad must have the dtype and device of x");
  TORCH_CHECK(grad.is_contiguous(g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              "grad must have the memory format of x");
}

}  // namespace dwconv

namespace {

using dwconv::DWGeometry;

// dst[i] += w * src[i * stride] for i < n: the inner loop of every CPU pass (vectorised for stride 1).
template <typename T>
FB_CPU_MULTIVERSION void axpy_strided(T* __restrict__ dst, const T* __restrict__ src, T w, int64_t n, int64_t stride) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i * stride];
  }
}

// One (n, c) plane at a time: the plane of x is copied (as acc_t) into a zero-padded buffer, so
// that every tap of the convolution is a branch-free row operation. Works for both layouts
// through element strides; the NCHW case reads and writes contiguous rows.
template <typename scalar_t>
struct PlaneWorker {
  using acc_t = opmath_t<scalar_t>;
  const DWGeometry& g;
  const int64_t Hp, Wp;
  std::vector<acc_t> xp;  // padded input plane [Hp, Wp]; the border stays zero
  std::vector<acc_t> z;   // conv output plane [Ho, Wo]
  int64_t xs_h, xs_w, ys_h, ys_w;  // element strides of x and of y / dy along H and W

  explicit PlaneWorker(const DWGeometry& geom)
      : g(geom), Hp(geom.H + 2 * geom.ph), Wp(geom.W + 2 * geom.pw), xp(Hp * Wp, acc_t(0)), z(geom.Ho * geom.Wo) {
    xs_h = g.channels_last ? g.W * g.C : g.W;
    xs_w = g.channels_last ? g.C : 1;
    ys_h = g.channels_last ? g.Wo * g.C : g.Wo;
    ys_w = g.channels_last ? g.C : 1;
  }
  int64_t x_offset(int64_t n, int64_t c) const { return g.channels_last ? n * g.H * g.W * g.C + c : (n * g.C + c) * g.H * g.W; }
  int64_t y_offset(int64_t n, int64_t c) const {
    return g.channels_last ? n * g.Ho * g.Wo * g.C + c : (n * g.C + c) * g.Ho * g.Wo;
  }

  // z = conv(x[n, c], w[c]).
  void conv(const scalar_t* x, const acc_t* w, int64_t n, int64_t c) {
    const scalar_t* xb = x + x_offset(n, c);
    for (int64_t ih = 0; ih < g.H; ++ih) {
      acc_t* dst = xp.data() + (ih + g.ph) * Wp + g.pw;
      const scalar_t* src = xb + ih * xs_h;
      for (int64_t iw = 0; iw < g.W; ++iw) dst[iw] = static_cast<acc_t>(src[iw * xs_w]);
    }
    const acc_t* wc = w + c * g.K * g.K;
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      acc_t* zr = z.data() + oh * g.Wo;
      std::fill(zr, zr + g.Wo, acc_t(0));
      for (int64_t kh = 0; kh < g.K; ++kh) {
        const acc_t* row = xp.data() + (oh * g.sh + kh * g.dh) * Wp;
        for (int64_t kw = 0; kw < g.K; ++kw) axpy_strided(zr, row + kw * g.dw, wc[kh * g.K + kw], g.Wo, g.sw);
      }
    }
  }

  // Calls f(z, y_index) for every output pixel of plane (n, c).
  template <typename F>
  void for_each_output(int64_t n, int64_t c, F&& f) const {
    const int64_t base = y_offset(n, c);
    for (int64_t oh = 0; oh < g.Ho; ++oh)
      for (int64_t ow = 0; ow < g.Wo; ++ow) f(z[oh * g.Wo + ow], base + oh * ys_h + ow * ys_w, oh * g.Wo + ow);
  }
};

// Runs f(worker, n, c) over every plane, in parallel, one worker (buffers) per task.
template <typename scalar_t, typename F>
void for_each_plane(const DWGeometry& g, F&& f) {
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    PlaneWorker<scalar_t> worker(g);
    for (int64_t nc = begin; nc < end; ++nc) f(worker, nc / g.C, nc % g.C);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stats_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                                         at::IntArrayRef dilation) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  const auto acc_opts = weight.options();
  at::Tensor mean = at::empty({g.N, g.C}, acc_opts), m2 = at::empty({g.N, g.C}, acc_opts);
  at::Tensor count = at::full({g.N}, static_cast<double>(g.Ho * g.Wo), acc_opts);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_stats_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const acc_t* pw = weight.const_data_ptr<acc_t>();
    acc_t *pmean = mean.mutable_data_ptr<acc_t>(), *pm2 = m2.mutable_data_ptr<acc_t>();
    for_each_plane<scalar_t>(g, [&](PlaneWorker<scalar_t>& wk, int64_t n, int64_t c) {
      wk.conv(px, pw, n, c);
      // two passes over the plane buffer (in cache): no cancellation in the variance
      acc_t sum = 0;
      for (acc_t v : wk.z) sum += v;
      const acc_t mu = sum / static_cast<acc_t>(wk.z.size());
      acc_t sq = 0;
      for (acc_t v : wk.z) sq += (v - mu) * (v - mu);
      pmean[n * g.C + c] = mu;
      pm2[n * g.C + c] = sq;
    });
  });
  return {mean, m2, count};
}

// NCHW: one plane per task. channels_last: one output row (n, oh) per task with the C channels of
// a pixel innermost, so loads, the weight rows (transposed to [K*K, C]) and stores are contiguous.
template <typename scalar_t, int ACT>
void forward_nhwc(const DWGeometry& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                  const at::Tensor& shift, at::Tensor& y) {
  using acc_t = opmath_t<scalar_t>;
  const at::Tensor wt = weight.reshape({g.C, g.K * g.K}).t().contiguous();
  const acc_t *pwt = wt.const_data_ptr<acc_t>(), *ps = scale.const_data_ptr<acc_t>(),
              *pt = shift.const_data_ptr<acc_t>();
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  scalar_t* py = y.mutable_data_ptr<scalar_t>();
  const int64_t C = g.C;
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(g.Wo * C), xrow(C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.Ho, oh = row % g.Ho;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t kh = 0; kh < g.K; ++kh) {
        const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t kw = 0; kw < g.K; ++kw) {
          const acc_t* wk = pwt + (kh * g.K + kw) * C;
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
            if (iw < 0 || iw >= g.W) continue;
            const scalar_t* xr = px + ((n * g.H + ih) * g.W + iw) * C;
            acc_t* ar = acc.data() + ow * C;
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              for (int64_t c = 0; c < C; ++c) ar[c] += wk[c] * xr[c];
            } else {
              for (int64_t c = 0; c < C; ++c) xrow[c] = static_cast<acc_t>(xr[c]);
              for (int64_t c = 0; c < C; ++c) ar[c] += wk[c] * xrow[c];
            }
          }
        }
      }
      scalar_t* yr = py + (n * g.Ho + oh) * g.Wo * C;
      for (int64_t ow = 0; ow < g.Wo; ++ow)
        for (int64_t c = 0; c < C; ++c)
          yr[ow * C + c] = static_cast<scalar_t>(activate<ACT>(ps[c] * acc[ow * C + c] + pt[c]));
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  dwconv::check_channel_param(scale, x, g, "scale");
  dwconv::check_channel_param(shift, x, g, "shift");
  at::Tensor y = dwconv::empty_output(x, g);
  if (y.numel() == 0) return y;
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_affine_act_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const bool known = dispatch_activation(act, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      if (g.channels_last) return forward_nhwc<scalar_t, ACT>(g, x, weight, scale, shift, y);
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      const acc_t *pw = weight.const_data_ptr<acc_t>(), *ps = scale.const_data_ptr<acc_t>(),
                  *pt = shift.const_data_ptr<acc_t>();
      scalar_t* py = y.mutable_data_ptr<scalar_t>();
      for_each_plane<scalar_t>(g, [&](PlaneWorker<scalar_t>& wk, int64_t n, int64_t c) {
        wk.conv(px, pw, n, c);
        const acc_t s = ps[c], t = pt[c];
        wk.for_each_output(n, c, [&](acc_t z, int64_t i, int64_t) { py[i] = static_cast<scalar_t>(activate<ACT>(s * z + t)); });
      });
    });
    TORCH_CHECK(known, "unknown activation code ", act);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_stats_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& scale, const at::Tensor& shift,
                                                  const at::Tensor& center, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  dwconv::check_channel_param(scale, x, g, "scale");
  dwconv::check_channel_param(shift, x, g, "shift");
  dwconv::check_channel_param(center, x, g, "center");
  dwconv::check_grad(grad, x, g);
  at::Tensor sum_g = at::empty({g.N, g.C}, weight.options()), sum_gz = at::empty({g.N, g.C}, weight.options());
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_affine_act_grad_stats_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const bool known = dispatch_activation(act, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      const scalar_t *px = x.const_data_ptr<scalar_t>(), *pdy = grad.const_data_ptr<scalar_t>();
      const acc_t *pw = weight.const_data_ptr<acc_t>(), *ps = scale.const_data_ptr<acc_t>(),
                  *pt = shift.const_data_ptr<acc_t>(), *pc = center.const_data_ptr<acc_t>();
      acc_t *psg = sum_g.mutable_data_ptr<acc_t>(), *psgz = sum_gz.mutable_data_ptr<acc_t>();
      for_each_plane<scalar_t>(g, [&](PlaneWorker<scalar_t>& wk, int64_t n, int64_t c) {
        wk.conv(px, pw, n, c);
        const acc_t s = ps[c], t = pt[c], mu = pc[c];
        acc_t sg = 0, sgz = 0;
        wk.for_each_output(n, c, [&](acc_t z, int64_t i, int64_t) {
          const acc_t gv = static_cast<acc_t>(pdy[i]) * activate_grad<ACT>(s * z + t);
          sg += gv;
          sgz += gv * (z - mu);
        });
        psg[n * g.C + c] = sg;
        psgz[n * g.C + c] = sgz;
      });
    });
    TORCH_CHECK(known, "unknown activation code ", act);
  });
  return {sum_g, sum_gz};
}

// dz = scale * dy * act'(scale * z + shift) + p + q * z; dx = conv_transpose(dz, w) (scattered into a
// padded plane), dw[n, c] = sum over the plane of dz * the tap's input (partial per image).
std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& p,
                                                const at::Tensor& q, at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  for (auto [t, name] : {std::pair{&scale, "scale"}, {&shift, "shift"}, {&p, "p"}, {&q, "q"}})
    dwconv::check_channel_param(*t, x, g, name);
  dwconv::check_grad(grad, x, g);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({g.N, g.C, g.K, g.K}, weight.options());
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_affine_act_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const bool known = dispatch_activation(act, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      const scalar_t *px = x.const_data_ptr<scalar_t>(), *pdy = grad.const_data_ptr<scalar_t>();
      const acc_t *pw = weight.const_data_ptr<acc_t>(), *ps = scale.const_data_ptr<acc_t>(),
                  *pt = shift.const_data_ptr<acc_t>(), *pp = p.const_data_ptr<acc_t>(), *pq = q.const_data_ptr<acc_t>();
      scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
      acc_t* pdw = dw.mutable_data_ptr<acc_t>();
      at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
        PlaneWorker<scalar_t> wk(g);
        std::vector<acc_t> dxp(wk.Hp * wk.Wp);
        for (int64_t nc = begin; nc < end; ++nc) {
          const int64_t n = nc / g.C, c = nc % g.C;
          wk.conv(px, pw, n, c);
          const acc_t s = ps[c], t = pt[c], pc = pp[c], qc = pq[c];
          wk.for_each_output(n, c, [&](acc_t z, int64_t i, int64_t j) {
            wk.z[j] = s * static_cast<acc_t>(pdy[i]) * activate_grad<ACT>(s * z + t) + pc + qc * z;
          });
          std::fill(dxp.begin(), dxp.end(), acc_t(0));
          const acc_t* wc = pw + c * g.K * g.K;
          acc_t* dwc = pdw + nc * g.K * g.K;
          for (int64_t k = 0; k < g.K * g.K; ++k) dwc[k] = 0;
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            const acc_t* dz = wk.z.data() + oh * g.Wo;
            for (int64_t kh = 0; kh < g.K; ++kh) {
              const int64_t r = (oh * g.sh + kh * g.dh) * wk.Wp;
              for (int64_t kw = 0; kw < g.K; ++kw) {
                const acc_t* xr = wk.xp.data() + r + kw * g.dw;
                acc_t* dr = dxp.data() + r + kw * g.dw;
                const acc_t wv = wc[kh * g.K + kw];
                acc_t sum = 0;
                for (int64_t ow = 0; ow < g.Wo; ++ow) {
                  sum += dz[ow] * xr[ow * g.sw];
                  dr[ow * g.sw] += wv * dz[ow];
                }
                dwc[kh * g.K + kw] += sum;
              }
            }
          }
          scalar_t* dxb = pdx + wk.x_offset(n, c);
          for (int64_t ih = 0; ih < g.H; ++ih) {
            const acc_t* src = dxp.data() + (ih + g.ph) * wk.Wp + g.pw;
            for (int64_t iw = 0; iw < g.W; ++iw) dxb[ih * wk.xs_h + iw * wk.xs_w] = static_cast<scalar_t>(src[iw]);
          }
        }
      });
    });
    TORCH_CHECK(known, "unknown activation code ", act);
  });
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastblocks_ext, m) {
  m.def("dwconv_bn_stats(Tensor x, Tensor weight, int[] stride, int[] padding, int[] dilation)"
        " -> (Tensor mean, Tensor m2, Tensor count)");
  m.def("dwconv_affine_act_forward(Tensor x, Tensor weight, Tensor scale, Tensor shift, int[] stride, int[] padding,"
        " int[] dilation, int act) -> Tensor");
  m.def("dwconv_affine_act_grad_stats(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor shift,"
        " Tensor center, int[] stride, int[] padding, int[] dilation, int act) -> (Tensor sum_g, Tensor sum_gz)");
  m.def("dwconv_affine_act_backward(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor p,"
        " Tensor q, int[] stride, int[] padding, int[] dilation, int act) -> (Tensor dx, Tensor dweight)");
}

TORCH_LIBRARY_IMPL(fastblocks_ext, CPU, m) {
  m.impl("dwconv_bn_stats", &stats_cpu);
  m.impl("dwconv_affine_act_forward", &forward_cpu);
  m.impl("dwconv_affine_act_grad_stats", &grad_stats_cpu);
  m.impl("dwconv_affine_act_backward", &backward_cpu);
}

}  // namespace fastblocks
