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
//   bn_act_backward_into(grad, x, mean, invstd, weight, bias, batch_stats, activation, grad_x)
//                        -> (dweight, dbias)
//                                       the same, dx added into grad_x (laid out like x) instead of
//                                       written: DenseNet's shared gradient buffer, one pass
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "bn_act.h"
#include "cpu_simd.h"

namespace fastblocks {
namespace bn_act {
namespace {

constexpr int64_t kGrain = 32768;  // values per parallel task

using simd::vec;

// NCHW planes smaller than a vector (3x3 and down for float: DenseNet's last blocks and MobileNet's
// last stages at small inputs) would fill a fraction of each vector, one plane at a time. Each image's
// C * HW values are contiguous, though, so such a tensor is traversed as a channels_last one of N
// pixels with C * HW channels ("rows"), whose channel tables repeat each value HW times. Measured on
// 2x2 / 3x3 planes, 1 thread: statistics, forward and backward 1.5-4.5x faster; from 4x4 up the
// per-plane traversal wins (the expanded tables are re-read for every image).
template <typename acc_t>
bool use_rows(const Geometry& g) {
  return !g.channels_last && g.HW < simd::lanes<acc_t>;
}

inline Geometry as_rows(const Geometry& g) {
  return {g.N, g.C * g.HW, 1, g.x_stride, true};
}

// The per-channel tables a kernel reads (scale, shift, mean, ...), each copied into a buffer padded to
// whole vectors: channels_last rows load them as full vectors at any channel offset. In the rows
// traversal value c of a table is repeated HW times.
template <typename acc_t, int P>
struct ChannelTables {
  std::array<std::vector<acc_t>, P> padded;

  ChannelTables(const std::array<const acc_t*, P>& tables, const Geometry& g) {
    const int64_t repeat = use_rows<acc_t>(g) ? g.HW : 1;
    for (int i = 0; i < P; ++i) {
      padded[i].assign(g.C * repeat + simd::lanes<acc_t>, acc_t(0));
      for (int64_t c = 0; c < g.C; ++c)
        std::fill_n(padded[i].begin() + c * repeat, repeat, tables[i][c]);
    }
  }
  // Channel c of every table on every lane (NCHW: one channel per plane).
  FB_SIMD_INLINE std::array<vec<acc_t>, P> broadcast(int64_t c) const {
    std::array<vec<acc_t>, P> v;
    for (int i = 0; i < P; ++i) v[i] = simd::broadcast(padded[i][c]);
    return v;
  }
  // Channels c, c + 1, ... on consecutive lanes (channels_last).
  FB_SIMD_INLINE std::array<vec<acc_t>, P> load(int64_t c) const {
    std::array<vec<acc_t>, P> v;
    for (int i = 0; i < P; ++i) v[i] = simd::load<acc_t>(padded[i].data() + c);
    return v;
  }
};

// The traversals below hand f runs of n <= lanes values, all of one channel (NCHW: pixels of a plane)
// or of consecutive channels (channels_last: a pixel's channels), with the matching lanes of the
// channel tables. The loops over a parallel task are compiled per ISA (FB_CPU_MULTIVERSION) and called
// from inside the task: a lambda run by at::parallel_for is compiled for the baseline target only.

// x at xi, the dense tensors (y, grad, dx) at oi. `whole`: a full vector may be read at both (the
// lanes past n are the next plane's or pixel's), so a row's last, partial run needs no element-wise load.
struct Run {
  int64_t xi, oi;
  int n;
  bool whole;
};

// A run of n values at (xi, oi), whole when a vector read stays inside x's and the output's extents.
FB_SIMD_INLINE Run make_run(const Geometry& g, int64_t xi, int64_t oi, int64_t n, int64_t lanes) {
  const int64_t x_end = g.channels_last ? (g.count() - 1) * g.x_stride + g.C : (g.N - 1) * g.x_stride + g.C * g.HW;
  return {xi, oi, static_cast<int>(std::min(n, lanes)), xi + lanes <= x_end && oi + lanes <= g.numel()};
}

// f(run, params) for the runs of NCHW planes [b, e).
template <typename acc_t, int P, typename F>
FB_CPU_MULTIVERSION void plane_runs(const Geometry& g, const ChannelTables<acc_t, P>& t, int64_t b, int64_t e,
                                    const F& f) {
  constexpr int L = simd::lanes<acc_t>;
  for (int64_t nc = b; nc < e; ++nc) {
    const int64_t n = nc / g.C, c = nc - n * g.C, xi = n * g.x_stride + c * g.HW, oi = nc * g.HW;
    const auto params = t.broadcast(c);
    int64_t p = 0;
    for (; p + L <= g.HW; p += L) f(Run{xi + p, oi + p, L, true}, params);
    if (p < g.HW) f(make_run(g, xi + p, oi + p, g.HW - p, L), params);
  }
}

// f(run, params) for the runs of channels_last pixels [b, e).
template <typename acc_t, int P, typename F>
FB_CPU_MULTIVERSION void pixel_runs(const Geometry& g, const ChannelTables<acc_t, P>& t, int64_t b, int64_t e,
                                    const F& f) {
  constexpr int L = simd::lanes<acc_t>;
  for (int64_t r = b; r < e; ++r) {
    int64_t c = 0;
    for (; c + L <= g.C; c += L) f(Run{r * g.x_stride + c, r * g.C + c, L, true}, t.load(c));
    if (c < g.C) f(make_run(g, r * g.x_stride + c, r * g.C + c, g.C - c, L), t.load(c));
  }
}

template <typename acc_t, int P, typename F>
void for_each_run(const Geometry& g, const ChannelTables<acc_t, P>& t, const F& f) {
  if (use_rows<acc_t>(g)) return for_each_run(as_rows(g), t, f);
  if (!g.channels_last) {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.HW, 1)),
                     [&](int64_t b, int64_t e) { plane_runs(g, t, b, e, f); });
  } else {
    at::parallel_for(0, g.count(), std::max<int64_t>(1, kGrain / std::max<int64_t>(g.C, 1)),
                     [&](int64_t b, int64_t e) { pixel_runs(g, t, b, e, f); });
  }
}

