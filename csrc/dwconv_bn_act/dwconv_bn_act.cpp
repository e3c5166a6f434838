// Depthwise conv + per-channel affine + activation, the building block of the fused
// depthwise conv + BatchNorm + activation op (fastblocks/ops/dwconv_bn_act.py):
//
//   z = dwconv(x, w)            per-channel K x K filter, any stride / padding / dilation
//   y = act(scale[c] * z + shift[c])
//
// Four raw kernels (schemas below; CPU kernels here, CUDA kernels in dwconv_bn_act_cuda.cu):
//   dwconv_bn_stats            mean and biased variance of z per channel   (training forward, phase 1)
//   dwconv_affine_act_forward  y                                           (training phase 2 and eval)
//   dwconv_affine_act_grad_stats  sums of g and g * (z - center), g = dy * act'(scale * z + shift)
//   dwconv_affine_act_backward dx and dw for dz = scale * g + p[c] + q[c] * z
// On CPU the two training passes are also one op each (dwconv_bn_act_train_forward / _backward, at the
// end of this file), the per-channel algebra between the kernels included; each keeps z from its first
// pass for its second instead of convolving twice.
// Reductions write per-partition partials (rows of a [P, C] tensor) and return them combined into
// per-channel values (here by loops; in the CUDA wrapper by combine_mean_m2 and sum(0)). Parameters
// (w, scale, shift, ...) are contiguous tensors in the accumulation dtype (fp32, or fp64 for fp64 x);
// x / y / dy keep x's dtype and are NCHW-contiguous or channels_last (y and dx keep x's layout).
//
// CPU schedules (memory-bound: one read of x and one write of y per pass, everything else in cache).
// NCHW: one (n, c) plane per task, copied into a zero-padded, stride-phase-split buffer so that every
// tap is a unit-stride vector over output columns. channels_last: one output row per task, vectors
// over channels, a tap list per pixel for the borders and blocks of neighbouring pixels inside.
// NCHW output planes of at most 12x12 pixels take the channels_last schedule on a copy (small_nchw_planes).
// The scale is folded into the weights (y = act(conv(x, scale * w) + shift)); explicit 64-byte
// vectors (cpu_simd.h) with several independent accumulators keep the FMAs off the latency chain.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "activations.h"
#include "cpu_simd.h"
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

constexpr int kMaxKernel = 7, kMaxTaps = kMaxKernel * kMaxKernel;

// Calls f(std::integral_constant<int, K>{}) for the kernel sizes make_geometry accepts (3, 5, 7).
template <typename F>
void dispatch_kernel_size(int64_t K, F&& f) {
  switch (K) {
    case 3: return f(std::integral_constant<int, 3>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, 7>{});
  }
}

// Zeros after the end of a per-channel table, so that a vector load of its last channels stays inside it.
constexpr int64_t kTableSlack = simd::lanes<float>;  // the widest vector, in elements

// The per-channel tables below are built by plain loops: a few ATen ops each would cost more than the
// kernel on a small layer.

// A per-channel table as the kernels read it (v: contiguous [C]): with slack for the channels_last
// vector loads.
at::Tensor channel_table(const at::Tensor& v, const DWGeometry& g) {
  if (!g.channels_last) return v;
  at::Tensor table = at::empty({g.C + kTableSlack}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "channel_table", [&] {
    scalar_t* out = std::copy_n(v.const_data_ptr<scalar_t>(), g.C, table.mutable_data_ptr<scalar_t>());
    std::fill_n(out, kTableSlack, scalar_t(0));
  });
  return table;
}

// The conv weight as the kernels read it, optionally with a per-channel scale folded in
// (scale * conv(x, w) = conv(x, scale * w)): [C, K*K] for NCHW, [K*K, C] (channels innermost, with
// slack) for channels_last.
at::Tensor weight_table(const at::Tensor& weight, const DWGeometry& g, const at::Tensor& scale = {}) {
  const int64_t KK = g.K * g.K;
  at::Tensor table = at::empty({KK * g.C + (g.channels_last ? kTableSlack : 0)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "weight_table", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();  // contiguous [C, 1, K, K] (make_geometry)
    const scalar_t* s = scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = table.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t t = 0; t < KK; ++t)
        out[g.channels_last ? t * g.C + c : c * KK + t] = s ? w[c * KK + t] * s[c] : w[c * KK + t];
    std::fill_n(out + KK * g.C, table.numel() - KK * g.C, scalar_t(0));
  });
  return table;
}

// g = dy * act'(s * z + t) on a run of n <= L values. `whole`: a full vector may be read at z and dy.
template <int ACT, typename scalar_t, typename acc_t>
FB_SIMD_INLINE std::pair<simd::vec<acc_t>, simd::vec<acc_t>> grad_through_act(const acc_t* z, const scalar_t* dy, int n,
                                                                              bool whole, const simd::vec<acc_t>& s,
                                                                              const simd::vec<acc_t>& t) {
  const simd::vec<acc_t> zv = simd::load_n<acc_t>(z, n, whole), dv = simd::load_n<acc_t>(dy, n, whole);
  return {dv * simd::activate_grad<ACT, acc_t>(s * zv + t), zv};
}

// dz = s * dy * act'(s * z + t) + p + q * z in place over z: the gradient of z through the activation
// and the BatchNorm. PER_CHANNEL: z / dy are [rows, C] with per-channel s, t, p, q (channels_last; the
// tables with slack); otherwise one channel's plane as [1, C = plane size] with the scalars at index 0.
// The vector of a per-channel parameter at channel c: channels c, c + 1, ... (PER_CHANNEL) or a[0].
template <bool PER_CHANNEL, typename acc_t>
FB_SIMD_INLINE simd::vec<acc_t> param(const acc_t* a, int64_t c) {
  if constexpr (PER_CHANNEL) return simd::load<acc_t>(a + c);
  return simd::broadcast(a[0]);
}

// With `kept` (laid out as z), g is read from it instead of recomputed from dy.
template <int ACT, bool PER_CHANNEL, typename scalar_t, typename acc_t>
FB_CPU_MULTIVERSION void dz_in_place(acc_t* z, const scalar_t* dy, int64_t rows, int64_t C, const acc_t* s,
                                     const acc_t* t, const acc_t* p, const acc_t* q, const acc_t* kept) {
  constexpr int L = simd::lanes<acc_t>;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* zr = z + r * C;
    const scalar_t* dr = dy + r * C;
    for (int64_t c = 0; c < C; c += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, C - c));
      const bool whole = n == L || r + 1 < rows;
      const auto sv = param<PER_CHANNEL>(s, c);
      const auto [gv, zv] = kept ? std::pair{simd::load_n<acc_t>(kept + r * C + c, n, whole),
                                             simd::load_n<acc_t>(zr + c, n, whole)}
                                 : grad_through_act<ACT>(zr + c, dr + c, n, whole, sv, param<PER_CHANNEL>(t, c));
      simd::store_n<acc_t>(zr + c, sv * gv + param<PER_CHANNEL>(p, c) + param<PER_CHANNEL>(q, c) * zv, n);
    }
  }
}

// y = act(s * y + t) in place over y, laid out as dz_in_place's z.
template <int ACT, bool PER_CHANNEL, typename acc_t>
FB_CPU_MULTIVERSION void affine_act_in_place(acc_t* y, int64_t rows, int64_t C, const acc_t* s, const acc_t* t) {
  constexpr int L = simd::lanes<acc_t>;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* yr = y + r * C;
    for (int64_t c = 0; c < C; c += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, C - c));
      const auto yv = simd::load_n<acc_t>(yr + c, n, n == L || r + 1 < rows);
      simd::store_activated<ACT, acc_t>(yr + c, param<PER_CHANNEL>(s, c) * yv + param<PER_CHANNEL>(t, c), n);
    }
  }
}

// The register-blocked unit-stride paths (conv_plane_rows, conv_row_block) are fully unrolled per
// kernel size and activation: they are compiled for fp32 only, where CPU speed matters; fp64 (gradcheck)
// and fp16 / bf16 storage take the generic loops, which keeps the extension's build time in check.
template <typename in_t, typename out_t>
constexpr bool register_blocked = std::is_same_v<in_t, float> && std::is_same_v<out_t, float>;

// ---- NCHW: one (n, c) plane per task -------------------------------------------------------------

