// hard-swish, hard-sigmoid and the hard-sigmoid gate x * hardsigmoid(g[n, c]):
// schemas and C++ CPU kernels. The CUDA kernels are in hardswish_cuda.cu.
#include <ATen/Parallel.h>

#include <algorithm>

#include "activations.h"
#include "cpu_simd.h"
#include "fastblocks.h"

namespace fastblocks {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task: large enough to amortise a task

// out[i] = op(a[i], b[i]) over [begin, end) of flat storage, in vectors of the accumulation dtype
// (b == nullptr: the unary form, op's second operand is zero).
template <typename scalar_t, typename Op>
FB_CPU_MULTIVERSION void map_loop(const scalar_t* __restrict a, const scalar_t* __restrict b,
                                  scalar_t* __restrict out, int64_t begin, int64_t end, Op op) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int L = simd::lanes<acc_t>;
  for (int64_t i = begin; i < end; i += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, end - i));
    const simd::vec<acc_t> vb = b == nullptr ? simd::vec<acc_t>{} : simd::load_n<acc_t>(b + i, n);
    simd::store_n<acc_t>(out + i, op(simd::load_n<acc_t>(a + i, n), vb), n);
  }
}

// Elementwise kernels over dense tensors that share strides; b may be undefined (unary op).
template <typename scalar_t, typename Op>
void map_elementwise(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, Op op) {
  const scalar_t* pa = a.const_data_ptr<scalar_t>();
  const scalar_t* pb = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, a.numel(), kGrain,
                   [&](int64_t begin, int64_t end) { map_loop<scalar_t>(pa, pb, o, begin, end, op); });
}

at::Tensor check_input(const at::Tensor& x) {
  check_floating(x, "x");
  check_dense(x, "x");
  return at::empty_like(x);
}

at::Tensor hardswish_forward_cpu(const at::Tensor& x) {
  at::Tensor out = check_input(x);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardswish_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    map_elementwise<scalar_t>(x, {}, out, [](auto v, auto) FB_LAMBDA_INLINE { return simd::activate<kHardSwish, acc_t>(v); });
  });
  return out;
}

at::Tensor hardswish_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  at::Tensor out = check_input(x);
  check_same_layout(grad, "grad", x, "x");
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardswish_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    map_elementwise<scalar_t>(grad, x, out,
                              [](auto dy, auto v) FB_LAMBDA_INLINE { return dy * simd::activate_grad<kHardSwish, acc_t>(v); });
  });
  return out;
}

at::Tensor hardsigmoid_forward_cpu(const at::Tensor& x) {
  at::Tensor out = check_input(x);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardsigmoid_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    map_elementwise<scalar_t>(x, {}, out, [](auto v, auto) FB_LAMBDA_INLINE { return simd::hardsigmoid<acc_t>(v); });
  });
  return out;
}

at::Tensor hardsigmoid_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  at::Tensor out = check_input(x);
  check_same_layout(grad, "grad", x, "x");
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardsigmoid_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    map_elementwise<scalar_t>(grad, x, out,
                              [](auto dy, auto v) FB_LAMBDA_INLINE { return dy * simd::hardsigmoid_grad<acc_t>(v); });
  });
  return out;
}

// out[i] = x[i] * s[i], or x[i] * s[0] with BROADCAST (an NCHW plane and its one gate).
template <bool BROADCAST, typename scalar_t, typename acc_t>
FB_CPU_MULTIVERSION void gate_row(const scalar_t* __restrict x, const acc_t* __restrict s, scalar_t* __restrict out,
                                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * s[BROADCAST ? 0 : i]);
}

// One channels_last pixel: dx = dy * s and the per-channel dot products sum += dy * x.
template <typename scalar_t, typename acc_t>
FB_CPU_MULTIVERSION void gate_backward_pixel(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                             const acc_t* __restrict s, scalar_t* __restrict dx,
                                             acc_t* __restrict sum, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = static_cast<acc_t>(dy[c]);
    sum[c] += d * static_cast<acc_t>(x[c]);
    dx[c] = static_cast<scalar_t>(d * s[c]);
  }
}

// The gate g is [N, C] (contiguous), one value per plane of x.
void check_gate(const at::Tensor& x, const at::Tensor& g) {
  check_floating(x, "x");
  TORCH_CHECK(g.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == x.size(1) && g.is_contiguous(),
              "g must be a contiguous [N, C] = [", x.size(0), ", ", x.size(1), "] tensor, got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "g must have the dtype of x (", x.scalar_type(), "), got ",
              g.scalar_type());
}

