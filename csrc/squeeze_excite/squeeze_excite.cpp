// Fused squeeze-and-excitation (fastblocks/ops/squeeze_excite.py): schemas and C++ CPU kernels.
//
//   forward:  pooled = mean_hw x;  h = W1 pooled + b1;  z = W2 act(h) + b2;  y = x * scale_act(z)
//   backward: pass 1 reduces sum_hw(dy * x) and mean_hw(x) per (n, c) (x's mean is recomputed in the
//             pass that reads x anyway, so only x and the weights are saved); the excitation backward
//             on [C] and [S] vectors gives dz, dh and d(pooled); pass 2 writes dx = dy * s + d(pooled) / HW.
//
// CPU schedules. Fused (at least as many images as threads, and S small next to H * W): each thread
// takes whole images and runs pool -> excitation -> gate on one image at a time, so the gate pass
// re-reads x (backward: dy) from its own L2 instead of memory; the excitation is hand-written
// matrix-vector products in the accumulation dtype. Otherwise the stages run over the whole batch:
// pool, parallel over (image, channel block); the excitation as batched ATen matmuls (per-image
// matrix-vector products would re-read 2 * C * S weights per image); gate, parallel like the pool.
// The FC weight gradients (sums over images) are at::mm calls at the end.
// The CUDA kernels are in squeeze_excite_cuda.cu.
#include <ATen/Parallel.h>

#include <array>

#include "activations.h"
#include "fastblocks.h"

namespace fastblocks {

using SqueezeExciteWeights = std::array<at::Tensor, 4>;

// Shared with squeeze_excite_cuda.cu (declared there): checks the arguments of squeeze_excite_forward /
// _backward and returns w1, b1, w2, b2 as contiguous tensors in x's accumulation dtype.
SqueezeExciteWeights squeeze_excite_check_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                               const at::Tensor& w2, const at::Tensor& b2, int64_t activation) {
  is_channels_last_4d(x, "x");
  check_floating(x, "x");
  TORCH_CHECK(x.size(2) * x.size(3) > 0, "x must have at least one pixel to average, got shape ", x.sizes());
  TORCH_CHECK(activation > kIdentity && activation < kNumActivations,
              "activation must be a code of csrc/activations.h (ReLU, ReLU6, SiLU, HardSwish), got ", activation);
  const int64_t C = x.size(1), S = w1.dim() == 2 ? w1.size(0) : -1;
  const std::pair<const at::Tensor*, const char*> params[] = {{&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"}, {&b2, "b2"}};
  for (const auto& [t, name] : params) {
    check_floating(*t, name);
    TORCH_CHECK(t->device() == x.device(), name, " must be on the device of x (", x.device(), "), got ", t->device());
  }
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, "w1 must be [S, C] with C = ", C, ", got ", w1.sizes());
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == S, "b1 must be [S] = [", S, "], got ", b1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == S, "w2 must be [C, S] = [", C, ", ", S, "], got ",
              w2.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == C, "b2 must be [C] = [", C, "], got ", b2.sizes());
  const auto acc = at::toOpMathType(x.scalar_type());
  auto prep = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  return {prep(w1), prep(b1), prep(w2), prep(b2)};
}

// The excitation on [N, C] rows as ATen ops (batched matmuls), shared with squeeze_excite_cuda.cu.
// w: the weights from squeeze_excite_check_args; pooled = mean_hw x. Returns {h, a, z, s}.
std::array<at::Tensor, 4> squeeze_excite_excitation(const at::Tensor& pooled, const SqueezeExciteWeights& w,
                                                    int64_t activation, bool hard_sigmoid) {
  at::Tensor h = at::addmm(w[1], pooled, w[0].t()), a;
  switch (activation) {
    case kReLU: a = at::relu(h); break;
    case kReLU6: a = at::hardtanh(h, 0, 6); break;
    case kSiLU: a = at::silu(h); break;
    default: a = at::hardswish(h); break;
  }
  at::Tensor z = at::addmm(w[3], a, w[2].t());
  return {h, a, z, hard_sigmoid ? at::hardsigmoid(z) : at::sigmoid(z)};
}