// A zero-padded copy of one plane in acc_t, its columns split by phase modulo the W stride: padded
// column j lives in phase j % sw at position j / sw. For every tap the inputs of consecutive output
// columns are then consecutive in memory (stride 2 included), so the row loops are unit-stride
// vectors. A row's last vector may run into the next row (its extra lanes are discarded); one vector
// of slack at the end keeps that inside the buffer. The backward pads dz (stride 1) or accumulates dx
// (strided) in one too.
template <typename acc_t>
struct PaddedPlane {
  const DWGeometry& g;
  const int64_t Hp, Wq;
  std::vector<acc_t> buf;  // [sw, Hp, Wq]; the padding stays zero

  explicit PaddedPlane(const DWGeometry& geom)
      : g(geom), Hp(geom.H + 2 * geom.ph), Wq((geom.W + 2 * geom.pw + geom.sw - 1) / geom.sw),
        buf(geom.sw * Hp * Wq + simd::lanes<acc_t>, acc_t(0)) {}

  // Offset of padded element (row, col); the same tap's input for the next output column is at +1.
  int64_t offset(int64_t row, int64_t col) const { return ((col % g.sw) * Hp + row) * Wq + col / g.sw; }

  // Offsets of the K*K taps of output row 0; output row oh adds oh * row_step().
  template <int K>
  void tap_offsets(int64_t* off) const {
    for (int t = 0; t < K * K; ++t) off[t] = offset((t / K) * g.dh, (t % K) * g.dw);
  }
  int64_t row_step() const { return g.sh * Wq; }

  // Calls f(padded row of phase ph, matching plane row, q0, q1, offset): positions [q0, q1) of the
  // phase hold plane columns q * sw + offset.
  template <typename F>
  void for_each_row(F&& f) {
    for (int64_t phase = 0; phase < g.sw; ++phase) {
      const int64_t offset = phase - g.pw;  // plane column of position 0
      const int64_t q0 = offset >= 0 ? 0 : (-offset + g.sw - 1) / g.sw;
      const int64_t q1 = std::max(q0, std::min(Wq, (g.W - offset + g.sw - 1) / g.sw));
      for (int64_t ih = 0; ih < g.H; ++ih) f(buf.data() + (phase * Hp + ih + g.ph) * Wq, ih * g.W, q0, q1, offset);
    }
  }
  template <typename scalar_t>
  void load(const scalar_t* plane) {
    for_each_row([&](acc_t* row, int64_t base, int64_t q0, int64_t q1, int64_t off) {
      const scalar_t* src = plane + base + off;
      if (g.sw == 1)  // unit stride: a copy that vectorises (element by element it cost ~20 % of a 5x5 conv)
        std::copy(src + q0, src + q1, row + q0);
      else
        for (int64_t q = q0; q < q1; ++q) row[q] = static_cast<acc_t>(src[q * g.sw]);
    });
  }
  template <typename scalar_t>
  void store(scalar_t* plane) {
    for_each_row([&](acc_t* row, int64_t base, int64_t q0, int64_t q1, int64_t off) {
      for (int64_t q = q0; q < q1; ++q) plane[base + q * g.sw + off] = static_cast<scalar_t>(row[q]);
    });
  }
};

// Unit stride and dilation: R output rows of one vector of columns (n of them kept). Output row p's tap
// (kh, kw) reads padded row p + kh, so each input vector is loaded once for the (up to K) rows that read
// it: K * (R + K - 1) loads for R * K * K FMAs instead of one load per FMA. src: the padded input at the
// block's first row and column; out: the output at the same place.
template <int K, int R, int ACT, typename acc_t, typename out_t>
FB_SIMD_INLINE void conv_plane_rows(const acc_t* src, int64_t src_row, const acc_t* w, acc_t bias, out_t* out,
                                    int64_t out_row, int n) {
  simd::vec<acc_t> a[R];
  for (int p = 0; p < R; ++p) a[p] = simd::broadcast(bias);
#pragma GCC unroll 8
  for (int kw = 0; kw < K; ++kw)
#pragma GCC unroll 16
    for (int r = 0; r < R + K - 1; ++r) {
      const simd::vec<acc_t> v = simd::load<acc_t>(src + r * src_row + kw);
#pragma GCC unroll 8
      for (int kh = 0; kh < K; ++kh)
        if (r - kh >= 0 && r - kh < R) a[r - kh] += w[kh * K + kw] * v;
    }
  for (int p = 0; p < R; ++p) simd::store_activated<ACT, acc_t>(out + p * out_row, a[p], n);
}

// out[oh, ow] = act(bias + sum over taps of w[kh, kw] * x_pad[oh * sh + kh * dh, ow * sw + kw * dw]).
// Unit stride and dilation: blocks of 8, then 4 rows by conv_plane_rows. The rest is walked in vectors
// of L columns, kBlock vectors at a time (along the row, then on to the next rows): independent
// accumulators, so the FMAs of successive taps do not wait on each other.
template <int K, int ACT, typename acc_t, typename out_t>
FB_CPU_MULTIVERSION void conv_plane(PaddedPlane<acc_t>& xp, const acc_t* w, acc_t bias, out_t* out) {
  constexpr int L = simd::lanes<acc_t>, kBlock = 4;
  const DWGeometry& g = xp.g;
  int64_t oh = 0;
  if constexpr (register_blocked<acc_t, out_t>) {
    if (g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1) {
      auto rows = [&](auto r) FB_LAMBDA_INLINE {
        constexpr int R = decltype(r)::value;
        for (; oh + R <= g.Ho; oh += R)
          for (int64_t ow = 0; ow < g.Wo; ow += L)
            conv_plane_rows<K, R, ACT>(xp.buf.data() + oh * xp.Wq + ow, xp.Wq, w, bias, out + oh * g.Wo + ow, g.Wo,
                                       static_cast<int>(std::min<int64_t>(L, g.Wo - ow)));
      };
      rows(std::integral_constant<int, 8>{});
      rows(std::integral_constant<int, 4>{});
    }
  }
  int64_t off[K * K];
  xp.template tap_offsets<K>(off);
  const int64_t per_row = (g.Wo + L - 1) / L, total = g.Ho * per_row;
  for (int64_t v0 = oh * per_row, ow = 0; v0 < total; v0 += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, total - v0));
    int64_t in[kBlock] = {}, dst[kBlock];  // input offset of each vector's first tap-0 element, output offset
    int n[kBlock];
    for (int b = 0; b < kBlock; ++b) {
      in[b] = b < nb ? oh * xp.row_step() + ow : in[0];  // a block cut short repeats its first vector
      dst[b] = oh * g.Wo + ow;
      n[b] = static_cast<int>(std::min<int64_t>(L, g.Wo - ow));
      if (b < nb && (ow += L) >= g.Wo) ow = 0, ++oh;
    }
    simd::vec<acc_t> a[kBlock];
    for (int b = 0; b < kBlock; ++b) a[b] = simd::vec<acc_t>{} + bias;
    for (int t = 0; t < K * K; ++t) {
      const acc_t* src = xp.buf.data() + off[t];
      for (int b = 0; b < kBlock; ++b) a[b] += w[t] * simd::load<acc_t>(src + in[b]);
    }
    for (int b = 0; b < nb; ++b) simd::store_activated<ACT, acc_t>(out + dst[b], a[b], n[b]);
  }
}

// The adjoint of conv_plane (identity activation, dz given): dw[t] = sum of dz * the tap's input, and,
// unless dxp is null, dx_pad += w[t] * dz at each tap's input positions. A row's last vector of dz is
// zero past the row, so its extra lanes add nothing.
template <int K, typename acc_t>
FB_CPU_MULTIVERSION void conv_plane_backward(PaddedPlane<acc_t>& xp, PaddedPlane<acc_t>* dxp, const acc_t* dz,
                                             const acc_t* w, acc_t* dw) {
  constexpr int L = simd::lanes<acc_t>;
  const DWGeometry& g = xp.g;
  simd::vec<acc_t> dw_acc[K * K] = {};
  int64_t off[K * K];
  xp.template tap_offsets<K>(off);
  const acc_t* x_taps[K * K];
  acc_t* dx_taps[K * K];
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int t = 0; t < K * K; ++t) {
      x_taps[t] = xp.buf.data() + off[t] + oh * xp.row_step();
      dx_taps[t] = dxp ? dxp->buf.data() + off[t] + oh * xp.row_step() : nullptr;
    }
    for (int64_t ow = 0; ow < g.Wo; ow += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, g.Wo - ow));
      const acc_t* dr = dz + oh * g.Wo + ow;
      const simd::vec<acc_t> d = n == L ? simd::load<acc_t>(dr) : simd::load_partial<acc_t>(dr, n);
      for (int t = 0; t < K * K; ++t) {
        dw_acc[t] += d * simd::load<acc_t>(x_taps[t] + ow);
        if (dxp) simd::store(dx_taps[t] + ow, simd::load<acc_t>(dx_taps[t] + ow) + w[t] * d);
      }
    }
  }
  for (int t = 0; t < K * K; ++t) dw[t] = simd::reduce_add<acc_t>(dw_acc[t]);
}

