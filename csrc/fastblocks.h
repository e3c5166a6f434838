// Shared by every fastblocks kernel file: input checks and the dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

// fp32, fp64, fp16, bf16 — the dtypes every fastblocks kernel supports.
#define FB_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Compile a hot CPU loop for AVX-512, AVX2 and baseline x86-64, picked at load time: the extension is
// built without -march flags so that it runs everywhere, and this recovers the vector width eager has.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FB_CPU_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FB_CPU_MULTIVERSION
#endif

namespace fastblocks {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name,
              " must be dense (contiguous in some dimension order); call .contiguous() first");
}

// Elementwise kernels index the flat storage of dense tensors, so every operand must share strides.
inline void check_same_layout(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(a.sizes() == b.sizes(), a_name, " and ", b_name, " must have the same shape, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.strides() == b.strides(), a_name, " and ", b_name, " must have the same strides, got ", a.strides(),
              " and ", b.strides());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

// NCHW-contiguous or channels_last: the two layouts the per-channel kernels index directly.
inline bool is_channels_last_4d(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, " must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  if (x.is_contiguous()) return false;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be contiguous or channels_last, got strides ", x.strides());
  return true;
}

}  // namespace fastblocks
