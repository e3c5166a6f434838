"""hard-swish, hard-sigmoid and the hard-sigmoid gate ``x * hardsigmoid(g[n, c])``.

    hardsigmoid(x) = clamp(x / 6 + 1/2, 0, 1)       hardswish(x) = x * hardsigmoid(x)

Gradients at the kinks follow PyTorch: hardsigmoid' is 1/6 on the open interval (-3, 3) and 0
elsewhere; hardswish' is 0 up to -3, x/3 + 1/2 strictly inside (-3, 3) and 1 from 3 on.

The gate is MobileNetV3's squeeze-excite output: ``g`` holds one value per (n, c) (shape [N, C] or
[N, C, 1, 1]) and scales every pixel of that plane. Its backward reduces ``dy * x`` over H, W.

Every op is memory-bound: one read of each input, one write of each output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastblocks import _ext
from fastblocks._backend import register_op, resolve
from fastblocks.ops._common import CustomOp, check_same, check_tensor, custom_op, dense, is_channels_last, like, nchw_or_nhwc
from fastblocks.ops._triton import acc_type, clamp, grid1d, launches_on_input_device, tile_offsets, tl, triton

register_op("hardswish", "hardswish_forward")
register_op("hardsigmoid", "hardsigmoid_forward")
register_op("hardsigmoid_gate", "hardsigmoid_gate_forward")


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the `torch` backend and the test oracle.
# ---------------------------------------------------------------------------------------------

def hardsigmoid_gate_reference(x: Tensor, g: Tensor) -> Tensor:
    return x * F.hardsigmoid(g.reshape(g.shape[0], g.shape[1], 1, 1))


# ---------------------------------------------------------------------------------------------
# Triton kernels. Math in fp32 (fp64 stays fp64); flat indexing over dense storage.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _hardsigmoid_math(x):
    return clamp(x / 6.0 + 0.5, 0.0, 1.0)


@triton.jit
def _act_grad_math(x, HARDSWISH: tl.constexpr):
    if HARDSWISH:
        return tl.where(x <= -3.0, 0.0, tl.where(x < 3.0, x / 3.0 + 0.5, 1.0))
    else:
        return tl.where((x > -3.0) & (x < 3.0), 1.0 / 6.0, 0.0)


@triton.jit
def _act_forward_kernel(X, Y, n, HARDSWISH: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    xf = x.to(ACC)
    y = _hardsigmoid_math(xf)
    if HARDSWISH:
        y = xf * y
    tl.store(Y + offs, y.to(x.dtype), mask=mask)


@triton.jit
def _act_backward_kernel(DY, X, DX, n, HARDSWISH: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    dy = tl.load(DY + offs, mask=mask, other=0.0)
    grad = dy.to(ACC) * _act_grad_math(x.to(ACC), HARDSWISH)
    tl.store(DX + offs, grad.to(x.dtype), mask=mask)


@triton.jit
def _gate_forward_kernel(X, G, Y, C, HW, blocks_per_image, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    """One program per block of an image's C * HW values: each value's gate index takes one 32-bit
    division within the image instead of 64-bit ones over the whole tensor."""
    pid = tl.program_id(0)
    n = (pid // blocks_per_image).to(tl.int64)
    i = (pid % blocks_per_image) * BLOCK + tl.arange(0, BLOCK)
    mask = i < C * HW
    if CHANNELS_LAST:
        gidx = n * C + i % C
    else:
        gidx = n * C + i // HW
    offs = n * C * HW + i
    x = tl.load(X + offs, mask=mask, other=0.0)
    g = tl.load(G + gidx, mask=mask, other=0.0)
    y = x.to(ACC) * _hardsigmoid_math(g.to(ACC))
    tl.store(Y + offs, y.to(x.dtype), mask=mask)


@triton.jit
def _gate_backward_kernel(DY, X, G, DX, DG, C, HW, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (image, channel tile): dx for the tile and dg = hsig'(g) * sum_p dy * x."""
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    g = tl.load(G + n * C + cs, mask=cmask, other=0.0)
    gf = g.to(ACC)
    s = _hardsigmoid_math(gf)
    total = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, HW, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        offs = tile_offsets(n, ps, cs, C, HW, CHANNELS_LAST)
        mask = (ps[:, None] < HW) & cmask[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        total += tl.sum(dy * x.to(ACC), axis=0)
        tl.store(DX + offs, (dy * s[None, :]).to(x.dtype), mask=mask)
    tl.store(DG + n * C + cs, (total * _act_grad_math(gf, False)).to(g.dtype), mask=cmask)


_BLOCK = 1024


@launches_on_input_device
def _triton_act_forward(x: Tensor, hardswish: bool) -> Tensor:
    out = torch.empty_like(x)
    if x.numel():
        _act_forward_kernel[grid1d(x.numel(), _BLOCK)](x, out, x.numel(), HARDSWISH=hardswish,
                                                           ACC=acc_type(x), BLOCK=_BLOCK)
    return out


@launches_on_input_device
def _triton_act_backward(grad: Tensor, x: Tensor, hardswish: bool) -> Tensor:
    out = torch.empty_like(x)
    if x.numel():
        _act_backward_kernel[grid1d(x.numel(), _BLOCK)](grad, x, out, x.numel(), HARDSWISH=hardswish,
                                                           ACC=acc_type(x), BLOCK=_BLOCK)
    return out


@launches_on_input_device
def _triton_gate_forward(x: Tensor, g: Tensor) -> Tensor:
    out = torch.empty_like(x)
    if x.numel():
        C, HW = x.shape[1], x.shape[2] * x.shape[3]
        if C * HW >= 2 ** 31:
            raise ValueError(f"the Triton gate kernel takes images of fewer than 2^31 values, got x of shape "
                             f"{tuple(x.shape)}; use impl='cuda' or 'torch'")
        blocks = triton.cdiv(C * HW, _BLOCK)
        _gate_forward_kernel[(blocks * x.shape[0],)](x, g, out, C, HW, blocks, CHANNELS_LAST=is_channels_last(x),
                                                     ACC=acc_type(x), BLOCK=_BLOCK)
    return out


@launches_on_input_device
def _triton_gate_backward(grad: Tensor, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    dx, dg = torch.empty_like(x), torch.zeros_like(g)
    N, C, H, W = x.shape
    if x.numel():
        channels_last = is_channels_last(x)
        # Tiles along the contiguous dimension: channels for channels_last, pixels for NCHW.
        block_c = min(64, triton.next_power_of_2(C)) if channels_last else min(8, triton.next_power_of_2(C))
        block_p = 16 if channels_last else min(256, triton.next_power_of_2(H * W))
        _gate_backward_kernel[(N, triton.cdiv(C, block_c))](grad, x, g, dx, dg, C, H * W,
                                                            CHANNELS_LAST=channels_last, ACC=acc_type(x),
                                                            BLOCK_P=block_p, BLOCK_C=block_c)
    return dx, dg


# ---------------------------------------------------------------------------------------------
# Registered ops: torch.ops.fastblocks.* with fake kernels and autograd. `impl` is a resolved
# backend name; the cpp and cuda backends are the same extension op, dispatched on device.
# ---------------------------------------------------------------------------------------------

def _act_forward(x: Tensor, impl: str, hardswish: bool) -> Tensor:
    x = dense(x)
    if impl == "torch":
        return F.hardswish(x) if hardswish else F.hardsigmoid(x)
    if impl == "triton":
        return _triton_act_forward(x, hardswish)
    return _ext.op("hardswish_forward" if hardswish else "hardsigmoid_forward")(x)


def _act_backward(grad: Tensor, x: Tensor, impl: str, hardswish: bool) -> Tensor:
    x = dense(x)
    grad = like(grad, x)
    if impl == "torch":
        aten = torch.ops.aten
        return (aten.hardswish_backward if hardswish else aten.hardsigmoid_backward)(grad, x)
    if impl == "triton":
        return _triton_act_backward(grad, x, hardswish)
    return _ext.op("hardswish_backward" if hardswish else "hardsigmoid_backward")(grad, x)


@custom_op("fastblocks::hardswish")
def _hardswish_op(x: Tensor, impl: str) -> Tensor:
    return _act_forward(x, impl, hardswish=True)


@custom_op("fastblocks::hardswish_backward")
def _hardswish_backward_op(grad: Tensor, x: Tensor, impl: str) -> Tensor:
    return _act_backward(grad, x, impl, hardswish=True)


@custom_op("fastblocks::hardsigmoid")
def _hardsigmoid_op(x: Tensor, impl: str) -> Tensor:
    return _act_forward(x, impl, hardswish=False)


@custom_op("fastblocks::hardsigmoid_backward")
def _hardsigmoid_backward_op(grad: Tensor, x: Tensor, impl: str) -> Tensor:
    return _act_backward(grad, x, impl, hardswish=False)


@_hardswish_op.register_fake
@_hardsigmoid_op.register_fake
def _(x, impl):
    return torch.empty_like(dense(x))


@_hardswish_backward_op.register_fake
@_hardsigmoid_backward_op.register_fake
def _(grad, x, impl):
    return torch.empty_like(dense(x))


def _save_x(ctx, inputs, output):
    x, ctx.impl = inputs
    ctx.save_for_backward(x)


def _hardswish_grad(ctx, grad):
    return _hardswish_backward_op(grad, ctx.saved_tensors[0], ctx.impl), None


def _hardsigmoid_grad(ctx, grad):
    return _hardsigmoid_backward_op(grad, ctx.saved_tensors[0], ctx.impl), None


_hardswish_op.register_autograd(_hardswish_grad, setup_context=_save_x)
_hardsigmoid_op.register_autograd(_hardsigmoid_grad, setup_context=_save_x)


def _gate_forward(x: Tensor, g: Tensor, impl: str) -> Tensor:
    x = nchw_or_nhwc(x)
    if impl == "torch":
        return hardsigmoid_gate_reference(x, g).contiguous(memory_format=_format(x))
    if impl == "triton":
        return _triton_gate_forward(x, g)
    return _ext.op("hardsigmoid_gate_forward")(x, g)


_gate_op = CustomOp("fastblocks::hardsigmoid_gate", _gate_forward)


@custom_op("fastblocks::hardsigmoid_gate_backward")
def _gate_backward_op(grad: Tensor, x: Tensor, g: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    x = nchw_or_nhwc(x)
    grad = like(grad, x)
    if impl == "torch":
        s = F.hardsigmoid(g)[:, :, None, None]
        dg = (grad * x).sum((2, 3)) * torch.where((g > -3) & (g < 3), 1.0 / 6.0, 0.0).to(g.dtype)
        return (grad * s).contiguous(memory_format=_format(x)), dg
    if impl == "triton":
        return _triton_gate_backward(grad, x, g)
    return _ext.op("hardsigmoid_gate_backward")(grad, x, g)


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


@_gate_op.register_fake
def _(x, g, impl):
    return torch.empty_like(nchw_or_nhwc(x))


@_gate_backward_op.register_fake
def _(grad, x, g, impl):
    return torch.empty_like(nchw_or_nhwc(x)), torch.empty_like(g)


def _gate_setup(ctx, inputs, output):
    x, g, ctx.impl = inputs
    ctx.save_for_backward(x, g)


def _gate_grad(ctx, grad):
    x, g = ctx.saved_tensors
    dx, dg = _gate_backward_op(grad, x, g, ctx.impl)
    return dx, dg, None


_gate_op.register_autograd(_gate_grad, setup_context=_gate_setup)


# ---------------------------------------------------------------------------------------------
# Public functional API.
# ---------------------------------------------------------------------------------------------

def hardswish(x: Tensor, impl: str | None = "auto") -> Tensor:
    """``x * clamp(x + 3, 0, 6) / 6``, equal to ``F.hardswish``; ``impl`` picks the backend."""
    check_tensor(x, "x")
    impl = resolve("hardswish", impl, x)
    return _hardswish_op(x, impl)


def hardsigmoid(x: Tensor, impl: str | None = "auto") -> Tensor:
    """``clamp(x / 6 + 1/2, 0, 1)``, equal to ``F.hardsigmoid``; ``impl`` picks the backend."""
    check_tensor(x, "x")
    impl = resolve("hardsigmoid", impl, x)
    return _hardsigmoid_op(x, impl)


def hardsigmoid_gate(x: Tensor, g: Tensor, impl: str | None = "auto") -> Tensor:
    """``x * hardsigmoid(g)`` with ``g`` of shape [N, C] or [N, C, 1, 1] broadcast over H, W."""
    check_tensor(x, "x", ndim=4)
    check_tensor(g, "g")
    check_same(g, "g", x, "x")
    N, C = x.shape[:2]
    if g.shape not in ((N, C), (N, C, 1, 1)):
        raise ValueError(f"g must have shape [N, C] = [{N}, {C}] or [N, C, 1, 1], got {tuple(g.shape)}")
    g = g.reshape(N, C).contiguous()
    return _gate_op(x, g, resolve("hardsigmoid_gate", impl, x))