// With stride 1, dx = conv_transpose(dz, w) is the convolution of dz, zero-padded by d * (K - 1) - p,
// with the flipped filter: a gather that runs as conv_plane. gt: that convolution's geometry.
bool transpose_as_conv(const DWGeometry& g, DWGeometry& gt) {
  if (g.sh != 1 || g.sw != 1 || g.ph > g.dh * (g.K - 1) || g.pw > g.dw * (g.K - 1)) return false;
  gt = g;
  gt.H = g.Ho, gt.W = g.Wo, gt.Ho = g.H, gt.Wo = g.W;
  gt.ph = g.dh * (g.K - 1) - g.ph, gt.pw = g.dw * (g.K - 1) - g.pw;
  return true;
}

// Mean and sum of squared deviations of n values (two passes over a plane in cache: no cancellation).
template <typename acc_t>
FB_CPU_MULTIVERSION void mean_m2(const acc_t* z, int64_t n, acc_t& mean, acc_t& m2) {
  acc_t sum = 0, sq = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += z[i];
  mean = sum / static_cast<acc_t>(n);
  const acc_t mu = mean;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < n; ++i) sq += (z[i] - mu) * (z[i] - mu);
  m2 = sq;
}

// Sums over one plane of g = dy * act'(s * z + t) and of g * (z - center); g also into g_out if given.
template <int ACT, typename scalar_t, typename acc_t>
FB_CPU_MULTIVERSION void grad_sums_plane(const acc_t* z, const scalar_t* dy, int64_t n, acc_t s, acc_t t,
                                         acc_t center, acc_t& sum_g, acc_t& sum_gz, acc_t* g_out) {
  constexpr int L = simd::lanes<acc_t>;
  const auto sv = simd::broadcast(s), tv = simd::broadcast(t), cv = simd::broadcast(center);
  simd::vec<acc_t> sg{}, sgz{};
  for (int64_t i = 0; i < n; i += L) {
    const int m = static_cast<int>(std::min<int64_t>(L, n - i));
    auto [gv, zv] = grad_through_act<ACT>(z + i, dy + i, m, m == L, sv, tv);
    if (g_out) simd::store_n<acc_t>(g_out + i, gv, m);
    gv = simd::keep_first<acc_t>(gv, m);
    sg += gv;
    sgz += gv * (zv - cv);
  }
  sum_g = simd::reduce_add<acc_t>(sg);
  sum_gz = simd::reduce_add<acc_t>(sgz);
}

// Runs f(x_plane, z_plane, n, c) for every (n, c) plane in parallel; x_plane holds the padded input,
// z_plane room for one output plane.
template <typename scalar_t, typename F>
void for_each_plane(const DWGeometry& g, const scalar_t* x, F&& f) {
  using acc_t = opmath_t<scalar_t>;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    PaddedPlane<acc_t> xp(g);
    std::vector<acc_t> z(g.Ho * g.Wo);
    for (int64_t nc = begin; nc < end; ++nc) {
      xp.load(x + nc * g.H * g.W);
      f(xp, z.data(), nc / g.C, nc % g.C);
    }
  });
}

// ---- channels_last: one output (or input) row of one image per task, a pixel's C channels innermost

// The taps of output pixel (oh, ow) inside the input: element offsets of their source pixels in the
// image and of their rows in a [K*K, C] weight table. Returns how many.
FB_SIMD_INLINE int output_taps(const DWGeometry& g, int64_t oh, int64_t ow, int64_t* x_off, int64_t* w_off) {
  int n = 0;
  for (int64_t kh = 0; kh < g.K; ++kh) {
    const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kw = 0; kw < g.K; ++kw) {
      const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      x_off[n] = (ih * g.W + iw) * g.C;
      w_off[n++] = (kh * g.K + kw) * g.C;
    }
  }
  return n;
}

// out[p * C + c] = act(bias[c] + sum over t < nt of wt[w_off[t] + c] * src[src_off[t] + p * pix_step + c])
// for P pixels with the same taps and kBlock vectors of channels from c = 0: P * kBlock independent
// accumulators (see conv_plane), and each weight vector loaded once for the P pixels.
template <int P, int kBlock, int ACT, typename src_t, typename acc_t, typename out_t>
FB_SIMD_INLINE void sum_taps_block(int nt, const src_t* src, int64_t pix_step, const int64_t* src_off, const acc_t* wt,
                                   const int64_t* w_off, const acc_t* bias, int64_t C, out_t* out) {
  constexpr int L = simd::lanes<acc_t>;
  simd::vec<acc_t> a[P][kBlock];
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < kBlock; ++b) a[p][b] = simd::load<acc_t>(bias + b * L);
  for (int t = 0; t < nt; ++t)
    for (int b = 0; b < kBlock; ++b) {
      const simd::vec<acc_t> w = simd::load<acc_t>(wt + w_off[t] + b * L);
      for (int p = 0; p < P; ++p) a[p][b] += w * simd::load<acc_t>(src + src_off[t] + p * pix_step + b * L);
    }
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < kBlock; ++b) simd::store_activated<ACT, acc_t>(out + p * C + b * L, a[p][b], L);
}

// out[c] = act(bias[c] + sum over t < nt of wt[w_off[t] + c] * src[src_off[t] + c]) for channels
// c_begin <= c < C of one pixel: whole vectors, then the last C % L channels as one more vector whose
// extra lanes read the next pixel's channels (and the tables' slack) and are not stored, unless that
// would read past src_end; then one by one.
template <int ACT, typename src_t, typename acc_t, typename out_t>
FB_SIMD_INLINE void sum_taps_nhwc(int nt, const src_t* src, const src_t* src_end, const int64_t* src_off,
                                  const acc_t* wt, const int64_t* w_off, const acc_t* bias, int64_t C, out_t* out,
                                  int64_t c_begin = 0) {
  constexpr int L = simd::lanes<acc_t>;
  int64_t c = c_begin;
  for (; c + 4 * L <= C; c += 4 * L)
    sum_taps_block<1, 4, ACT>(nt, src + c, 0, src_off, wt + c, w_off, bias + c, C, out + c);
  for (; c + L <= C; c += L) sum_taps_block<1, 1, ACT>(nt, src + c, 0, src_off, wt + c, w_off, bias + c, C, out + c);
  if (c == C) return;
  const int64_t last = nt > 0 ? *std::max_element(src_off, src_off + nt) : 0;
  if (src + last + c + L <= src_end) {
    simd::vec<acc_t> a = simd::load<acc_t>(bias + c);
    for (int t = 0; t < nt; ++t) a += simd::load<acc_t>(wt + w_off[t] + c) * simd::load<acc_t>(src + src_off[t] + c);
    return simd::store_activated<ACT, acc_t>(out + c, a, static_cast<int>(C - c));
  }
  for (; c < C; ++c) {
    acc_t a = bias[c];
    for (int t = 0; t < nt; ++t) a += wt[w_off[t] + c] * static_cast<acc_t>(src[src_off[t] + c]);
    out[c] = static_cast<out_t>(activate<ACT>(a));
  }
}

// Unit column stride and dilation: out[p, c] for kRowPixels neighbouring output pixels and one vector of
// channels, every column tap inside the image, kernel rows [kh_lo, kh_hi) inside it. Pixel p's tap kw
// reads input column p + kw, so each input vector is loaded once for the (up to K) pixels that read it
// and each weight vector once per row: (kRowPixels + K - 1) + K loads for K * kRowPixels FMAs, against
// one load per FMA through the tap lists. x: the block's first input pixel in kernel row kh_lo; wt: [K*K, C].
constexpr int kRowPixels = 8;  // independent accumulators: enough to cover the FMA latency