// Its backward from dyx = sum_hw dy * x: returns {s, shift = d(pooled) / HW, a, dz, dh}.
std::array<at::Tensor, 5> squeeze_excite_excitation_backward(const at::Tensor& pooled, const at::Tensor& dyx,
                                                             const SqueezeExciteWeights& w, int64_t activation,
                                                             bool hard_sigmoid, int64_t HW) {
  const auto [h, a, z, s] = squeeze_excite_excitation(pooled, w, activation, hard_sigmoid);
  // Not at::hardsigmoid_backward: it multiplies by 1/6 rounded to float, also in float64 (1e-8 off).
  at::Tensor dz = hard_sigmoid ? dyx.div(6).mul_(z.gt(-3).logical_and_(z.lt(3))) : at::sigmoid_backward(dyx, s);
  at::Tensor da = at::mm(dz, w[2]), dh;
  switch (activation) {
    case kReLU: dh = at::threshold_backward(da, h, 0); break;
    case kReLU6: dh = at::hardtanh_backward(da, h, 0, 6); break;
    case kSiLU: dh = at::silu_backward(da, h); break;
    default: dh = at::hardswish_backward(da, h); break;
  }
  return {s, at::mm(dh, w[0]).div_(HW), a, dz, dh};
}

// The FC weight gradients (sums over images) in the weights' own dtypes: {dw1, db1, dw2, db2}.
std::array<at::Tensor, 4> squeeze_excite_weight_grads(const at::Tensor& pooled, const at::Tensor& a,
                                                      const at::Tensor& dz, const at::Tensor& dh, const at::Tensor& w1,
                                                      const at::Tensor& b1, const at::Tensor& w2,
                                                      const at::Tensor& b2) {
  return {at::mm(dh.t(), pooled).to(w1.scalar_type()), dh.sum(0).to(b1.scalar_type()),
          at::mm(dz.t(), a).to(w2.scalar_type()), dz.sum(0).to(b2.scalar_type())};
}

namespace {

constexpr int64_t kGrain = 32768;         // elements per parallel task: large enough to amortise a task
constexpr int64_t kLanes = 8;             // independent partial sums: vectorisable without reassociation
constexpr int64_t kPlaneGrain = 16384;    // NCHW: elements per (image, channel block) task
constexpr int64_t kChannelBlock = 64;     // channels_last: channels per (image, channel block) task

template <typename T>
FB_CPU_MULTIVERSION T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  for (int64_t k = 0; i < n; ++i, ++k) acc[k] += a[i] * b[i];
  T sum = 0;
  for (int64_t k = 0; k < kLanes; ++k) sum += acc[k];
  return sum;
}

// y[i] += alpha * x[i]
template <typename T>
FB_CPU_MULTIVERSION void axpy(T* __restrict y, T alpha, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// NCHW plane: sum of x (and of dy * x) over n contiguous elements.
template <typename scalar_t, bool kDy, typename acc_t = opmath_t<scalar_t>>
FB_CPU_MULTIVERSION void plane_sums(const scalar_t* __restrict x, const scalar_t* __restrict dy, int64_t n,
                                    acc_t& sum_x, acc_t& sum_dyx) {
  acc_t ax[kLanes] = {}, ad[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const acc_t v = static_cast<acc_t>(x[i + k]);
      ax[k] += v;
      if constexpr (kDy) ad[k] += static_cast<acc_t>(dy[i + k]) * v;
    }
  }
  for (int64_t k = 0; i < n; ++i, ++k) {
    const acc_t v = static_cast<acc_t>(x[i]);
    ax[k] += v;
    if constexpr (kDy) ad[k] += static_cast<acc_t>(dy[i]) * v;
  }
  sum_x = 0;
  sum_dyx = 0;
  for (int64_t k = 0; k < kLanes; ++k) {
    sum_x += ax[k];
    sum_dyx += ad[k];
  }
}

// channels_last: sum_x[c] += x[p, c] (and sum_dyx[c] += dy[p, c] * x[p, c]) over HW pixel rows of
// stride C, channels [0, width). The inner loop is independent per channel, so it vectorises.
template <typename scalar_t, bool kDy, typename acc_t = opmath_t<scalar_t>>
FB_CPU_MULTIVERSION void pixel_sums(const scalar_t* __restrict x, const scalar_t* __restrict dy, int64_t HW,
                                    int64_t C, int64_t width, acc_t* __restrict sum_x, acc_t* __restrict sum_dyx) {
  for (int64_t p = 0; p < HW; ++p) {
    for (int64_t c = 0; c < width; ++c) {
      const acc_t v = static_cast<acc_t>(x[p * C + c]);
      sum_x[c] += v;
      if constexpr (kDy) sum_dyx[c] += static_cast<acc_t>(dy[p * C + c]) * v;
    }
  }
}