// acc[k] += v[k], lanes from n on ignored.
template <typename acc_t, int K>
FB_SIMD_INLINE void accumulate(std::array<vec<acc_t>, K>& acc, const std::array<vec<acc_t>, K>& v, int n) {
  for (int k = 0; k < K; ++k) acc[k] += n == simd::lanes<acc_t> ? v[k] : simd::keep_first<acc_t>(v[k], n);
}

// sums[k][c] for the NCHW channels [c0, c1): per-plane vector partials, added up per channel, then
// their lane sums (once per channel: on 3x3 planes a horizontal sum per plane cost more than the plane).
template <typename acc_t, int K, int P, typename F>
FB_CPU_MULTIVERSION void plane_sums(const Geometry& g, const ChannelTables<acc_t, P>& t, int64_t c0, int64_t c1,
                                    std::array<std::vector<acc_t>, K>& sums, const F& f) {
  constexpr int L = simd::lanes<acc_t>;
  for (int64_t c = c0; c < c1; ++c) {
    const auto params = t.broadcast(c);
    std::array<vec<acc_t>, K> channel{};
    for (int64_t n = 0; n < g.N; ++n) {
      const int64_t xi = n * g.x_stride + c * g.HW, oi = (n * g.C + c) * g.HW;
      std::array<vec<acc_t>, K> plane{};
      int64_t p = 0;
      for (; p + L <= g.HW; p += L) accumulate<acc_t, K>(plane, f(Run{xi + p, oi + p, L, true}, params), L);
      if (p < g.HW) {
        const Run run = make_run(g, xi + p, oi + p, g.HW - p, L);
        accumulate<acc_t, K>(plane, f(run, params), run.n);
      }
      for (int k = 0; k < K; ++k) channel[k] += plane[k];
    }
    for (int k = 0; k < K; ++k) sums[k][c] = simd::reduce_add<acc_t>(channel[k]);
  }
}