template <int K, int ACT, typename scalar_t, typename acc_t, typename out_t>
FB_SIMD_INLINE void conv_row_block(const scalar_t* x, int64_t row_step, int64_t C, int kh_lo, int kh_hi,
                                   const acc_t* wt, const acc_t* bias, out_t* out) {
  constexpr int L = simd::lanes<acc_t>;
  simd::vec<acc_t> a[kRowPixels];
  for (int p = 0; p < kRowPixels; ++p) a[p] = simd::load<acc_t>(bias);
  for (int kh = kh_lo; kh < kh_hi; ++kh) {
    const scalar_t* row = x + (kh - kh_lo) * row_step;
    simd::vec<acc_t> w[K];
    for (int kw = 0; kw < K; ++kw) w[kw] = simd::load<acc_t>(wt + (kh * K + kw) * C);
#pragma GCC unroll 16
    for (int j = 0; j < kRowPixels + K - 1; ++j) {
      const simd::vec<acc_t> v = simd::load<acc_t>(row + j * C);
#pragma GCC unroll 8
      for (int kw = 0; kw < K; ++kw)
        if (j - kw >= 0 && j - kw < kRowPixels) a[j - kw] += w[kw] * v;
    }
  }
  for (int p = 0; p < kRowPixels; ++p) simd::store_activated<ACT, acc_t>(out + p * C, a[p], L);
}

template <int K, int ACT, typename scalar_t, typename acc_t, typename out_t>
FB_SIMD_INLINE void conv_row_blocks(const DWGeometry& g, const scalar_t* x, int kh_lo, int kh_hi, const acc_t* wt,
                                    const acc_t* bias, int64_t C_vec, out_t* out) {
  constexpr int L = simd::lanes<acc_t>;
  for (int64_t c = 0; c < C_vec; c += L)
    conv_row_block<K, ACT>(x + c, g.dh * g.W * g.C, g.C, kh_lo, kh_hi, wt + c, bias + c, out + c);
}

// out[ow, c] = act(bias[c] + sum over taps of wt[tap, c] * x[tap's pixel, c]) for output row oh of
// one image (x_img: [H, W, C]; wt: [K*K, C]; out: [Wo, C]). Away from the left and right borders,
// neighbouring outputs have the same taps, shifted by sw pixels, and are computed together:
// kRowPixels at a time by conv_row_block with unit column stride and dilation, else kPixels through
// the tap lists.
template <int ACT, typename scalar_t, typename acc_t, typename out_t>
FB_CPU_MULTIVERSION void conv_row_nhwc(const DWGeometry& g, const scalar_t* x_img, const acc_t* wt, const acc_t* bias,
                                       int64_t oh, out_t* out) {
  constexpr int L = simd::lanes<acc_t>, kPixels = 4;
  const int64_t C = g.C, C_vec = C - C % L, pix_step = g.sw * C;
  const scalar_t* x_end = x_img + g.H * g.W * C;
  // outputs [ow_lo, ow_hi) have every tap column inside the input
  const int64_t ow_lo = (g.pw + g.sw - 1) / g.sw;
  const int64_t ow_hi = g.W - 1 + g.pw - (g.K - 1) * g.dw >= 0 ? (g.W - 1 + g.pw - (g.K - 1) * g.dw) / g.sw + 1 : 0;
  // kernel rows [kh_lo, kh_hi) read rows inside the input
  const int64_t ih0 = oh * g.sh - g.ph;
  int kh_lo = 0, kh_hi = static_cast<int>(g.K);
  while (kh_lo < kh_hi && ih0 + kh_lo * g.dh < 0) ++kh_lo;
  while (kh_hi > kh_lo && ih0 + (kh_hi - 1) * g.dh >= g.H) --kh_hi;
  const bool unit_columns = g.sw == 1 && g.dw == 1;
  int64_t x_off[kMaxTaps], w_off[kMaxTaps];
  for (int64_t ow = 0; ow < g.Wo;) {
    const int nt = output_taps(g, oh, ow, x_off, w_off);
    if (register_blocked<scalar_t, out_t> && unit_columns && ow >= ow_lo && ow + kRowPixels <= ow_hi) {
      if constexpr (register_blocked<scalar_t, out_t>) {
        const scalar_t* x = x_img + ((ih0 + kh_lo * g.dh) * g.W + ow - g.pw) * C;
        out_t* o = out + ow * C;
        switch (g.K) {
          case 3: conv_row_blocks<3, ACT>(g, x, kh_lo, kh_hi, wt, bias, C_vec, o); break;
          case 5: conv_row_blocks<5, ACT>(g, x, kh_lo, kh_hi, wt, bias, C_vec, o); break;
          default: conv_row_blocks<7, ACT>(g, x, kh_lo, kh_hi, wt, bias, C_vec, o); break;
        }
      }
      for (int p = 0; C_vec < C && p < kRowPixels; ++p)
        sum_taps_nhwc<ACT>(nt, x_img + p * C, x_end, x_off, wt, w_off, bias, C, out + (ow + p) * C, C_vec);
      ow += kRowPixels;
    } else if (ow >= ow_lo && ow + kPixels <= ow_hi) {
      for (int64_t c = 0; c < C_vec; c += L)
        sum_taps_block<kPixels, 1, ACT>(nt, x_img + c, pix_step, x_off, wt + c, w_off, bias + c, C, out + ow * C + c);
      for (int p = 0; C_vec < C && p < kPixels; ++p)
        sum_taps_nhwc<ACT>(nt, x_img + p * pix_step, x_end, x_off, wt, w_off, bias, C, out + (ow + p) * C, C_vec);
      ow += kPixels;
    } else {
      sum_taps_nhwc<ACT>(nt, x_img, x_end, x_off, wt, w_off, bias, C, out + ow * C);
      ++ow;
    }
  }
}

// dx[iw, c] = sum over the output pixels that read (ih, iw) of wt[tap, c] * dz[pixel, c], for input row
// ih of one image (dz_img: [Ho, Wo, C]; zero: C zeros). Those pixels are the output rows that read
// input row ih crossed with the output columns that read column iw, each found once per row.
template <typename scalar_t, typename acc_t>
FB_CPU_MULTIVERSION void input_grad_row_nhwc(const DWGeometry& g, const acc_t* dz_img, const acc_t* wt,
                                             const acc_t* zero, int64_t ih, scalar_t* dx) {
  int64_t out_rows[kMaxKernel], row_kh[kMaxKernel];
  int nr = 0;
  for (int64_t kh = 0; kh < g.K; ++kh) {
    const int64_t oh_s = ih + g.ph - kh * g.dh;
    if (oh_s >= 0 && oh_s % g.sh == 0 && oh_s / g.sh < g.Ho) out_rows[nr] = oh_s / g.sh, row_kh[nr++] = kh;
  }
  std::vector<int64_t> out_col(g.W * g.K);  // output column reading (iw, kw), or -1
  for (int64_t iw = 0; iw < g.W; ++iw)
    for (int64_t kw = 0; kw < g.K; ++kw) {
      const int64_t ow_s = iw + g.pw - kw * g.dw;
      out_col[iw * g.K + kw] = ow_s >= 0 && ow_s % g.sw == 0 && ow_s / g.sw < g.Wo ? ow_s / g.sw : -1;
    }
  int64_t y_off[kMaxTaps], w_off[kMaxTaps];
  for (int64_t iw = 0; iw < g.W; ++iw) {
    int nt = 0;
    for (int r = 0; r < nr; ++r)
      for (int64_t kw = 0; kw < g.K; ++kw) {
        const int64_t ow = out_col[iw * g.K + kw];
        if (ow < 0) continue;
        y_off[nt] = (out_rows[r] * g.Wo + ow) * g.C;
        w_off[nt++] = (row_kh[r] * g.K + kw) * g.C;
      }
    sum_taps_nhwc<kIdentity>(nt, dz_img, dz_img + g.Ho * g.Wo * g.C, y_off, wt, w_off, zero, g.C, dx + iw * g.C);
  }
}

