// Fused BatchNorm + activation over a tensor or a channel slice of a block buffer: schemas and C++
// CPU kernels. The CUDA kernels are in bn_act_cuda.cu, the layout in bn_act.h. `activation` is a
// code of csrc/activations.h; the kernels are compiled once per activation.
//
//   bn_act_stats(x)                     per-channel batch mean and biased variance in the accumulation
//                                       dtype; corrected two-pass algorithm, so no cancellation
//   bn_act_forward(x, mean, invstd, weight, bias, activation)
//                                       y = act((x - mean) * invstd * weight + bias)
//   bn_act_backward(grad, x, mean, invstd, weight, bias, batch_stats, activation) -> (dx, dweight, dbias)
//                                       recomputes act'(u) from x; with batch_stats, dx includes
//                                       the gradient through the batch mean and variance
#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "bn_act.h"

namespace fastblocks {
namespace bn_act {
namespace {

constexpr int64_t kGrain = 32768;  // values per parallel task

// The inner loops, compiled per ISA (FB_CPU_MULTIVERSION) with the per-value work f inlined; `omp simd`
// lets GCC vectorise them (and the sums use per-lane partials, in a fixed order: deterministic). The
// forward loops vectorise; in the backward ones GCC keeps the comparisons of relu' / hardswish' as
// branches, so they stay scalar for now.

// f(r, j) for r < rows, j < cols: rows of a contiguous run each (an NCHW plane's pixels, a pixel's channels).
template <typename F>
FB_CPU_MULTIVERSION void for_2d(int64_t rows, int64_t cols, const F& f) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) f(r, j);
  }
}

// sum over j < n of f(j)[k], for K = 1 or 2.
template <typename acc_t, int K, typename F>
FB_CPU_MULTIVERSION std::array<acc_t, K> row_sums(int64_t n, const F& f) {
  static_assert(K == 1 || K == 2);
  acc_t s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t j = 0; j < n; ++j) {
    const std::array<acc_t, K> v = f(j);
    s0 += v[0];
    if constexpr (K == 2) s1 += v[K - 1];
  }
  if constexpr (K == 2) return {s0, s1};
  else return {s0};
}

// acc[k * cols + j] += f(r, j)[k] for r < rows, j < cols: per-channel sums over channels_last pixels.
template <typename acc_t, int K, typename F>
FB_CPU_MULTIVERSION void add_2d(int64_t rows, int64_t cols, acc_t* __restrict acc, const F& f) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const std::array<acc_t, K> v = f(r, j);
      for (int k = 0; k < K; ++k) acc[k * cols + j] += v[k];
    }
  }
}

// sums[k][c] = sum over the N * HW values of channel c of f(c, x_index, out_index)[k]. Row by row
// partial sums keep the float32 rounding error small; the order is fixed, so results are deterministic.
template <typename acc_t, int K, typename F>
std::array<std::vector<acc_t>, K> channel_sums(const Geometry& g, const F& f) {
  std::array<std::vector<acc_t>, K> sums;
  for (auto& s : sums) s.assign(g.C, acc_t(0));
  if (!g.channels_last) {
    at::parallel_for(0, g.C, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.count(), 1)), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        std::array<acc_t, K> total{};
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t xi = n * g.x_stride + c * g.HW, oi = (n * g.C + c) * g.HW;
          const auto row = row_sums<acc_t, K>(g.HW, [&](int64_t p) { return f(c, xi + p, oi + p); });
          for (int k = 0; k < K; ++k) total[k] += row[k];
        }
        for (int k = 0; k < K; ++k) sums[k][c] = total[k];
      }
    });
    return sums;
  }
  // channels_last: chunks of pixels, each summing a row of C channels at a time into its own partials.
  const int64_t rows = g.count(), chunk = std::max<int64_t>(1, kGrain / std::max<int64_t>(g.C, 1));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  std::vector<acc_t> partial(chunks * K * g.C, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * chunk;
      add_2d<acc_t, K>(std::min(rows, r0 + chunk) - r0, g.C, partial.data() + t * K * g.C, [&](int64_t r, int64_t c) {
        return f(c, (r0 + r) * g.x_stride + c, (r0 + r) * g.C + c);
      });
    }
  });
  for (int64_t t = 0; t < chunks; ++t)
    for (int k = 0; k < K; ++k)
      for (int64_t c = 0; c < g.C; ++c) sums[k][c] += partial[(t * K + k) * g.C + c];
  return sums;
}