// NCHW plane: out = in * s (+ t).
template <typename scalar_t, bool kShift, typename acc_t = opmath_t<scalar_t>>
FB_CPU_MULTIVERSION void gate_plane(const scalar_t* __restrict in, acc_t s, acc_t t, scalar_t* __restrict out,
                                    int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(in[i]) * s;
    out[i] = static_cast<scalar_t>(kShift ? v + t : v);
  }
}

// channels_last: out[p, c] = in[p, c] * s[c] (+ t[c]) over HW pixel rows of stride C, channels [0, width).
template <typename scalar_t, bool kShift, typename acc_t = opmath_t<scalar_t>>
FB_CPU_MULTIVERSION void gate_pixels(const scalar_t* __restrict in, const acc_t* __restrict s,
                                     const acc_t* __restrict t, scalar_t* __restrict out, int64_t HW, int64_t C,
                                     int64_t width) {
  for (int64_t p = 0; p < HW; ++p) {
    for (int64_t c = 0; c < width; ++c) {
      const acc_t v = static_cast<acc_t>(in[p * C + c]) * s[c];
      out[p * C + c] = static_cast<scalar_t>(kShift ? v + t[c] : v);
    }
  }
}

template <typename T>
T act_forward(int64_t act, T v) {
  T r = v;
  dispatch_activation(act, [&](auto a) { r = activate<decltype(a)::value>(v); });
  return r;
}

template <typename T>
T act_grad(int64_t act, T v) {
  T r = 1;
  dispatch_activation(act, [&](auto a) { r = activate_grad<decltype(a)::value>(v); });
  return r;
}

// One squeeze-excite call over a batch. Backward when dy is set: then `in` of the gate is dy, and
// dz, dh (the FC grads' rows) and shift = d(pooled) / HW are filled too.
template <typename scalar_t>
struct SqueezeExciteCpu {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* x;
  const scalar_t* dy;  // null in forward
  scalar_t* out;       // y, or dx
  int64_t N, C, S, HW;
  bool channels_last;
  const acc_t *w1, *b1, *w2, *b2;  // [S, C], [S], [C, S], [C] in the accumulation dtype
  int64_t act;
  bool hard_sigmoid;
  acc_t *pooled, *dyx, *s, *shift, *dz;  // [N, C] rows
  acc_t *h, *a, *dh;                     // [N, S] rows

  bool backward() const { return dy != nullptr; }