// out[b * L + j] += sum over i < n of d[i * d_step + b * L + j] * x[i * x_step + b * L + j]: kBlock
// vectors of channels summed down a column of pixels in registers.
template <int kBlock, typename scalar_t, typename acc_t>
FB_SIMD_INLINE void column_dot(const acc_t* d, int64_t d_step, const scalar_t* x, int64_t x_step, int64_t n,
                               acc_t* out) {
  constexpr int L = simd::lanes<acc_t>;
  simd::vec<acc_t> a[kBlock] = {};
  for (int64_t i = 0; i < n; ++i)
    for (int b = 0; b < kBlock; ++b)
      a[b] += simd::load<acc_t>(d + i * d_step + b * L) * simd::load<acc_t>(x + i * x_step + b * L);
  for (int b = 0; b < kBlock; ++b) simd::store(out + b * L, simd::load<acc_t>(out + b * L) + a[b]);
}

// dw[tap, c] += sum over output row oh of dz[ow, c] * x[tap's pixel, c]. For each tap the output
// columns whose input lies inside the image are one range, reduced in registers (no stores per pixel).
template <typename scalar_t, typename acc_t>
FB_CPU_MULTIVERSION void weight_grad_row_nhwc(const DWGeometry& g, const scalar_t* x_img, const acc_t* dz, int64_t oh,
                                              acc_t* dw) {
  constexpr int L = simd::lanes<acc_t>;
  const int64_t C = g.C, x_step = g.sw * C;
  for (int64_t kh = 0; kh < g.K; ++kh) {
    const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kw = 0; kw < g.K; ++kw) {
      const int64_t lead = g.pw - kw * g.dw;  // input column of output ow: ow * sw - lead
      const int64_t ow_a = lead > 0 ? (lead + g.sw - 1) / g.sw : 0;
      const int64_t ow_b = std::min(g.Wo, g.W - 1 + lead >= 0 ? (g.W - 1 + lead) / g.sw + 1 : 0);
      if (ow_a >= ow_b) continue;
      const scalar_t* x = x_img + (ih * g.W + ow_a * g.sw - lead) * C;
      const acc_t* d = dz + ow_a * C;
      acc_t* dwt = dw + (kh * g.K + kw) * C;
      int64_t c = 0;
      for (; c + 4 * L <= C; c += 4 * L) column_dot<4>(d + c, C, x + c, x_step, ow_b - ow_a, dwt + c);
      for (; c + L <= C; c += L) column_dot<1>(d + c, C, x + c, x_step, ow_b - ow_a, dwt + c);
      for (; c < C; ++c) {
        acc_t sum = 0;
        for (int64_t i = 0; i < ow_b - ow_a; ++i) sum += d[i * C + c] * static_cast<acc_t>(x[i * x_step + c]);
        dwt[c] += sum;
      }
    }
  }
}

// Per-channel sums over the rows of a ([rows, C]).
template <typename acc_t>
FB_CPU_MULTIVERSION void column_sums(const acc_t* a, int64_t rows, int64_t C, acc_t* sum) {
  std::fill(sum, sum + C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sum[c] += a[r * C + c];
}

// Per-channel mean and sum of squared deviations over the rows of z ([rows, C]).
template <typename acc_t>
FB_CPU_MULTIVERSION void column_mean_m2(const acc_t* z, int64_t rows, int64_t C, acc_t* mean, acc_t* m2) {
  column_sums(z, rows, C, mean);
  for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<acc_t>(rows);
  std::fill(m2, m2 + C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) m2[c] += (z[r * C + c] - mean[c]) * (z[r * C + c] - mean[c]);
}

// Per-channel sums over the rows of g = dy * act'(s * z + t) and of g * (z - center) (z, dy: [rows, C];
// s, t, center with slack); g also into g_out ([rows, C]) if given.
template <int ACT, typename scalar_t, typename acc_t>
FB_CPU_MULTIVERSION void column_grad_sums(const acc_t* z, const scalar_t* dy, int64_t rows, int64_t C, const acc_t* s,
                                          const acc_t* t, const acc_t* center, acc_t* sum_g, acc_t* sum_gz,
                                          acc_t* g_out) {
  constexpr int L = simd::lanes<acc_t>;
  for (int64_t c = 0; c < C; c += L) {  // channel vectors outer: the sums stay in registers
    const int n = static_cast<int>(std::min<int64_t>(L, C - c));
    const auto sv = simd::load<acc_t>(s + c), tv = simd::load<acc_t>(t + c), cv = simd::load<acc_t>(center + c);
    simd::vec<acc_t> sg{}, sgz{};
    for (int64_t r = 0; r < rows; ++r) {
      auto [gv, zv] = grad_through_act<ACT>(z + r * C + c, dy + r * C + c, n, n == L || r + 1 < rows, sv, tv);
      if (g_out) simd::store_n<acc_t>(g_out + r * C + c, gv, n);
      gv = simd::keep_first<acc_t>(gv, n);
      sg += gv;
      sgz += gv * (zv - cv);
    }
    simd::store_n<acc_t>(sum_g + c, sg, n);
    simd::store_n<acc_t>(sum_gz + c, sgz, n);
  }
}

// Per-channel mean and biased variance of P partitions of n values each from their means and M2s
// ([P, C]; Chan et al.: M2 = sum of the M2s + n * sum of (partition mean - mean)^2).
template <typename acc_t>
void combine_partitions(const acc_t* mean_p, const acc_t* m2_p, int64_t P, int64_t C, int64_t n, acc_t* mean,
                        acc_t* var) {
  std::vector<acc_t> spread(C);
  column_mean_m2(mean_p, P, C, mean, spread.data());
  column_sums(m2_p, P, C, var);
  for (int64_t c = 0; c < C; ++c) var[c] = (var[c] + static_cast<acc_t>(n) * spread[c]) / static_cast<acc_t>(P * n);
}

// Runs f(z_row, n, oh, partition) over every output row (n, oh) in parallel, with z_row room for one
// row ([Wo, C], acc_t).
template <typename acc_t, typename F>
void for_each_output_row(const DWGeometry& g, F&& f) {
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(g.Wo * g.C);
    for (int64_t row = begin; row < end; ++row) f(z.data(), row / g.Ho, row % g.Ho, row);
  });
}

// ---- the four kernels ----------------------------------------------------------------------------
// Reductions write partials per partition: per image (NCHW) or per output row (channels_last).

// NCHW inputs with small output planes run the channels_last schedule on channels_last copies: a 3x3
// to 12x12 plane fills few lanes of a row vector and pays the per-plane setup (padded copy, reductions)
// for a few dozen FMAs, while vectors over channels stay full. Measured on MobileNetV2's layers (one
// thread, copies included): up to 4x forward and 7x backward at 3x3 to 6x6, about even at 12x12 stride 1,
// backward 1.5x at 12x12 stride 2; from 14x14 on the copies cost more than they save.
constexpr int64_t kSmallPlane = 12 * 12;

bool small_nchw_planes(const DWGeometry& g) {
  return !g.channels_last && g.C > 1 && g.H * g.W > 1 && g.Ho * g.Wo <= kSmallPlane;
}

// dst[n, j, i] = src[n, i, j] for [N, R, S] src, in 8 x 8 blocks that the compiler unrolls (aten's
// strided copy moves ~0.5 ns per element here, a plain tiled loop ~0.8, this ~0.3).
template <typename scalar_t>
void transpose_images(const scalar_t* src, scalar_t* dst, int64_t N, int64_t R, int64_t S) {
  constexpr int B = 8;
  const int64_t bands = (R + B - 1) / B;  // a task: B rows of one image's [R, S]
  at::parallel_for(0, N * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, i0 = (task % bands) * B;
      const scalar_t* __restrict s = src + n * R * S;
      scalar_t* __restrict d = dst + n * R * S;
      int64_t j0 = 0;
      if (i0 + B <= R)
        for (; j0 + B <= S; j0 += B)
          for (int j = 0; j < B; ++j)
            for (int i = 0; i < B; ++i) d[(j0 + j) * R + i0 + i] = s[(i0 + i) * S + j0 + j];
      for (int64_t i = i0; i < std::min(R, i0 + B); ++i)
        for (int64_t j = j0; j < S; ++j) d[j * R + i] = s[i * S + j];
    }
  });
}