at::Tensor hardsigmoid_gate_forward_cpu(const at::Tensor& x, const at::Tensor& g) {
  const bool channels_last = is_channels_last_4d(x, "x");
  check_gate(x, g);
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardsigmoid_gate_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (!channels_last) {  // one plane per (n, c): a scalar gate times a contiguous row
      at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(HW, 1)), [&](int64_t b, int64_t e) {
        for (int64_t nc = b; nc < e; ++nc) {
          const acc_t s = hardsigmoid(static_cast<acc_t>(pg[nc]));
          gate_row</*BROADCAST=*/true>(px + nc * HW, &s, po + nc * HW, HW);
        }
      });
    } else {  // one pixel per row of C channels: a vector of C gates per image
      std::vector<acc_t> gates(N * C);
      for (int64_t i = 0; i < N * C; ++i) gates[i] = hardsigmoid(static_cast<acc_t>(pg[i]));
      at::parallel_for(0, N * HW, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p) {
          gate_row</*BROADCAST=*/false>(px + p * C, gates.data() + (p / HW) * C, po + p * C, C);
        }
      });
    }
  });
  return out;
}

// dx = dy * hardsigmoid(g); dg[n, c] = hardsigmoid'(g[n, c]) * sum_hw dy * x. One pass over dy and x.
std::tuple<at::Tensor, at::Tensor> hardsigmoid_gate_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& g) {
  const bool channels_last = is_channels_last_4d(x, "x");
  check_gate(x, g);
  check_same_layout(grad, "grad", x, "x");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dg = at::empty_like(g);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  FB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hardsigmoid_gate_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = grad.const_data_ptr<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    scalar_t* pdg = dg.mutable_data_ptr<scalar_t>();
    if (!channels_last) {
      at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(HW, 1)), [&](int64_t b, int64_t e) {
        for (int64_t nc = b; nc < e; ++nc) {
          const acc_t gv = static_cast<acc_t>(pg[nc]);
          const acc_t s = hardsigmoid(gv);
          acc_t sum = 0;
          for (int64_t i = nc * HW; i < (nc + 1) * HW; ++i) {
            const acc_t dy = static_cast<acc_t>(pdy[i]);
            sum += dy * static_cast<acc_t>(px[i]);
            pdx[i] = static_cast<scalar_t>(dy * s);
          }
          pdg[nc] = static_cast<scalar_t>(sum * hardsigmoid_grad(gv));
        }
      });
    } else {
      // Parallel over images; each task accumulates the C channel sums of its image in a local row.
      at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> s(C), sum(C);
        for (int64_t n = b; n < e; ++n) {
          for (int64_t c = 0; c < C; ++c) {
            s[c] = hardsigmoid(static_cast<acc_t>(pg[n * C + c]));
            sum[c] = 0;
          }
          for (int64_t p = n * HW; p < (n + 1) * HW; ++p)
            gate_backward_pixel(pdy + p * C, px + p * C, s.data(), pdx + p * C, sum.data(), C);
          for (int64_t c = 0; c < C; ++c)
            pdg[n * C + c] = static_cast<scalar_t>(sum[c] * hardsigmoid_grad(static_cast<acc_t>(pg[n * C + c])));
        }
      });
    }
  });
  return {dx, dg};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastblocks_ext, m) {
  m.def("hardswish_forward(Tensor x) -> Tensor");
  m.def("hardswish_backward(Tensor grad, Tensor x) -> Tensor");
  m.def("hardsigmoid_forward(Tensor x) -> Tensor");
  m.def("hardsigmoid_backward(Tensor grad, Tensor x) -> Tensor");
  m.def("hardsigmoid_gate_forward(Tensor x, Tensor g) -> Tensor");
  m.def("hardsigmoid_gate_backward(Tensor grad, Tensor x, Tensor g) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastblocks_ext, CPU, m) {
  m.impl("hardswish_forward", &hardswish_forward_cpu);
  m.impl("hardswish_backward", &hardswish_backward_cpu);
  m.impl("hardsigmoid_forward", &hardsigmoid_forward_cpu);
  m.impl("hardsigmoid_backward", &hardsigmoid_backward_cpu);
  m.impl("hardsigmoid_gate_forward", &hardsigmoid_gate_forward_cpu);
  m.impl("hardsigmoid_gate_backward", &hardsigmoid_gate_backward_cpu);
}

}  // namespace fastblocks
