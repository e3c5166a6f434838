"""Fused BatchNorm + activation, ``act((x - mean) * invstd * weight + bias)``, over a (channel slice of a) tensor.

``act`` is one of ``ACTIVATIONS`` (none, relu, relu6, silu, hardswish; the codes of csrc/activations.h).
Two users:
- conv -> BN -> act of MobileNet / EfficientNet (:class:`fastblocks.nn.blocks.ConvNormAct`): one pass
  over the conv output instead of two, and backward keeps only the conv output (not the BN output too).
- memory-efficient DenseNet (Pleiss et al. 2017, ReLU): a dense block keeps one feature buffer ``buf``
  of [N, C_total, H, W] and every layer normalises the view ``buf[:, :c]``.
The kernels read x in place, also when it is such a channel slice: in NCHW each image's [c, H, W]
block is contiguous (the images are C_total * H * W apart), in channels_last each pixel's c channels
are contiguous (the pixels are C_total apart), so each layout has one free stride. Outputs are dense
in the layout of the input.

Three registered ops:
    fastblocks::bn_act_stats(x)                                          -> per-channel mean, biased var
    fastblocks::bn_act(x, mean, invstd, weight, bias, batch_stats, activation)           -> y
    fastblocks::bn_act_backward(grad, x, mean, invstd, weight, bias, batch_stats, activation)
                                                                         -> dx, dweight, dbias
The statistics are separate from the normalisation so that a dense block computes the statistics of
each channel once (its values never change after it is written) and every later layer reuses them.
Backward saves x (a view, no copy) and the per-channel mean / invstd and recomputes the rest
(u = x * scale + shift and act'(u), with the forward's formula); with ``batch_stats`` the gradient
flows through the batch mean and variance as in ``nn.BatchNorm2d``.
Statistics, weights and gradients of weights are float32 (float64 for float64 inputs); variances
are computed in two passes (the corrected two-pass algorithm: a first mean, then the sums of d and
d^2 with d = x - mean, which also remove the first mean's rounding error), so there is no cancellation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastblocks import _ext
from fastblocks._backend import register_op, resolve
from fastblocks.ops._common import as_param, check_tensor, custom_op, images_contiguous
from fastblocks.ops._triton import acc_type, activate, activate_grad, launches_on_input_device, split_work, tl, triton
from fastblocks.ops.dwconv_bn_act import (ACTIVATIONS, _combine_stats, _torch_act_, _torch_act_backward,
                                         _torch_affine)

register_op("bn_act", "bn_act_forward")


# ---------------------------------------------------------------------------------------------
# Layout: NCHW or channels_last, possibly a channel slice of a larger tensor.
# ---------------------------------------------------------------------------------------------

def _slice_layout(x: Tensor) -> bool | None:
    """False for NCHW (each image contiguous), True for channels_last (each pixel's channels
    contiguous, uniform pixel stride), None otherwise. Mirrors geometry() in csrc/bn_act/bn_act.h."""
    N, C, H, W = x.shape
    sN, sC, sH, sW = x.stride()
    if x.numel() == 0 or images_contiguous(x):
        return False
    s = sW if W > 1 else sH if H > 1 else sN if N > 1 else C
    nhwc = (C == 1 or sC == 1) and (W == 1 or sW == s) and (H == 1 or sH == W * s) and (N == 1 or sN == H * W * s)
    return True if nhwc else None


def _normalise(x: Tensor) -> tuple[Tensor, bool]:
    """x (a copy if its layout is neither) and whether it is channels_last."""
    channels_last = _slice_layout(x)
    if channels_last is None:
        return x.contiguous(), False
    return x, channels_last


def _x_stride(x: Tensor, channels_last: bool) -> int:
    """The one free stride: between pixels (channels_last) or between images (NCHW)."""
    N, C, H, W = x.shape
    if channels_last:
        return x.stride(3) if W > 1 else x.stride(2) if H > 1 else x.stride(0) if N > 1 else C
    return x.stride(0) if N > 1 else C * H * W


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty_out(x: Tensor, channels_last: bool) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(channels_last))


def stat_dtype(x: Tensor) -> torch.dtype:
    """dtype of the statistics, weights and weight gradients: float64 for float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale_shift(mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """u = x * scale + shift, y = act(u); the same formula in forward and in backward's recomputed u."""
    scale = weight * invstd
    return scale, bias - mean * scale


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the `torch` backend and the test oracle.
# ---------------------------------------------------------------------------------------------

def _per_channel(t: Tensor) -> Tensor:
    return t[:, None, None]


def _stats_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x.to(stat_dtype(x)), dim=(0, 2, 3), correction=0)
    return mean, var