  // Stage 1, image n, channels [c0, c1): pooled = mean_hw x (and dyx = sum_hw dy * x).
  template <bool kDy>
  void pool(int64_t n, int64_t c0, int64_t c1) const {
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
    if (!channels_last) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t plane = (n * C + c) * HW;
        acc_t sx, sd;
        plane_sums<scalar_t, kDy>(x + plane, kDy ? dy + plane : nullptr, HW, sx, sd);
        pooled[n * C + c] = sx * inv_hw;
        if constexpr (kDy) dyx[n * C + c] = sd;
      }
      return;
    }
    acc_t* px = pooled + n * C + c0;
    acc_t* pd = kDy ? dyx + n * C + c0 : nullptr;
    std::fill_n(px, c1 - c0, acc_t(0));
    if constexpr (kDy) std::fill_n(pd, c1 - c0, acc_t(0));
    const int64_t first = n * HW * C + c0;
    pixel_sums<scalar_t, kDy>(x + first, kDy ? dy + first : nullptr, HW, C, c1 - c0, px, pd);
    for (int64_t c = 0; c < c1 - c0; ++c) px[c] *= inv_hw;
  }

  // Stage 2, image n: s = scale_act(W2 act(W1 pooled + b1) + b2); in backward also
  // dz = dyx * scale_act'(z), dh = act'(h) * W2^T dz and shift = W1^T dh / HW.
  void excite(int64_t n) const {
    acc_t *hn = h + n * S, *an = a + n * S, *sn = s + n * C;
    for (int64_t j = 0; j < S; ++j) {
      hn[j] = b1[j] + dot(w1 + j * C, pooled + n * C, C);
      an[j] = act_forward(act, hn[j]);
    }
    for (int64_t c = 0; c < C; ++c) {
      const acc_t z = b2[c] + dot(w2 + c * S, an, S);
      sn[c] = hard_sigmoid ? hardsigmoid(z) : sigmoid(z);
      if (backward())
        dz[n * C + c] = dyx[n * C + c] * (hard_sigmoid ? hardsigmoid_grad(z) : sn[c] * (acc_t(1) - sn[c]));
    }
    if (!backward()) return;
    acc_t *dhn = dh + n * S, *tn = shift + n * C;
    std::fill_n(dhn, S, acc_t(0));
    for (int64_t c = 0; c < C; ++c) axpy(dhn, dz[n * C + c], w2 + c * S, S);
    for (int64_t j = 0; j < S; ++j) dhn[j] *= act_grad(act, hn[j]);
    std::fill_n(tn, C, acc_t(0));
    for (int64_t j = 0; j < S; ++j) axpy(tn, dhn[j] / static_cast<acc_t>(HW), w1 + j * C, C);
  }

  // Stage 3, image n, channels [c0, c1): out = in * s (+ shift in backward), in = x or dy.
  template <bool kShift>
  void gate(int64_t n, int64_t c0, int64_t c1) const {
    const scalar_t* in = kShift ? dy : x;
    const acc_t* sn = s + n * C;
    const acc_t* tn = kShift ? shift + n * C : nullptr;
    if (!channels_last) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t plane = (n * C + c) * HW;
        gate_plane<scalar_t, kShift>(in + plane, sn[c], kShift ? tn[c] : acc_t(0), out + plane, HW);
      }
      return;
    }
    const int64_t first = n * HW * C + c0;
    gate_pixels<scalar_t, kShift>(in + first, sn + c0, kShift ? tn + c0 : nullptr, out + first, HW, C, c1 - c0);
  }

  // Tasks per thread such that a thread gets at least kGrain elements: small calls run inline.
  static int64_t grain(int64_t task_elements) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(task_elements, 1)); }

  // Per-image fusion pays when there is an image per thread and the excitation's matrix-vector
  // products (2 * C * S weights per image) are small next to the image (C * HW).
  bool fuse_images() const { return N >= at::get_num_threads() && 8 * S <= HW; }

  // Whole images per thread: pool -> excitation -> gate, the gate re-reading the image from L2.
  template <bool kBackward>
  void run_fused() const {
    at::parallel_for(0, N, grain(C * HW), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        pool<kBackward>(n, 0, C);
        excite(n);
        gate<kBackward>(n, 0, C);
      }
    });
  }

  // Stage 1 or 3 over the batch, parallel over (image, channel block).
  template <typename F>
  void for_blocks(F&& f) const {
    const int64_t block = channels_last ? kChannelBlock : std::max<int64_t>(1, kPlaneGrain / HW);
    const int64_t blocks = (C + block - 1) / block;
    at::parallel_for(0, N * blocks, grain(block * HW), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / blocks, c0 = (t % blocks) * block;
        f(n, c0, std::min(C, c0 + block));
      }
    });
  }
};

template <typename scalar_t>
SqueezeExciteCpu<scalar_t> make_plan(const at::Tensor& x, const SqueezeExciteWeights& w, int64_t activation,
                                     bool hard_sigmoid, at::Tensor& out) {
  using acc_t = opmath_t<scalar_t>;
  SqueezeExciteCpu<scalar_t> p{};
  p.x = x.const_data_ptr<scalar_t>();
  p.out = out.mutable_data_ptr<scalar_t>();
  p.N = x.size(0);
  p.C = x.size(1);
  p.S = w[0].size(0);
  p.HW = x.size(2) * x.size(3);
  p.channels_last = is_channels_last_4d(x, "x");
  p.w1 = w[0].const_data_ptr<acc_t>();
  p.b1 = w[1].const_data_ptr<acc_t>();
  p.w2 = w[2].const_data_ptr<acc_t>();
  p.b2 = w[3].const_data_ptr<acc_t>();
  p.act = activation;
  p.hard_sigmoid = hard_sigmoid;
  return p;
}