// The sums over the channels_last pixels [b, e) of the VB whole channel vectors from c, into
// acc[k * width + c - c0 + j * L]. A block of VB vectors reads whole
// cache lines of each pixel in one sweep (one vector per sweep used half of each line, and swept the
// task's pixels once per vector); the VB * K partials stay in registers.
template <int VB, typename acc_t, int K, int P, typename F>
FB_SIMD_INLINE void pixel_block_sums(const Geometry& g, const ChannelTables<acc_t, P>& t, int64_t b, int64_t e,
                                     int64_t c, int64_t c0, acc_t* acc, int64_t width, const F& f) {
  constexpr int L = simd::lanes<acc_t>;
  std::array<std::array<vec<acc_t>, P>, VB> params;
  for (int j = 0; j < VB; ++j) params[j] = t.load(c + j * L);
  std::array<std::array<vec<acc_t>, K>, VB> part{};
  const int64_t x_stride = g.x_stride, C = g.C;
  for (int64_t r = b; r < e; ++r)
    for (int j = 0; j < VB; ++j)
      accumulate<acc_t, K>(part[j], f(Run{r * x_stride + c + j * L, r * C + c + j * L, L, true}, params[j]), L);
  for (int j = 0; j < VB; ++j)
    for (int k = 0; k < K; ++k) simd::store(acc + k * width + c - c0 + j * L, part[j][k]);
}

// acc[k * width + c - c0] = the sums over the channels_last pixels [b, e) of channels [c0, c1).
template <typename acc_t, int K, int P, typename F>
FB_CPU_MULTIVERSION void pixel_sums(const Geometry& g, const ChannelTables<acc_t, P>& t, int64_t b, int64_t e,
                                    int64_t c0, int64_t c1, acc_t* acc, int64_t width, const F& f) {
  constexpr int L = simd::lanes<acc_t>, VB = 4;
  int64_t c = c0;
  for (; c + VB * L <= c1; c += VB * L) pixel_block_sums<VB, acc_t, K>(g, t, b, e, c, c0, acc, width, f);
  for (; c < c1; c += L) {  // the rest one vector at a time, the last one maybe partial
    const auto params = t.load(c);
    std::array<vec<acc_t>, K> part{};
    for (int64_t r = b; r < e; ++r) {
      const Run run = c + L <= c1 ? Run{r * g.x_stride + c, r * g.C + c, L, true}
                                  : make_run(g, r * g.x_stride + c, r * g.C + c, c1 - c, L);
      accumulate<acc_t, K>(part, f(run, params), run.n);
    }
    for (int k = 0; k < K; ++k) simd::store(acc + k * width + c - c0, part[k]);
  }
}