def _forward_torch(x, mean, invstd, weight, bias, activation, channels_last):
    scale, shift = _scale_shift(mean, invstd, weight, bias)
    y = _torch_act_(_torch_affine(x, scale, shift), activation).to(x.dtype)
    return y.contiguous(memory_format=_format(channels_last))


def _backward_torch(grad, x, mean, invstd, weight, bias, batch_stats, activation, channels_last):
    scale, shift = _scale_shift(mean, invstd, weight, bias)
    xf = x.to(scale.dtype)
    dym = _torch_act_backward(grad.to(scale.dtype), _torch_affine(xf, scale, shift), activation)
    xmu = xf - _per_channel(mean)
    dbias = dym.sum((0, 2, 3))
    dweight = (dym * xmu).sum((0, 2, 3)) * invstd
    count = x.numel() // max(x.shape[1], 1)
    if batch_stats and count:
        dym = dym - _per_channel(dbias / count) - xmu * _per_channel(dweight * invstd / count)
    dx = (dym * _per_channel(scale)).to(x.dtype).contiguous(memory_format=_format(channels_last))
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# Triton kernels. Value j of channel c (j over the N * H * W pixels) is at x_index in x and
# out_index in the dense y / grad / dx. A reduction program owns a tile of channels and one part
# of the pixels (enough parts to fill the GPU, see split_work) and writes one partial row; torch
# finishes the [parts, C] partials. Elementwise programs own a tile of pixels x channels.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _indices(j, c, C, HW, x_stride, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return j * x_stride + c, j * C + c
    else:
        n = (j.to(tl.int32) // HW).to(tl.int64)  # 32 bits (count < 2^31, see _geometry): 64-bit division is slow
        p = j - n * HW
        return n * x_stride + c * HW + p, (n * C + c) * HW + p


@triton.jit
def _part(count, chunk, C, BLOCK_C: tl.constexpr):
    """This program's channels, its part of the pixels [j_begin, j_end) and its partial-row offset."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    part = tl.program_id(1)
    j_begin = part.to(tl.int64) * chunk
    return c, c < C, j_begin, tl.minimum(j_begin + chunk, count), part * C + c


@triton.jit
def _chunk(j0, j_end, c, cmask, C, HW, x_stride, CHANNELS_LAST: tl.constexpr, BLOCK_J: tl.constexpr):
    """Mask and (x, output) offsets of the BLOCK_J pixels from j0 (up to j_end) of channels c."""
    j = j0 + tl.arange(0, BLOCK_J)
    xi, oi = _indices(j[:, None], c[None, :], C, HW, x_stride, CHANNELS_LAST)
    return (j < j_end)[:, None] & cmask[None, :], xi, oi


@triton.jit
def _stats_kernel(X, MEAN, M2, C, HW, count, chunk, x_stride, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """The part's per-channel mean and M2, two passes over it (the second around the first mean)."""
    c, cmask, j_begin, j_end, out = _part(count, chunk, C, BLOCK_C)
    n = (j_end - j_begin).to(ACC)
    total = tl.zeros([BLOCK_C], dtype=ACC)
    for j0 in range(j_begin, j_end, BLOCK_J):
        mask, xi, _ = _chunk(j0, j_end, c, cmask, C, HW, x_stride, CHANNELS_LAST, BLOCK_J)
        total += tl.sum(tl.load(X + xi, mask=mask, other=0.0).to(ACC), axis=0)
    mean = total / n
    sum_d = tl.zeros([BLOCK_C], dtype=ACC)
    sum_d2 = tl.zeros([BLOCK_C], dtype=ACC)
    for j0 in range(j_begin, j_end, BLOCK_J):
        mask, xi, _ = _chunk(j0, j_end, c, cmask, C, HW, x_stride, CHANNELS_LAST, BLOCK_J)
        d = tl.where(mask, tl.load(X + xi, mask=mask, other=0.0).to(ACC) - mean[None, :], 0.0)
        sum_d += tl.sum(d, axis=0)
        sum_d2 += tl.sum(d * d, axis=0)
    shift = sum_d / n  # the rounding error of the first mean, removed from both
    tl.store(MEAN + out, mean + shift, mask=cmask)
    tl.store(M2 + out, tl.maximum(sum_d2 - n * shift * shift, 0.0), mask=cmask)


@triton.jit
def _elementwise_tile(X, SCALE, SHIFT, C, HW, count, x_stride, CHANNELS_LAST: tl.constexpr, BLOCK_J: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """This program's tile of pixels x channels: its channels, mask, x and output offsets, x as
    loaded, and the per-channel scale and shift of u = x * scale + shift."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask, xi, oi = _chunk(tl.program_id(0).to(tl.int64) * BLOCK_J, count, c, cmask, C, HW, x_stride,
                          CHANNELS_LAST, BLOCK_J)
    scale = tl.load(SCALE + c, mask=cmask, other=0.0)
    shift = tl.load(SHIFT + c, mask=cmask, other=0.0)
    return c, cmask, mask, xi, oi, tl.load(X + xi, mask=mask, other=0.0), scale[None, :], shift[None, :]


@triton.jit
def _forward_kernel(X, SCALE, SHIFT, Y, C, HW, count, x_stride, ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    _, _, mask, _, oi, x, scale, shift = _elementwise_tile(X, SCALE, SHIFT, C, HW, count, x_stride, CHANNELS_LAST,
                                                           BLOCK_J, BLOCK_C)
    tl.store(Y + oi, activate(x.to(ACC) * scale + shift, ACT).to(x.dtype), mask=mask)


@triton.jit
def _grad_sums_kernel(DY, X, MEAN, SCALE, SHIFT, SUM_G, SUM_GX, C, HW, count, chunk, x_stride, ACT: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """The part's per-channel sums of g = dy * act'(u) and of g * (x - mean)."""
    c, cmask, j_begin, j_end, out = _part(count, chunk, C, BLOCK_C)
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    scale = tl.load(SCALE + c, mask=cmask, other=0.0)
    shift = tl.load(SHIFT + c, mask=cmask, other=0.0)
    sum_g = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_C], dtype=ACC)
    for j0 in range(j_begin, j_end, BLOCK_J):
        mask, xi, oi = _chunk(j0, j_end, c, cmask, C, HW, x_stride, CHANNELS_LAST, BLOCK_J)
        x = tl.load(X + xi, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + oi, mask=mask, other=0.0).to(ACC)
        g = dy * activate_grad(x * scale[None, :] + shift[None, :], ACT)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * (x - mean[None, :]), axis=0)
    tl.store(SUM_G + out, sum_g, mask=cmask)
    tl.store(SUM_GX + out, sum_gx, mask=cmask)


@triton.jit
def _dx_kernel(DY, X, MEAN, SCALE, SHIFT, A, B, DX, C, HW, count, x_stride, ACT: tl.constexpr,
               BATCH_STATS: tl.constexpr, ACCUMULATE: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
               BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = scale * (g - a - (x - mean) * b); a = b = 0 with running statistics. ACCUMULATE: dx is
    added into DX, laid out like x (at x's offsets), instead of stored into the dense DX."""
    c, cmask, mask, xi, oi, xr, scale, shift = _elementwise_tile(X, SCALE, SHIFT, C, HW, count, x_stride,
                                                                 CHANNELS_LAST, BLOCK_J, BLOCK_C)
    x = xr.to(ACC)
    g = tl.load(DY + oi, mask=mask, other=0.0).to(ACC) * activate_grad(x * scale + shift, ACT)
    if BATCH_STATS:
        mean = tl.load(MEAN + c, mask=cmask, other=0.0)
        a = tl.load(A + c, mask=cmask, other=0.0)
        b = tl.load(B + c, mask=cmask, other=0.0)
        g = g - a[None, :] - (x - mean[None, :]) * b[None, :]
    if ACCUMULATE:
        total = tl.load(DX + xi, mask=mask, other=0.0).to(ACC) + scale * g
        tl.store(DX + xi, total.to(xr.dtype), mask=mask)
    else:
        tl.store(DX + oi, (scale * g).to(xr.dtype), mask=mask)


def _tiles(C: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_J, BLOCK_C): wide along the contiguous dimension (channels or pixels)."""
    if channels_last:
        return 32, min(64, triton.next_power_of_2(C))
    return 256, min(4, triton.next_power_of_2(C))


def _geometry(x: Tensor, channels_last: bool) -> tuple[int, int, int, int]:
    N, C, H, W = x.shape
    if N * H * W >= 2 ** 31:
        raise ValueError(f"the Triton bn_act kernels take fewer than 2^31 values per channel, got x of shape "
                         f"{tuple(x.shape)}; use impl='cuda' or 'torch'")
    return C, H * W, N * H * W, _x_stride(x, channels_last)


def _reduction_grid(x: Tensor, C: int, count: int, bj: int, bc: int) -> tuple[tuple[int, int], int]:
    """((channel tiles, parts), pixels per part) of a reduction launch."""
    c_tiles = triton.cdiv(C, bc)
    parts, chunk = split_work(count, bj, c_tiles, x.device)
    return (c_tiles, parts), chunk


@launches_on_input_device
def _stats_triton(x, channels_last):
    C, HW, count, xs = _geometry(x, channels_last)
    if not (count and C):
        mean = torch.zeros(C, dtype=stat_dtype(x), device=x.device)
        return mean, torch.zeros_like(mean)
    bj, bc = _tiles(C, channels_last)
    grid, chunk = _reduction_grid(x, C, count, bj, bc)
    mean, m2 = (torch.empty((grid[1], C), dtype=stat_dtype(x), device=x.device) for _ in range(2))
    _stats_kernel[grid](x, mean, m2, C, HW, count, chunk, xs, CHANNELS_LAST=channels_last, ACC=acc_type(x),
                        BLOCK_J=bj, BLOCK_C=bc)
    sizes = (count - torch.arange(grid[1], device=x.device, dtype=mean.dtype) * chunk).clamp(max=chunk)
    return _combine_stats(mean, m2, sizes)


@launches_on_input_device
def _forward_triton(x, mean, invstd, weight, bias, activation, channels_last):
    C, HW, count, xs = _geometry(x, channels_last)
    y = _empty_out(x, channels_last)
    if y.numel():
        scale, shift = _scale_shift(mean, invstd, weight, bias)
        bj, bc = _tiles(C, channels_last)
        _forward_kernel[(triton.cdiv(count, bj), triton.cdiv(C, bc))](
            x, scale, shift, y, C, HW, count, xs, ACT=ACTIVATIONS.index(activation), CHANNELS_LAST=channels_last,
            ACC=acc_type(x), BLOCK_J=bj, BLOCK_C=bc)
    return y


@launches_on_input_device
def _backward_triton(grad, x, mean, invstd, weight, bias, batch_stats, activation, channels_last, grad_x=None):
    C, HW, count, xs = _geometry(x, channels_last)
    dx = _empty_out(x, channels_last) if grad_x is None else grad_x
    if not dx.numel():
        return dx, torch.zeros_like(mean), torch.zeros_like(mean)
    scale, shift = _scale_shift(mean, invstd, weight, bias)
    bj, bc = _tiles(C, channels_last)
    act, acc = ACTIVATIONS.index(activation), acc_type(x)
    grid, chunk = _reduction_grid(x, C, count, bj, bc)
    sum_g, sum_gx = (torch.empty((grid[1], C), dtype=mean.dtype, device=x.device) for _ in range(2))
    _grad_sums_kernel[grid](grad, x, mean, scale, shift, sum_g, sum_gx, C, HW, count, chunk, xs, ACT=act,
                            CHANNELS_LAST=channels_last, ACC=acc, BLOCK_J=bj, BLOCK_C=bc)
    dbias, dweight = sum_g.sum(0), sum_gx.sum(0) * invstd
    a, b = dbias / count, dweight * invstd / count  # the gradient through the batch mean and variance
    _dx_kernel[(triton.cdiv(count, bj), triton.cdiv(C, bc))](
        grad, x, mean, scale, shift, a, b, dx, C, HW, count, xs, ACT=act, BATCH_STATS=batch_stats,
        ACCUMULATE=grad_x is not None, CHANNELS_LAST=channels_last, ACC=acc, BLOCK_J=bj, BLOCK_C=bc)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# Backend dispatch on a resolved backend name. DenseNet's block calls these directly (no autograd,
# no custom-op overhead); the registered ops below call them too. ``activation`` is a name of
# ACTIVATIONS, already checked.
# ---------------------------------------------------------------------------------------------

def batch_stats(x: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x over N, H, W, in ``stat_dtype(x)``. No autograd."""
    x, channels_last = _normalise(x)
    if impl == "torch":
        return _stats_torch(x)
    if impl == "triton":
        return _stats_triton(x, channels_last)
    return _ext.op("bn_act_stats")(x)


def bn_act_forward(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, activation: str,
                   impl: str) -> Tensor:
    x, channels_last = _normalise(x)
    if impl == "torch":
        return _forward_torch(x, mean, invstd, weight, bias, activation, channels_last)
    if impl == "triton":
        return _forward_triton(x, mean, invstd, weight, bias, activation, channels_last)
    return _ext.op("bn_act_forward")(x, mean, invstd, weight, bias, ACTIVATIONS.index(activation))


def bn_act_backward(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor,
                    batch_stats: bool, activation: str, impl: str,
                    grad_x: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dx is dense in x's layout (channels_last or NCHW).

    With ``grad_x`` (x's shape and dtype; DenseNet's shared gradient buffer), dx is added into it and
    ``grad_x`` is returned as dx. When it has x's strides (a slice of a buffer shaped like x's) the
    kernels add as they go: dx is never written on its own and read back.
    """
    x_in = x
    x, channels_last = _normalise(x)
    grad = grad.contiguous(memory_format=_format(channels_last))
    if grad_x is not None and (x is not x_in or grad_x.stride() != x.stride() or impl == "torch"):
        dx, dweight, dbias = bn_act_backward(grad, x, mean, invstd, weight, bias, batch_stats, activation, impl)
        return grad_x.add_(dx), dweight, dbias
    if impl == "torch":
        return _backward_torch(grad, x, mean, invstd, weight, bias, batch_stats, activation, channels_last)
    if impl == "triton":
        return _backward_triton(grad, x, mean, invstd, weight, bias, batch_stats, activation, channels_last, grad_x)
    code = ACTIVATIONS.index(activation)
    if grad_x is not None:
        return grad_x, *_ext.op("bn_act_backward_into")(grad, x, mean, invstd, weight, bias, batch_stats, code, grad_x)
    return _ext.op("bn_act_backward")(grad, x, mean, invstd, weight, bias, batch_stats, code)


# ---------------------------------------------------------------------------------------------
# Registered ops: torch.ops.fastblocks.* with fake kernels and autograd.
# ---------------------------------------------------------------------------------------------

@custom_op("fastblocks::bn_act_stats")
def _stats_op(x: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    return batch_stats(x, impl)


@_stats_op.register_fake
def _(x, impl):
    mean = x.new_empty(x.shape[1], dtype=stat_dtype(x))
    return mean, torch.empty_like(mean)


@custom_op("fastblocks::bn_act")
def _bn_act_op(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, batch_stats: bool,
               activation: str, impl: str) -> Tensor:
    return bn_act_forward(x, mean, invstd, weight, bias, activation, impl)


@_bn_act_op.register_fake
def _(x, mean, invstd, weight, bias, batch_stats, activation, impl):
    return _empty_out(*_normalise(x))


@custom_op("fastblocks::bn_act_backward")
def _bn_act_backward_op(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor,
                        batch_stats: bool, activation: str, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    return bn_act_backward(grad, x, mean, invstd, weight, bias, batch_stats, activation, impl)


@_bn_act_backward_op.register_fake
def _(grad, x, mean, invstd, weight, bias, batch_stats, activation, impl):
    return _empty_out(*_normalise(x)), torch.empty_like(mean), torch.empty_like(mean)


def _setup(ctx, inputs, output):
    x, mean, invstd, weight, bias, ctx.batch_stats, ctx.activation, ctx.impl = inputs
    ctx.save_for_backward(x, mean, invstd, weight, bias)


def _grad(ctx, grad):
    x, mean, invstd, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _bn_act_backward_op(grad, x, mean, invstd, weight, bias, ctx.batch_stats, ctx.activation,
                                             ctx.impl)
    return dx, None, None, dweight, dbias, None, None, None


_bn_act_op.register_autograd(_grad, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# Public functional API.
# ---------------------------------------------------------------------------------------------

def _check_channel_vector(t, name: str, x: Tensor) -> None:
    check_tensor(t, name)
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape [C] = [{x.shape[1]}], got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def bn_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None = None,
           running_var: Tensor | None = None, training: bool = True, eps: float = 1e-5, activation: str = "relu",
           impl: str | None = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """``act(batch_norm(x))`` as one fused op; returns ``(y, mean, var)``.

    ``activation``: one of ``ACTIVATIONS`` ("none", "relu", "relu6", "silu", "hardswish").
    With ``training=True`` (or no running statistics) x is normalised with its own batch statistics
    and ``mean`` / ``var`` are those (biased variance), for the caller to fold into its running
    statistics (``fastblocks.nn._batchnorm.update_running_stats``). Otherwise ``running_mean`` /
    ``running_var`` normalise and are returned. ``weight`` / ``bias`` may be None (affine=False).
    x may be a channel slice of an NCHW or channels_last buffer; it is read in place.
    """
    check_tensor(x, "x", ndim=4)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    C = x.shape[1]
    dtype = stat_dtype(x)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        if t is not None:
            _check_channel_vector(t, name, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    use_batch = training or running_mean is None
    if use_batch and x.numel() // max(C, 1) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    impl = resolve("bn_act", impl, x)
    if use_batch:
        xd = x.detach()
        mean, var = _stats_op(xd, impl)
    else:
        mean, var = as_param(running_mean, dtype), as_param(running_var, dtype)
    weight = torch.ones(C, dtype=dtype, device=x.device) if weight is None else as_param(weight, dtype)
    bias = torch.zeros(C, dtype=dtype, device=x.device) if bias is None else as_param(bias, dtype)
    invstd = torch.rsqrt(var + eps)
    return _bn_act_op(x, mean, invstd, weight, bias, use_batch, activation, impl), mean, var


__all__ = ["ACTIVATIONS", "batch_stats", "bn_act", "bn_act_backward", "bn_act_forward", "stat_dtype"]