// f(c, x_index, out_index) for every value.
template <typename F>
void for_each_value(const Geometry& g, const F& f) {
  if (!g.channels_last) {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / g.C, c = nc - n * g.C, xi = n * g.x_stride + c * g.HW;
        for_2d(1, g.HW, [&](int64_t, int64_t p) { f(c, xi + p, nc * g.HW + p); });
      }
    });
  } else {
    at::parallel_for(0, g.count(), std::max<int64_t>(1, kGrain / std::max<int64_t>(g.C, 1)), [&](int64_t b, int64_t e) {
      for_2d(e - b, g.C, [&](int64_t r, int64_t c) { f(c, (b + r) * g.x_stride + c, (b + r) * g.C + c); });
    });
  }
}

template <typename T>
at::Tensor to_tensor(const std::vector<T>& v, const at::Tensor& like) {
  return at::tensor(at::ArrayRef<T>(v), like.options().dtype(c10::CppTypeToScalarType<T>::value));
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& x) {
  const Geometry g = geometry(x);
  at::Tensor mean, var;
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_stats_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const acc_t inv_count = g.count() > 0 ? acc_t(1) / acc_t(g.count()) : acc_t(0);
    auto s1 = channel_sums<acc_t, 1>(g, [&](int64_t, int64_t xi, int64_t) {
      return std::array<acc_t, 1>{static_cast<acc_t>(px[xi])};
    })[0];
    for (auto& v : s1) v *= inv_count;
    auto s2 = channel_sums<acc_t, 2>(g, [&](int64_t c, int64_t xi, int64_t) {
      const acc_t d = static_cast<acc_t>(px[xi]) - s1[c];
      return std::array<acc_t, 2>{d, d * d};
    });
    for (int64_t c = 0; c < g.C; ++c) {  // the first mean's rounding error, removed from both
      const acc_t shift = s2[0][c] * inv_count;
      s1[c] += shift;
      s2[1][c] = std::max(s2[1][c] * inv_count - shift * shift, acc_t(0));
    }
    mean = to_tensor(s1, x);
    var = to_tensor(s2[1], x);
  });
  return {mean, var};
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                       const at::Tensor& bias, int64_t activation) {
  const Geometry g = geometry(x);
  check_channel_params(x, {{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&bias, "bias"}});
  at::Tensor y = empty_out(x, g);
  const auto [scale, shift] = scale_shift(mean, invstd, weight, bias);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    const acc_t *a = scale.const_data_ptr<acc_t>(), *b = shift.const_data_ptr<acc_t>();
    with_activation(activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      for_each_value(g, [&](int64_t c, int64_t xi, int64_t oi) {
        py[oi] = static_cast<scalar_t>(activate<ACT>(static_cast<acc_t>(px[xi]) * a[c] + b[c]));
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& mean, const at::Tensor& invstd,
                                                            const at::Tensor& weight, const at::Tensor& bias,
                                                            bool batch_stats, int64_t activation) {
  const Geometry g = geometry(x);
  check_grad(grad, x, g);
  check_channel_params(x, {{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&bias, "bias"}});
  at::Tensor dx = empty_out(x, g);
  const auto [scale, shift] = scale_shift(mean, invstd, weight, bias);
  BackwardTerms terms;
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pdy = grad.const_data_ptr<scalar_t>();
    const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>(),
                *mu = mean.const_data_ptr<acc_t>();
    with_activation(activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      // g = dy * act'(u), u recomputed from x
      auto grad_u = [&](int64_t c, acc_t xv, int64_t oi) {
        return static_cast<acc_t>(pdy[oi]) * activate_grad<ACT>(xv * sc[c] + sh[c]);
      };
      auto sums = channel_sums<acc_t, 2>(g, [&](int64_t c, int64_t xi, int64_t oi) {
        const acc_t xv = static_cast<acc_t>(px[xi]), d = grad_u(c, xv, oi);
        return std::array<acc_t, 2>{d, d * (xv - mu[c])};
      });
      terms = backward_terms(to_tensor(sums[0], x), to_tensor(sums[1], x), invstd, g.count(), batch_stats);
      const acc_t *ta = terms.a.const_data_ptr<acc_t>(), *tb = terms.b.const_data_ptr<acc_t>();
      scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
      for_each_value(g, [&](int64_t c, int64_t xi, int64_t oi) {
        const acc_t xv = static_cast<acc_t>(px[xi]);
        pdx[oi] = static_cast<scalar_t>(sc[c] * (grad_u(c, xv, oi) - ta[c] - (xv - mu[c]) * tb[c]));
      });
    });
  });
  return {dx, terms.dweight, terms.dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastblocks_ext, m) {
  m.def("bn_act_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_act_forward(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int activation) -> Tensor");
  m.def("bn_act_backward(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "bool batch_stats, int activation) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastblocks_ext, CPU, m) {
  m.impl("bn_act_stats", &stats_cpu);
  m.impl("bn_act_forward", &forward_cpu);
  m.impl("bn_act_backward", &backward_cpu);
}

}  // namespace bn_act
}  // namespace fastblocks