// sums[k][c] = the sum over channel c's N * HW values of lane k of f(xi, oi, n, params), which returns
// K vectors. Per-plane (NCHW) or per-chunk (channels_last) partial sums keep float32's rounding error
// small; the order is fixed, so results are deterministic.
template <typename acc_t, int K, int P, typename F>
std::array<std::vector<acc_t>, K> channel_sums(const Geometry& g, const ChannelTables<acc_t, P>& t, const F& f) {
  std::array<std::vector<acc_t>, K> sums;
  for (auto& s : sums) s.assign(g.C, acc_t(0));
  const int64_t channels_per_task = std::max<int64_t>(1, kGrain / std::max<int64_t>(g.count(), 1));
  if (use_rows<acc_t>(g)) {
    // Tasks own channels: each sums its HW row columns per channel over the N rows, then folds them.
    const Geometry rows = as_rows(g);
    at::parallel_for(0, g.C, channels_per_task, [&](int64_t c0, int64_t c1) {
      const int64_t j0 = c0 * g.HW, j1 = c1 * g.HW, width = j1 - j0 + simd::lanes<acc_t>;
      std::vector<acc_t> acc(K * width);
      pixel_sums<acc_t, K>(rows, t, 0, g.N, j0, j1, acc.data(), width, f);
      for (int k = 0; k < K; ++k)
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t p = 0; p < g.HW; ++p) sums[k][c] += acc[k * width + (c - c0) * g.HW + p];
    });
    return sums;
  }
  if (!g.channels_last) {
    at::parallel_for(0, g.C, channels_per_task,
                     [&](int64_t c0, int64_t c1) { plane_sums<acc_t, K>(g, t, c0, c1, sums, f); });
    return sums;
  }
  // channels_last: chunks of pixels, each summing into its own padded [K][C] partials.
  const int64_t rows = g.count(), chunk = std::max<int64_t>(1, kGrain / std::max<int64_t>(g.C, 1));
  const int64_t chunks = (rows + chunk - 1) / chunk, width = g.C + simd::lanes<acc_t>;
  std::vector<acc_t> partial(chunks * K * width);
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ch = t0; ch < t1; ++ch)
      pixel_sums<acc_t, K>(g, t, ch * chunk, std::min(rows, (ch + 1) * chunk), 0, g.C, partial.data() + ch * K * width,
                           width, f);
  });
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int k = 0; k < K; ++k)
      for (int64_t c = 0; c < g.C; ++c) sums[k][c] += partial[(ch * K + k) * width + c];
  return sums;
}

// channel_affine (bn_act.h) of every channel.
template <typename acc_t>
struct ChannelAffine {
  std::vector<acc_t> scale, shift;

  ChannelAffine(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias)
      : scale(mean.numel()), shift(mean.numel()) {
    const acc_t *m = mean.const_data_ptr<acc_t>(), *is = invstd.const_data_ptr<acc_t>(),
                *w = weight.const_data_ptr<acc_t>(), *b = bias.const_data_ptr<acc_t>();
    for (size_t c = 0; c < scale.size(); ++c) channel_affine(m[c], is[c], w[c], b[c], scale[c], shift[c]);
  }
};

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
    const ChannelTables<acc_t, 0> none({}, g);
    auto s1 = channel_sums<acc_t, 1>(g, none, [&](const Run& r, const auto&) FB_LAMBDA_INLINE {
      return std::array<vec<acc_t>, 1>{simd::load_n<acc_t>(px + r.xi, r.n, r.whole)};
    })[0];
    for (auto& v : s1) v *= inv_count;
    const ChannelTables<acc_t, 1> first_mean({s1.data()}, g);
    auto s2 = channel_sums<acc_t, 2>(g, first_mean, [&](const Run& r, const auto& mu) FB_LAMBDA_INLINE {
      const vec<acc_t> d = simd::load_n<acc_t>(px + r.xi, r.n, r.whole) - mu[0];
      return std::array<vec<acc_t>, 2>{d, d * d};
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
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    const ChannelAffine<acc_t> affine(mean, invstd, weight, bias);
    const ChannelTables<acc_t, 2> t({affine.scale.data(), affine.shift.data()}, g);
    with_activation(activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      for_each_run(g, t, [&](const Run& r, const auto& ab) FB_LAMBDA_INLINE {
        const vec<acc_t> xv = simd::load_n<acc_t>(px + r.xi, r.n, r.whole);
        simd::store_activated<ACT, acc_t>(py + r.oi, xv * ab[0] + ab[1], r.n);
      });
    });
  });
  return y;
}