// t (NCHW-contiguous) as a channels_last copy, or, with to_nchw, t (channels_last) as an NCHW copy.
at::Tensor relayout(const at::Tensor& t, bool to_nchw = false) {
  at::Tensor out = at::empty_like(t, to_nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  FB_DISPATCH_FLOATING_TYPES(t.scalar_type(), "relayout", [&] {
    transpose_images(t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, to_nchw ? HW : C,
                     to_nchw ? C : HW);
  });
  return out;
}

// The statistics of z = dwconv(x, w); with a defined z_out (x's dtype and the output's shape and
// layout, acc_t storage only) z is also stored there.
std::tuple<at::Tensor, at::Tensor> stats_impl(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                              const at::Tensor& z_out) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  if (g.N * g.Ho * g.Wo == 0) {  // statistics of no values, as torch.mean / torch.var of an empty tensor
    const at::Tensor nan = at::full({g.C}, std::numeric_limits<double>::quiet_NaN(), weight.options());
    return {nan, nan.clone()};
  }
  TORCH_CHECK(!z_out.defined() || (z_out.scalar_type() == weight.scalar_type() && !small_nchw_planes(g)),
              "stats_impl: z_out must be stored in the accumulation dtype, without the small-plane relayout");
  if (small_nchw_planes(g)) return stats_impl(relayout(x), weight, stride, padding, dilation, z_out);
  const int64_t P = g.channels_last ? g.N * g.Ho : g.N;
  const int64_t per_partition = g.channels_last ? g.Wo : g.Ho * g.Wo;
  at::Tensor mean_p = at::empty({P, g.C}, weight.options()), m2_p = at::empty_like(mean_p);
  at::Tensor mean = at::empty({g.C}, weight.options()), var = at::empty_like(mean);
  const at::Tensor wt = weight_table(weight, g);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bn_stats_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const acc_t* pw = wt.const_data_ptr<acc_t>();
    acc_t *pmean = mean_p.mutable_data_ptr<acc_t>(), *pm2 = m2_p.mutable_data_ptr<acc_t>();
    acc_t* pz = nullptr;  // z's output rows / planes, or the tasks' scratch buffers
    if constexpr (std::is_same_v<scalar_t, acc_t>) pz = z_out.defined() ? z_out.mutable_data_ptr<acc_t>() : nullptr;
    if (g.channels_last) {
      const std::vector<acc_t> zero(g.C + kTableSlack, acc_t(0));
      for_each_output_row<acc_t>(g, [&](acc_t* z, int64_t n, int64_t oh, int64_t row) {
        if (pz) z = pz + row * g.Wo * g.C;
        conv_row_nhwc<kIdentity>(g, px + n * g.H * g.W * g.C, pw, zero.data(), oh, z);
        column_mean_m2(z, g.Wo, g.C, pmean + row * g.C, pm2 + row * g.C);
      });
    } else {
      dispatch_kernel_size(g.K, [&](auto k) {
        constexpr int K = decltype(k)::value;
        for_each_plane(g, px, [&](PaddedPlane<acc_t>& xp, acc_t* z, int64_t n, int64_t c) {
          if (pz) z = pz + (n * g.C + c) * g.Ho * g.Wo;
          conv_plane<K, kIdentity>(xp, pw + c * K * K, acc_t(0), z);
          mean_m2(z, g.Ho * g.Wo, pmean[n * g.C + c], pm2[n * g.C + c]);
        });
      });
    }
    combine_partitions(pmean, pm2, P, g.C, per_partition, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  return stats_impl(x, weight, stride, padding, dilation, {});
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  dwconv::check_channel_param(scale, x, g, "scale");
  dwconv::check_channel_param(shift, x, g, "shift");
  if (small_nchw_planes(g))
    return relayout(forward_cpu(relayout(x), weight, scale, shift, stride, padding, dilation, act), true);
  at::Tensor y = dwconv::empty_output(x, g);
  if (y.numel() == 0) return y;
  const at::Tensor wt = weight_table(weight, g, scale), bias = channel_table(shift, g);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_affine_act_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const acc_t *pw = wt.const_data_ptr<acc_t>(), *pt = bias.const_data_ptr<acc_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    const bool known = dispatch_activation(act, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      if (g.channels_last) {
        at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row)
            conv_row_nhwc<ACT>(g, px + (row / g.Ho) * g.H * g.W * g.C, pw, pt, row % g.Ho, py + row * g.Wo * g.C);
        });
        return;
      }
      dispatch_kernel_size(g.K, [&](auto k) {
        constexpr int K = decltype(k)::value;
        for_each_plane(g, px, [&](PaddedPlane<acc_t>& xp, acc_t*, int64_t n, int64_t c) {
          conv_plane<K, ACT>(xp, pw + c * K * K, pt[c], py + (n * g.C + c) * g.Ho * g.Wo);
        });
      });
    });
    TORCH_CHECK(known, "unknown activation code ", act);
  });
  return y;
}

// With a defined z_out (the accumulation dtype, one value per output element, in the output's layout)
// the conv output z is also stored there, for backward_impl to reuse; with a defined g_out (x's shape,
// the accumulation dtype) g is stored in it, laid out as backward_impl's kept_g reads it.
std::tuple<at::Tensor, at::Tensor> grad_stats_impl(const at::Tensor& grad, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& scale,
                                                   const at::Tensor& shift, const at::Tensor& center,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t act, const at::Tensor& z_out,
                                                   const at::Tensor& g_out) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  dwconv::check_channel_param(scale, x, g, "scale");
  dwconv::check_channel_param(shift, x, g, "shift");
  dwconv::check_channel_param(center, x, g, "center");
  dwconv::check_grad(grad, x, g);
  TORCH_CHECK(!z_out.defined() || !small_nchw_planes(g), "grad_stats_impl: z_out with the small-plane relayout");
  if (small_nchw_planes(g))
    return grad_stats_impl(relayout(grad), relayout(x), weight, scale, shift, center, stride, padding, dilation, act,
                           z_out, g_out);
  const int64_t P = g.channels_last ? g.N * g.Ho : g.N;
  at::Tensor sum_g_p = at::empty({P, g.C}, weight.options()), sum_gz_p = at::empty_like(sum_g_p);
  at::Tensor sum_g = at::empty({g.C}, weight.options()), sum_gz = at::empty_like(sum_g);
  const at::Tensor wt = weight_table(weight, g);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_affine_act_grad_stats_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pdy = grad.const_data_ptr<scalar_t>();
    const at::Tensor s_t = channel_table(scale, g), t_t = channel_table(shift, g), c_t = channel_table(center, g);
    const acc_t *pw = wt.const_data_ptr<acc_t>(), *ps = s_t.const_data_ptr<acc_t>(), *pt = t_t.const_data_ptr<acc_t>(),
                *pc = c_t.const_data_ptr<acc_t>();
    acc_t *psg = sum_g_p.mutable_data_ptr<acc_t>(), *psgz = sum_gz_p.mutable_data_ptr<acc_t>();
    acc_t* pz = z_out.defined() ? z_out.mutable_data_ptr<acc_t>() : nullptr;  // else the tasks' scratch rows / planes
    acc_t* pg = g_out.defined() ? g_out.mutable_data_ptr<acc_t>() : nullptr;
    const bool known = dispatch_activation(act, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      if (g.channels_last) {
        const std::vector<acc_t> zero(g.C + kTableSlack, acc_t(0));
        for_each_output_row<acc_t>(g, [&](acc_t* z, int64_t n, int64_t oh, int64_t row) {
          if (pz) z = pz + row * g.Wo * g.C;
          conv_row_nhwc<kIdentity>(g, px + n * g.H * g.W * g.C, pw, zero.data(), oh, z);
          column_grad_sums<ACT>(z, pdy + row * g.Wo * g.C, g.Wo, g.C, ps, pt, pc, psg + row * g.C, psgz + row * g.C,
                                pg ? pg + row * g.Wo * g.C : nullptr);
        });
        return;
      }
      dispatch_kernel_size(g.K, [&](auto k) {
        constexpr int K = decltype(k)::value;
        for_each_plane(g, px, [&](PaddedPlane<acc_t>& xp, acc_t* z, int64_t n, int64_t c) {
          const int64_t nc = n * g.C + c;
          if (pz) z = pz + nc * g.Ho * g.Wo;
          conv_plane<K, kIdentity>(xp, pw + c * K * K, acc_t(0), z);
          grad_sums_plane<ACT>(z, pdy + nc * g.Ho * g.Wo, g.Ho * g.Wo, ps[c], pt[c], pc[c], psg[nc], psgz[nc],
                               pg ? pg + nc * g.H * g.W : nullptr);
        });
      });
    });
    TORCH_CHECK(known, "unknown activation code ", act);
    column_sums(psg, P, g.C, sum_g.mutable_data_ptr<acc_t>());
    column_sums(psgz, P, g.C, sum_gz.mutable_data_ptr<acc_t>());
  });
  return {sum_g, sum_gz};
}

