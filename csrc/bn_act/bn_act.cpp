// Fused BatchNorm + ReLU over a (channel slice of a) block buffer, for memory-efficient DenseNet:
// schemas and C++ CPU kernels. The CUDA kernels are in bn_relu_cuda.cu, the layout in bn_relu.h.
//
//   bn_relu_stats(x)                    per-channel batch mean and biased variance in the accumulation
//                                       dtype; corrected two-pass algorithm, so no cancellation
//   bn_relu_forward(x, mean, invstd, weight, bias)      y = relu((x - mean) * invstd * weight + bias)
//   bn_relu_backward(grad, x, mean, invstd, weight, bias, batch_stats) -> (dx, dweight, dbias)
//                                       recomputes y's sign from x; with batch_stats, dx includes
//                                       the gradient through the batch mean and variance
#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "bn_relu.h"

namespace fastblocks {
namespace bn_relu {
namespace {

constexpr int64_t kGrain = 32768;  // values per parallel task

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
          std::array<acc_t, K> row{};
          const int64_t xi = n * g.x_stride + c * g.HW, oi = (n * g.C + c) * g.HW;
          for (int64_t p = 0; p < g.HW; ++p) {
            const auto v = f(c, xi + p, oi + p);
            for (int k = 0; k < K; ++k) row[k] += v[k];
          }
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
      acc_t* part = partial.data() + t * K * g.C;
      for (int64_t r = t * chunk; r < std::min(rows, (t + 1) * chunk); ++r)
        for (int64_t c = 0; c < g.C; ++c) {
          const auto v = f(c, r * g.x_stride + c, r * g.C + c);
          for (int k = 0; k < K; ++k) part[k * g.C + c] += v[k];
        }
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
        for (int64_t p = 0; p < g.HW; ++p) f(c, xi + p, nc * g.HW + p);
      }
    });
  } else {
    at::parallel_for(0, g.count(), std::max<int64_t>(1, kGrain / std::max<int64_t>(g.C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t c = 0; c < g.C; ++c) f(c, r * g.x_stride + c, r * g.C + c);
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
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_stats_cpu", [&] {
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
                       const at::Tensor& bias) {
  const Geometry g = geometry(x);
  check_channel_params(x, {{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&bias, "bias"}});
  at::Tensor y = empty_out(x, g);
  const auto [scale, shift] = scale_shift(mean, invstd, weight, bias);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    const acc_t *a = scale.const_data_ptr<acc_t>(), *b = shift.const_data_ptr<acc_t>();
    for_each_value(g, [&](int64_t c, int64_t xi, int64_t oi) {
      py[oi] = static_cast<scalar_t>(relu(static_cast<acc_t>(px[xi]) * a[c] + b[c]));
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& mean, const at::Tensor& invstd,
                                                            const at::Tensor& weight, const at::Tensor& bias,
                                                            bool batch_stats) {
  const Geometry g = geometry(x);
  check_grad(grad, x, g);
  check_channel_params(x, {{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&bias, "bias"}});
  at::Tensor dx = empty_out(x, g);
  const auto [scale, shift] = scale_shift(mean, invstd, weight, bias);
  BackwardTerms terms;
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pdy = grad.const_data_ptr<scalar_t>();
    const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>(),
                *mu = mean.const_data_ptr<acc_t>();
    // dy masked by relu' of the recomputed output
    auto dym = [&](int64_t c, acc_t xv, int64_t oi) {
      return xv * sc[c] + sh[c] > acc_t(0) ? static_cast<acc_t>(pdy[oi]) : acc_t(0);
    };
    auto sums = channel_sums<acc_t, 2>(g, [&](int64_t c, int64_t xi, int64_t oi) {
      const acc_t xv = static_cast<acc_t>(px[xi]), d = dym(c, xv, oi);
      return std::array<acc_t, 2>{d, d * (xv - mu[c])};
    });
    terms = backward_terms(to_tensor(sums[0], x), to_tensor(sums[1], x), invstd, g.count(), batch_stats);
    const acc_t *ta = terms.a.const_data_ptr<acc_t>(), *tb = terms.b.const_data_ptr<acc_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    for_each_value(g, [&](int64_t c, int64_t xi, int64_t oi) {
      const acc_t xv = static_cast<acc_t>(px[xi]);
      pdx[oi] = static_cast<scalar_t>(sc[c] * (dym(c, xv, oi) - ta[c] - (xv - mu[c]) * tb[c]));
    });
  });
  return {dx, terms.dweight, terms.dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastblocks_ext, m) {
  m.def("bn_relu_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_relu_forward(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) -> Tensor");
  m.def("bn_relu_backward(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "bool batch_stats) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastblocks_ext, CPU, m) {
  m.impl("bn_relu_stats", &stats_cpu);
  m.impl("bn_relu_forward", &forward_cpu);
  m.impl("bn_relu_backward", &backward_cpu);
}

}  // namespace bn_relu
}  // namespace fastblocks