// The CPU BackwardImpl (bn_act.h).
BackwardTerms backward_cpu_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                bool batch_stats, int64_t activation, at::Tensor& out, bool accumulate) {
  const Geometry g = geometry(x);
  check_grad(grad, x, g);
  check_channel_params(x, {{&mean, "mean"}, {&invstd, "invstd"}, {&weight, "weight"}, {&bias, "bias"}});
  BackwardTerms terms{at::empty_like(mean), at::empty_like(mean)};
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t *px = x.const_data_ptr<scalar_t>(), *pdy = grad.const_data_ptr<scalar_t>();
    const ChannelAffine<acc_t> affine(mean, invstd, weight, bias);
    const ChannelTables<acc_t, 3> t({affine.scale.data(), affine.shift.data(), mean.const_data_ptr<acc_t>()}, g);
    with_activation(activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      // g = dy * act'(u) with u = x * scale + shift recomputed from x; returns g and x - mean
      auto grad_u = [&](const Run& r, const auto& p) FB_LAMBDA_INLINE {
        const vec<acc_t> xv = simd::load_n<acc_t>(px + r.xi, r.n, r.whole);
        const vec<acc_t> dy = simd::load_n<acc_t>(pdy + r.oi, r.n, r.whole);
        return std::array<vec<acc_t>, 2>{dy * simd::activate_grad<ACT, acc_t>(xv * p[0] + p[1]), xv - p[2]};
      };
      // SiLU's derivative costs an exp and a division per value, more on the CPU than writing g into
      // dx and reading it back, so the sums pass keeps it there for the dx pass. Not when dx is a shared
      // buffer (backward_into) or narrower than acc_t (g would be rounded).
      scalar_t* po = out.mutable_data_ptr<scalar_t>();
      const bool keep_g = ACT == kSiLU && std::is_same_v<scalar_t, acc_t> && !accumulate;
      auto sums = channel_sums<acc_t, 2>(g, t, [&](const Run& r, const auto& p) FB_LAMBDA_INLINE {
        const auto [d, xmu] = grad_u(r, p);
        if (keep_g) simd::store_n<acc_t>(po + r.oi, d, r.n);
        return std::array<vec<acc_t>, 2>{d, d * xmu};
      });
      const acc_t* is = invstd.const_data_ptr<acc_t>();
      acc_t *dweight = terms.dweight.mutable_data_ptr<acc_t>(), *dbias = terms.dbias.mutable_data_ptr<acc_t>();
      std::vector<acc_t> a(g.C), b(g.C);
      for (int64_t c = 0; c < g.C; ++c)
        backward_terms(sums[0][c], sums[1][c], is[c], g.count(), batch_stats, dweight[c], dbias[c], a[c], b[c]);
      const ChannelTables<acc_t, 5> tt({affine.scale.data(), affine.shift.data(), mean.const_data_ptr<acc_t>(),
                                        a.data(), b.data()}, g);
      for_each_run(g, tt, [&](const Run& r, const auto& p) FB_LAMBDA_INLINE {
        const auto [d, xmu] = keep_g ? std::array<vec<acc_t>, 2>{simd::load_n<acc_t>(po + r.oi, r.n, r.whole),
                                                                 simd::load_n<acc_t>(px + r.xi, r.n, r.whole) - p[2]}
                                     : grad_u(r, p);
        const vec<acc_t> dx = p[0] * (d - p[3] - xmu * p[4]);
        if (accumulate) {  // lanes past n are read (inside out's extent, like x's) but not stored
          simd::store_n<acc_t>(po + r.xi, simd::load_n<acc_t>(po + r.xi, r.n, r.whole) + dx, r.n);
        } else {
          simd::store_n<acc_t>(po + r.oi, dx, r.n);
        }
      });
    });
  });
  return terms;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastblocks_ext, m) {
  m.def("bn_act_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_act_forward(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, int activation) -> Tensor");
  m.def("bn_act_backward(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "bool batch_stats, int activation) -> (Tensor, Tensor, Tensor)");
  m.def("bn_act_backward_into(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "bool batch_stats, int activation, Tensor(a!) grad_x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastblocks_ext, CPU, m) {
  m.impl("bn_act_stats", &stats_cpu);
  m.impl("bn_act_forward", &forward_cpu);
  m.impl("bn_act_backward", &backward_op<backward_cpu_impl>);
  m.impl("bn_act_backward_into", &backward_into_op<backward_cpu_impl>);
}

}  // namespace bn_act
}  // namespace fastblocks