at::Tensor squeeze_excite_forward_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                      const at::Tensor& w2, const at::Tensor& b2, int64_t activation,
                                      bool hard_sigmoid) {
  const SqueezeExciteWeights w = squeeze_excite_check_args(x, w1, b1, w2, b2, activation);
  at::Tensor out = at::empty_like(x);
  const auto opts = w[0].options();
  const int64_t N = x.size(0), C = x.size(1), S = w[0].size(0);
  at::Tensor pooled = at::empty({N, C}, opts);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squeeze_excite_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    auto p = make_plan<scalar_t>(x, w, activation, hard_sigmoid, out);
    p.pooled = pooled.mutable_data_ptr<acc_t>();
    if (p.fuse_images()) {
      at::Tensor s = at::empty({N, C}, opts), h = at::empty({N, S}, opts), a = at::empty({N, S}, opts);
      p.s = s.mutable_data_ptr<acc_t>();
      p.h = h.mutable_data_ptr<acc_t>();
      p.a = a.mutable_data_ptr<acc_t>();
      p.template run_fused<false>();
    } else {
      p.for_blocks([&](int64_t n, int64_t c0, int64_t c1) { p.template pool<false>(n, c0, c1); });
      const at::Tensor s = squeeze_excite_excitation(pooled, w, activation, hard_sigmoid)[3];
      p.s = s.mutable_data_ptr<acc_t>();
      p.for_blocks([&](int64_t n, int64_t c0, int64_t c1) { p.template gate<false>(n, c0, c1); });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> squeeze_excite_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, int64_t activation, bool hard_sigmoid) {
  const SqueezeExciteWeights w = squeeze_excite_check_args(x, w1, b1, w2, b2, activation);
  check_same_layout(grad, "grad", x, "x");
  at::Tensor dx = at::empty_like(x);
  const auto opts = w[0].options();
  const int64_t N = x.size(0), C = x.size(1), S = w[0].size(0);
  at::Tensor pooled = at::empty({N, C}, opts), dyx = at::empty({N, C}, opts);
  at::Tensor a, dz, dh;
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squeeze_excite_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    auto p = make_plan<scalar_t>(x, w, activation, hard_sigmoid, dx);
    p.dy = grad.const_data_ptr<scalar_t>();
    p.pooled = pooled.mutable_data_ptr<acc_t>();
    p.dyx = dyx.mutable_data_ptr<acc_t>();
    if (p.fuse_images()) {
      at::Tensor s = at::empty({N, C}, opts), shift = at::empty({N, C}, opts), h = at::empty({N, S}, opts);
      a = at::empty({N, S}, opts);
      dz = at::empty({N, C}, opts);
      dh = at::empty({N, S}, opts);
      p.s = s.mutable_data_ptr<acc_t>();
      p.shift = shift.mutable_data_ptr<acc_t>();
      p.h = h.mutable_data_ptr<acc_t>();
      p.a = a.mutable_data_ptr<acc_t>();
      p.dz = dz.mutable_data_ptr<acc_t>();
      p.dh = dh.mutable_data_ptr<acc_t>();
      p.template run_fused<true>();
    } else {
      p.for_blocks([&](int64_t n, int64_t c0, int64_t c1) { p.template pool<true>(n, c0, c1); });
      const auto e = squeeze_excite_excitation_backward(pooled, dyx, w, activation, hard_sigmoid,
                                                        x.size(2) * x.size(3));
      p.s = e[0].mutable_data_ptr<acc_t>();
      p.shift = e[1].mutable_data_ptr<acc_t>();
      p.for_blocks([&](int64_t n, int64_t c0, int64_t c1) { p.template gate<true>(n, c0, c1); });
      a = e[2];
      dz = e[3];
      dh = e[4];
    }
  });
  const auto g = squeeze_excite_weight_grads(pooled, a, dz, dh, w1, b1, w2, b2);
  return {dx, g[0], g[1], g[2], g[3]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastblocks_ext, m) {
  // y = x * scale_act(w2 @ act(w1 @ mean_hw(x) + b1) + b2); w1 [S, C], b1 [S], w2 [C, S], b2 [C].
  // activation: a code of activations.h (kReLU, kReLU6, kSiLU, kHardSwish); scale_act: hardsigmoid if
  // hard_sigmoid else sigmoid. Output has x's dtype and layout (NCHW-contiguous or channels_last).
  m.def("squeeze_excite_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, int activation, "
        "bool hard_sigmoid) -> Tensor");
  // -> (dx, dw1, db1, dw2, db2)
  m.def("squeeze_excite_backward(Tensor grad, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
        "int activation, bool hard_sigmoid) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastblocks_ext, CPU, m) {
  m.impl("squeeze_excite_forward", &squeeze_excite_forward_cpu);
  m.impl("squeeze_excite_backward", &squeeze_excite_backward_cpu);
}

}  // namespace fastblocks