// dz = scale * dy * act'(scale * z + shift) + p + q * z (z recomputed); dx = conv_transpose(dz, w) and
// partial dw = sum of dz * the tap's input. NCHW: per plane, dw partials per image. channels_last: dz
// of every pixel first (an fp32 buffer the size of y) with dw partials per block of rows, then dx by
// input row, gathering from dz.
std::tuple<at::Tensor, at::Tensor> grad_stats_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& scale, const at::Tensor& shift,
                                                  const at::Tensor& center, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  return grad_stats_impl(grad, x, weight, scale, shift, center, stride, padding, dilation, act, {}, {});
}

// With a defined z (grad_stats_impl's z_out), the conv output is read from it instead of recomputed
// from x, and dz is formed in place over it. With a defined kept_g (grad_stats_impl's g_out), g is read
// from it, and dx is written into it: g of an output row (channels_last) or plane (NCHW) lies where dx
// of that row / plane goes, and every dz that reads it is formed before that dx is written.
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                 const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& p,
                                                 const at::Tensor& q, at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t act, const at::Tensor& z,
                                                 const at::Tensor& kept_g) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  for (auto [t, name] : {std::pair{&scale, "scale"}, {&shift, "shift"}, {&p, "p"}, {&q, "q"}})
    dwconv::check_channel_param(*t, x, g, name);
  dwconv::check_grad(grad, x, g);
  TORCH_CHECK(!z.defined() || !small_nchw_planes(g), "backward_impl: z with the small-plane relayout");
  TORCH_CHECK(!kept_g.defined() || z.defined(), "backward_impl: kept_g without z");
  if (small_nchw_planes(g)) {
    auto [dx, dw] = backward_impl(relayout(grad), relayout(x), weight, scale, shift, p, q, stride, padding, dilation,
                                  act, z, kept_g);
    return {relayout(dx, true), dw};
  }
  const int64_t rows = g.N * g.Ho;
  const int64_t P = g.channels_last ? std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads())) : g.N;
  at::Tensor dx = kept_g.defined() ? kept_g : at::empty_like(x);
  at::Tensor dw_p = at::empty({P, g.C, g.K, g.K}, weight.options()), dw = at::empty_like(weight);
  const at::Tensor wt = weight_table(weight, g);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_affine_act_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pdy = grad.const_data_ptr<scalar_t>();
    const at::Tensor s_t = channel_table(scale, g), t_t = channel_table(shift, g), p_t = channel_table(p, g),
                     q_t = channel_table(q, g);
    const acc_t *pw = wt.const_data_ptr<acc_t>(), *ps = s_t.const_data_ptr<acc_t>(), *pt = t_t.const_data_ptr<acc_t>(),
                *pp = p_t.const_data_ptr<acc_t>(), *pq = q_t.const_data_ptr<acc_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    const acc_t* pdx_acc = kept_g.defined() ? kept_g.const_data_ptr<acc_t>() : nullptr;  // g, until dx is written
    acc_t* pdw = dw_p.mutable_data_ptr<acc_t>();
    const bool known = dispatch_activation(act, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      if (g.channels_last) {
        const int64_t KK = g.K * g.K, row_len = g.Wo * g.C;
        const std::vector<acc_t> zero(g.C + kTableSlack, acc_t(0));
        at::Tensor dz = z.defined() ? z : at::empty({rows, row_len}, weight.options());
        acc_t* pdz = dz.mutable_data_ptr<acc_t>();
        at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> dw_block(KK * g.C);
          for (int64_t part = begin; part < end; ++part) {
            std::fill(dw_block.begin(), dw_block.end(), acc_t(0));
            for (int64_t row = part * rows / P; row < (part + 1) * rows / P; ++row) {
              const int64_t n = row / g.Ho, oh = row % g.Ho;
              acc_t* zr = pdz + row * row_len;
              if (!z.defined()) conv_row_nhwc<kIdentity>(g, px + n * g.H * g.W * g.C, pw, zero.data(), oh, zr);
              dz_in_place<ACT, true>(zr, pdy + row * row_len, g.Wo, g.C, ps, pt, pp, pq,
                                     kept_g.defined() ? pdx_acc + row * row_len : nullptr);
              weight_grad_row_nhwc(g, px + n * g.H * g.W * g.C, zr, oh, dw_block.data());
            }
            for (int64_t c = 0; c < g.C; ++c)
              for (int64_t t = 0; t < KK; ++t) pdw[(part * g.C + c) * KK + t] = dw_block[t * g.C + c];
          }
        });
        at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row)
            input_grad_row_nhwc(g, pdz + (row / g.H) * g.Ho * row_len, pw, zero.data(), row % g.H,
                                pdx + row * g.W * g.C);
        });
        return;
      }
      dispatch_kernel_size(g.K, [&](auto k) {
        constexpr int K = decltype(k)::value;
        DWGeometry gt;
        const bool gather = transpose_as_conv(g, gt);
        acc_t* pz = z.defined() ? z.mutable_data_ptr<acc_t>() : nullptr;
        at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
          // dxp: the padded dz to gather from (stride 1), else the padded dx to scatter into
          PaddedPlane<acc_t> xp(g), dxp(gather ? gt : g);
          std::vector<acc_t> scratch(pz ? 0 : g.Ho * g.Wo);
          acc_t flipped[K * K];
          for (int64_t nc = begin; nc < end; ++nc) {
            const int64_t c = nc % g.C;
            const acc_t* wc = pw + c * K * K;
            xp.load(px + nc * g.H * g.W);
            acc_t* zp = pz ? pz + nc * g.Ho * g.Wo : scratch.data();
            if (!pz) conv_plane<K, kIdentity>(xp, wc, acc_t(0), zp);
            dz_in_place<ACT, false>(zp, pdy + nc * g.Ho * g.Wo, 1, g.Ho * g.Wo, ps + c, pt + c, pp + c, pq + c,
                                    kept_g.defined() ? pdx_acc + nc * g.H * g.W : nullptr);
            if (gather) {
              conv_plane_backward<K>(xp, static_cast<PaddedPlane<acc_t>*>(nullptr), zp, wc, pdw + nc * K * K);
              dxp.load(zp);
              for (int t = 0; t < K * K; ++t) flipped[t] = wc[K * K - 1 - t];
              conv_plane<K, kIdentity>(dxp, flipped, acc_t(0), pdx + nc * g.H * g.W);
            } else {
              std::fill(dxp.buf.begin(), dxp.buf.end(), acc_t(0));
              conv_plane_backward<K>(xp, &dxp, zp, wc, pdw + nc * K * K);
              dxp.store(pdx + nc * g.H * g.W);
            }
          }
        });
      });
    });
    TORCH_CHECK(known, "unknown activation code ", act);
    column_sums(pdw, P, weight.numel(), dw.mutable_data_ptr<acc_t>());
  });
  return {dx, dw};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& p,
                                                const at::Tensor& q, at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t act) {
  return backward_impl(grad, x, weight, scale, shift, p, q, stride, padding, dilation, act, {}, {});
}

// ---- the training passes as one op each (CPU) ---------------------------------------------------
// The same kernels, with the per-channel algebra between them (invstd, the affine fold, the BN backward
// coefficients of fastblocks/ops/dwconv_bn_act.py) as loops over C instead of a dozen tiny ATen calls
// from Python, and small NCHW planes relayouted once per pass instead of once per kernel.

// (scale, shift) = (gamma * invstd, beta - mean * gamma * invstd): the BN affine in the kernels' form.
std::pair<at::Tensor, at::Tensor> train_affine(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                               const at::Tensor& invstd) {
  at::Tensor scale = at::empty_like(gamma), shift = at::empty_like(gamma);
  AT_DISPATCH_FLOATING_TYPES(gamma.scalar_type(), "dwconv_bn_train_affine", [&] {
    const scalar_t *pg = gamma.const_data_ptr<scalar_t>(), *pb = beta.const_data_ptr<scalar_t>(),
                   *pm = mean.const_data_ptr<scalar_t>(), *pi = invstd.const_data_ptr<scalar_t>();
    scalar_t *ps = scale.mutable_data_ptr<scalar_t>(), *pt = shift.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < gamma.numel(); ++c) {
      ps[c] = pg[c] * pi[c];
      pt[c] = pb[c] - pm[c] * ps[c];
    }
  });
  return {scale, shift};
}

// y = act(scale * y + shift) in place (y: a dwconv output, fp32 / fp64).
void normalise_in_place(at::Tensor& y, const DWGeometry& g, const at::Tensor& scale, const at::Tensor& shift,
                        int64_t act) {
  const at::Tensor s = channel_table(scale, g), t = channel_table(shift, g);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dwconv_bn_normalise_in_place", [&] {
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    const scalar_t *ps = s.const_data_ptr<scalar_t>(), *pt = t.const_data_ptr<scalar_t>();
    const int64_t plane = g.Ho * g.Wo;
    const bool known = dispatch_activation(act, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      if (g.channels_last) {  // tasks of output rows [Wo, C]
        at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
          affine_act_in_place<ACT, true>(py + begin * g.Wo * g.C, (end - begin) * g.Wo, g.C, ps, pt);
        });
      } else {  // tasks of planes, each one row of its channel
        at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
          for (int64_t nc = begin; nc < end; ++nc)
            affine_act_in_place<ACT, false>(py + nc * plane, 1, plane, ps + nc % g.C, pt + nc % g.C);
        });
      }
    });
    TORCH_CHECK(known, "unknown activation code ", act);
  });
}

// y = act(BN(dwconv(x, w))) with batch statistics; returns (y, mean, invstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const at::Tensor& gamma, const at::Tensor& beta,
                                                                 double eps, at::IntArrayRef stride,
                                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                 int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  dwconv::check_channel_param(gamma, x, g, "bn_weight");
  dwconv::check_channel_param(beta, x, g, "bn_bias");
  if (small_nchw_planes(g)) {
    auto [y, mean, invstd] = train_forward_cpu(relayout(x), weight, gamma, beta, eps, stride, padding, dilation, act);
    return {relayout(y, true), mean, invstd};
  }
  // The statistics pass stores z in y and y is normalised in place: one conv, |x| + 3 |z| bytes, rather
  // than a second conv from x for the output (2 |x| + |z|). The conv, not memory, bounds these passes on
  // CPUs: measured (AVX2 EPYC, 2 threads, fp32, EfficientNet / MobileNet layers) 1.2-1.7x faster at
  // stride 1 and 1.6-2.3x at stride 2, in both layouts. Only where z is stored exactly (fp32 / fp64).
  const bool store_z = x.scalar_type() == weight.scalar_type();
  at::Tensor y = store_z ? dwconv::empty_output(x, g) : at::Tensor();
  auto [mean, invstd] = stats_impl(x, weight, stride, padding, dilation, y);  // invstd: the variance until below
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "dwconv_bn_invstd", [&] {
    scalar_t* v = invstd.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.C; ++c) v[c] = scalar_t(1) / std::sqrt(v[c] + static_cast<scalar_t>(eps));
  });
  const auto [scale, shift] = train_affine(gamma, beta, mean, invstd);
  if (!store_z) return {forward_cpu(x, weight, scale, shift, stride, padding, dilation, act), mean, invstd};
  normalise_in_place(y, g, scale, shift, act);
  return {y, mean, invstd};
}

// Gradients of train_forward_cpu for x, w, gamma and beta (the statistics' dependence on x included).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& invstd, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  const DWGeometry g = dwconv::make_geometry(x, weight, stride, padding, dilation);
  for (auto [t, name] : {std::pair{&gamma, "bn_weight"}, {&beta, "bn_bias"}, {&mean, "mean"}, {&invstd, "invstd"}})
    dwconv::check_channel_param(*t, x, g, name);
  dwconv::check_grad(grad, x, g);
  if (small_nchw_planes(g)) {
    auto [dx, dw, dgamma, dbeta] = train_backward_cpu(relayout(grad), relayout(x), weight, gamma, beta, mean, invstd,
                                                      stride, padding, dilation, act);
    return {relayout(dx, true), dw, dgamma, dbeta};
  }
  const auto [scale, shift] = train_affine(gamma, beta, mean, invstd);
  // z from the first pass is kept for the second (one conv less, as in train_forward_cpu); in
  // channels_last the second pass needed a buffer of this size for dz anyway.
  at::Tensor z = at::empty({g.N * g.Ho * g.Wo * g.C}, weight.options());
  // SiLU's derivative (an exp and a division) is the costliest part of g = dy * act'(u): the first pass
  // keeps g for the second in dx's buffer (fp32 / fp64 x, and an output plane no larger than the input's).
  const bool keep_g = act == kSiLU && x.scalar_type() == z.scalar_type() && g.Ho * g.Wo <= g.H * g.W;
  const at::Tensor kept_g = keep_g ? at::empty_like(x) : at::Tensor();
  // dbeta = sum g, dgamma = invstd * sum g * (z - mean)
  auto [dbeta, dgamma] =
      grad_stats_impl(grad, x, weight, scale, shift, mean, stride, padding, dilation, act, z, kept_g);
  // dz = scale * (g - dbeta / M - xhat * dgamma / M) = scale * g + p + q * z
  at::Tensor p = at::empty_like(mean), q = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "dwconv_bn_backward_coefficients", [&] {
    const scalar_t *pm = mean.const_data_ptr<scalar_t>(), *pi = invstd.const_data_ptr<scalar_t>(),
                   *ps = scale.const_data_ptr<scalar_t>(), *pdb = dbeta.const_data_ptr<scalar_t>();
    scalar_t *pdg = dgamma.mutable_data_ptr<scalar_t>(), *pp = p.mutable_data_ptr<scalar_t>(),
             *pq = q.mutable_data_ptr<scalar_t>();
    const scalar_t count = static_cast<scalar_t>(g.N * g.Ho * g.Wo);
    for (int64_t c = 0; c < g.C; ++c) {
      pdg[c] *= pi[c];
      pq[c] = -ps[c] * pi[c] * pdg[c] / count;
      pp[c] = -ps[c] * pdb[c] / count - pq[c] * pm[c];
    }
  });
  auto [dx, dw] = backward_impl(grad, x, weight, scale, shift, p, q, stride, padding, dilation, act, z, kept_g);
  return {dx, dw, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastblocks_ext, m) {
  m.def("dwconv_bn_stats(Tensor x, Tensor weight, int[] stride, int[] padding, int[] dilation)"
        " -> (Tensor mean, Tensor var)");
  m.def("dwconv_affine_act_forward(Tensor x, Tensor weight, Tensor scale, Tensor shift, int[] stride, int[] padding,"
        " int[] dilation, int act) -> Tensor");
  m.def("dwconv_affine_act_grad_stats(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor shift,"
        " Tensor center, int[] stride, int[] padding, int[] dilation, int act) -> (Tensor sum_g, Tensor sum_gz)");
  m.def("dwconv_affine_act_backward(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor p,"
        " Tensor q, int[] stride, int[] padding, int[] dilation, int act) -> (Tensor dx, Tensor dweight)");
  m.def("dwconv_bn_act_train_forward(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, float eps,"
        " int[] stride, int[] padding, int[] dilation, int act) -> (Tensor y, Tensor mean, Tensor invstd)");
  m.def("dwconv_bn_act_train_backward(Tensor grad, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias,"
        " Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, int act)"
        " -> (Tensor dx, Tensor dweight, Tensor dbn_weight, Tensor dbn_bias)");
}

TORCH_LIBRARY_IMPL(fastblocks_ext, CPU, m) {
  m.impl("dwconv_bn_stats", &stats_cpu);
  m.impl("dwconv_affine_act_forward", &forward_cpu);
  m.impl("dwconv_affine_act_grad_stats", &grad_stats_cpu);
  m.impl("dwconv_affine_act_backward", &backward_cpu);
  m.impl("dwconv_bn_act_train_forward", &train_forward_cpu);
  m.impl("dwconv_bn_act_train_backward", &train_backward_cpu);
}

}  // namespace fastblocks
