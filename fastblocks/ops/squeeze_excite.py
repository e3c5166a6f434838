"""Fused squeeze-and-excitation (torchvision's ``SqueezeExcitation``, timm's ``SqueezeExcite``).

    pooled = mean_hw(x)                                   [N, C]
    h = pooled @ w1.T + b1,  z = act(h) @ w2.T + b2       [N, S], [N, C]
    y = x * scale_act(z)                                  [N, C, H, W]

Two kinds of pass touch the [N, C, H, W] tensors: ``pool`` (one read: the per-plane mean, accumulated
in fp32 / fp64) and ``gate`` (one read, one write: ``out = in * scale[n, c] + shift[n, c]``). The
excitation in between works on [N, C] and [N, S] tensors (about N * C * S flops).

    forward:   pool(x) -> excitation -> gate(x, s)                       reads x twice, writes y once
    backward:  pool_backward(dy, x) -> sum_hw(dy * x) and mean_hw(x)     reads dy and x
               excitation backward ([N, *]) -> weight grads, d(pooled)
               gate(dy, s, d(pooled) / HW) -> dx                         reads dy, writes dx

Backward recomputes ``mean_hw(x)`` in the pass that reads x anyway, so autograd saves only x and the
weights. (One backward pass is impossible without a grid-wide barrier: every dx[n, c] depends on
d(pooled)[n, c], which depends on the reduction over all pixels and, through fc2/fc1, all channels.)

Backends: ``torch`` and ``triton`` run the passes here (aten / Triton kernels) with the excitation as
aten matmuls in the accumulation dtype. ``cpp`` / ``cuda`` are one extension call each way
(csrc/squeeze_excite): the CUDA kernels use cuBLAS for the excitation; the CPU kernels run the
excitation per image, between the passes, so that the second pass re-reads the image from L2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastblocks import _ext
from fastblocks._backend import register_op, resolve
from fastblocks.ops._common import CustomOp, check_tensor, custom_op, is_channels_last, like, nchw_or_nhwc
from fastblocks.ops._triton import acc_type, launches_on_input_device, split_work, tile_offsets, tl, triton
from fastblocks.ops.conv1x1 import conv1x1, conv1x1_backward

register_op("squeeze_excite", "squeeze_excite_forward")

_aten = torch.ops.aten

# name -> (forward, backward(grad, input)); the backward formulas are aten's own.
ACTIVATIONS = {
    "relu": (torch.relu, lambda grad, h: _aten.threshold_backward(grad, h, 0)),
    "relu6": (F.relu6, lambda grad, h: _aten.hardtanh_backward(grad, h, 0.0, 6.0)),
    "silu": (F.silu, _aten.silu_backward),
    "hardswish": (F.hardswish, _aten.hardswish_backward),
}
_ACT_CODES = {"relu": 1, "relu6": 2, "silu": 3, "hardswish": 4}  # enum Activation in csrc/activations.h
# name -> (forward, backward(grad, input, output)).
SCALE_ACTIVATIONS = {
    "sigmoid": (torch.sigmoid, lambda grad, z, s: _aten.sigmoid_backward(grad, s)),
    "hardsigmoid": (F.hardsigmoid, lambda grad, z, s: _aten.hardsigmoid_backward(grad, z)),
}


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch, torchvision's formulation): the test oracle.
# ---------------------------------------------------------------------------------------------

def squeeze_excite_reference(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                             activation: str = "relu", scale_activation: str = "sigmoid") -> Tensor:
    S, C = w1.shape[0], x.shape[1]
    z = F.conv2d(ACTIVATIONS[activation][0](F.conv2d(F.adaptive_avg_pool2d(x, 1), w1.reshape(S, C, 1, 1), b1)),
                 w2.reshape(C, S, 1, 1), b2)
    return x * SCALE_ACTIVATIONS[scale_activation][0](z)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Triton kernels.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _pool_kernel(X, DY, MEAN, DYX, C, HW, chunk, HAS_DY: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (image, channel tile, pixel chunk): the chunk's share of mean_hw(x) and sum_hw(dy * x)."""
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    p_start = tl.program_id(2) * chunk
    p_end = tl.minimum(p_start + chunk, HW)
    sum_x = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    sum_dyx = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(p_start, p_end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        offs = tile_offsets(n, ps, cs, C, HW, CHANNELS_LAST)
        mask = (ps[:, None] < p_end) & cmask[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        sum_x += x
        if HAS_DY:
            sum_dyx += tl.load(DY + offs, mask=mask, other=0.0).to(ACC) * x
    out = (n * tl.num_programs(2) + tl.program_id(2)) * C + cs
    tl.store(MEAN + out, tl.sum(sum_x, axis=0) / HW, mask=cmask)
    if HAS_DY:
        tl.store(DYX + out, tl.sum(sum_dyx, axis=0), mask=cmask)


@triton.jit
def _gate_kernel(X, SCALE, SHIFT, Y, C, HW, blocks_per_image, HAS_SHIFT: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """y = x * scale[n, c] (+ shift[n, c]); scale and shift are in the accumulation dtype."""
    pid = tl.program_id(0)
    n = (pid // blocks_per_image).to(tl.int64)
    offs = (pid % blocks_per_image) * BLOCK + tl.arange(0, BLOCK)  # within the image: int32 suffices
    mask = offs < C * HW
    if CHANNELS_LAST:
        c = offs % C
    else:
        c = offs // HW
    base = n * C * HW
    x = tl.load(X + base + offs, mask=mask, other=0.0)
    scale = tl.load(SCALE + n * C + c, mask=mask, other=0.0)
    y = x.to(scale.dtype) * scale
    if HAS_SHIFT:
        y += tl.load(SHIFT + n * C + c, mask=mask, other=0.0)
    tl.store(Y + base + offs, y.to(x.dtype), mask=mask)


@launches_on_input_device
def _triton_pool(x: Tensor, grad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    N, C, H, W = x.shape
    HW = H * W
    channels_last = is_channels_last(x)
    # Tiles run along the contiguous dimension: channels for channels_last, pixels for NCHW.
    block_c = min(64 if channels_last else 8, triton.next_power_of_2(C))
    block_p = 16 if channels_last else min(256, triton.next_power_of_2(HW))
    c_tiles = triton.cdiv(C, block_c)
    # Split the pixels over several programs when images x channel tiles cannot fill the GPU.
    split, chunk = split_work(HW, block_p, N * c_tiles, x.device)
    mean = x.new_empty((N, split, C), dtype=_acc_dtype(x))
    dyx = torch.empty_like(mean) if grad is not None else None
    if x.numel():
        _pool_kernel[(N, c_tiles, split)](x, grad if grad is not None else x, mean, dyx if dyx is not None else mean,
                                          C, HW, chunk, HAS_DY=grad is not None, CHANNELS_LAST=channels_last,
                                          ACC=acc_type(x), BLOCK_P=block_p, BLOCK_C=block_c)
    return mean.sum(1), (dyx.sum(1) if dyx is not None else None)


_BLOCK = 1024


@launches_on_input_device
def _triton_gate(x: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    out = torch.empty_like(x)
    N, C, H, W = x.shape
    if x.numel():
        blocks = triton.cdiv(C * H * W, _BLOCK)
        _gate_kernel[(N * blocks,)](x, scale, shift if shift is not None else scale, out, C, H * W, blocks,
                                    HAS_SHIFT=shift is not None, CHANNELS_LAST=is_channels_last(x), BLOCK=_BLOCK)
    return out


# ---------------------------------------------------------------------------------------------
# The two big passes of the torch and triton backends. x (and grad) are NCHW-contiguous or channels_last.
# ---------------------------------------------------------------------------------------------

def _pool(x: Tensor, impl: str) -> Tensor:
    """mean_hw(x) as [N, C] in the accumulation dtype."""
    if impl == "torch":
        return x.mean((2, 3), dtype=_acc_dtype(x))
    return _triton_pool(x)[0]


def _pool_backward(grad: Tensor, x: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    """(sum_hw(grad * x), mean_hw(x)) as [N, C] in the accumulation dtype (Triton: one read of each)."""
    if impl == "torch":
        acc = _acc_dtype(x)
        return (grad * x).sum((2, 3), dtype=acc), x.mean((2, 3), dtype=acc)
    mean, dyx = _triton_pool(x, grad)
    return dyx, mean


def _gate(x: Tensor, scale: Tensor, shift: Tensor | None, impl: str) -> Tensor:
    """x * scale[n, c] (+ shift[n, c]) in the accumulation dtype, with x's dtype and strides."""
    if impl == "torch":
        out = torch.empty_like(x)
        scale = scale[:, :, None, None]
        if shift is None:
            return torch.mul(x, scale, out=out)
        return torch.addcmul(shift[:, :, None, None], x, scale, out=out)
    return _triton_gate(x, scale, shift)


# ---------------------------------------------------------------------------------------------
# Registered ops. Weights arrive as [S, C], [S], [C, S], [C]; the excitation runs in the
# accumulation dtype of x whatever the weights' dtype (e.g. fp32 weights under autocast).
# ---------------------------------------------------------------------------------------------

def _excite(pooled: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str):
    acc = pooled.dtype
    h = torch.addmm(b1.to(acc), pooled, w1.to(acc).t())
    a = ACTIVATIONS[activation][0](h)
    return h, a, torch.addmm(b2.to(acc), a, w2.to(acc).t())


def _se_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str, scale_activation: str,
                impl: str) -> Tensor:
    x = nchw_or_nhwc(x)
    if impl in ("cpp", "cuda"):
        return _ext.op("squeeze_excite_forward")(x, w1, b1, w2, b2, _ACT_CODES[activation],
                                                 scale_activation == "hardsigmoid")
    z = _excite(_pool(x, impl), w1, b1, w2, b2, activation)[2]
    return _gate(x, SCALE_ACTIVATIONS[scale_activation][0](z), None, impl)


_se_op = CustomOp("fastblocks::squeeze_excite", _se_forward)


@custom_op("fastblocks::squeeze_excite_backward")
def _se_backward_op(grad: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str,
                    scale_activation: str, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x = nchw_or_nhwc(x)
    grad = like(grad, x)
    if impl in ("cpp", "cuda"):
        return _ext.op("squeeze_excite_backward")(grad, x, w1, b1, w2, b2, _ACT_CODES[activation],
                                                  scale_activation == "hardsigmoid")
    sum_dyx, pooled = _pool_backward(grad, x, impl)
    h, a, z = _excite(pooled, w1, b1, w2, b2, activation)
    scale_fwd, scale_bwd = SCALE_ACTIVATIONS[scale_activation]
    s = scale_fwd(z)
    dz = scale_bwd(sum_dyx, z, s)  # d loss / d z = sum_hw(dy * x) * scale_act'(z)
    dh = ACTIVATIONS[activation][1](dz @ w2.to(dz.dtype), h)
    d_pooled = dh @ w1.to(dh.dtype)
    dx = _gate(grad, s, d_pooled.div_(x.shape[2] * x.shape[3]), impl)
    return (dx, (dh.t() @ pooled).to(w1.dtype), dh.sum(0).to(b1.dtype), (dz.t() @ a).to(w2.dtype),
            dz.sum(0).to(b2.dtype))


@_se_op.register_fake
def _(x, w1, b1, w2, b2, activation, scale_activation, impl):
    return torch.empty_like(nchw_or_nhwc(x))


@_se_backward_op.register_fake
def _(grad, x, w1, b1, w2, b2, activation, scale_activation, impl):
    return (torch.empty_like(nchw_or_nhwc(x)), w1.new_empty(w1.shape), b1.new_empty(b1.shape),
            w2.new_empty(w2.shape), b2.new_empty(b2.shape))


def _se_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, ctx.activation, ctx.scale_activation, ctx.impl = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)


def _se_grad(ctx, grad):
    grads = _se_backward_op(grad, *ctx.saved_tensors, ctx.activation, ctx.scale_activation, ctx.impl)
    return *grads, None, None, None


_se_op.register_autograd(_se_grad, setup_context=_se_setup)


# ---------------------------------------------------------------------------------------------
# Public functional API.
# ---------------------------------------------------------------------------------------------

def _check_param(t, name: str, x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t`` as a contiguous tensor of ``shape``; conv weights [out, in, 1, 1] are accepted."""
    check_tensor(t, name)
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if len(shape) == 2 and t.dim() == 4 and t.shape[2:] == (1, 1):
        t = t.flatten(1)
    if tuple(t.shape) != shape:
        expected = f"[{', '.join(map(str, shape))}]" + (" (or [out, in, 1, 1])" if len(shape) == 2 else "")
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    return t.contiguous()


def _checked(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str,
             scale_activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The weights as [S, C], [S], [C, S], [C] after checking every argument."""
    check_tensor(x, "x", ndim=4)
    N, C, H, W = x.shape
    if H * W == 0:
        raise ValueError(f"x must have at least one pixel to average, got shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if scale_activation not in SCALE_ACTIVATIONS:
        raise ValueError(f"scale_activation must be one of {tuple(SCALE_ACTIVATIONS)}, got {scale_activation!r}")
    check_tensor(w1, "w1")
    S = w1.shape[0] if w1.dim() else -1
    return (_check_param(w1, "w1", x, (S, C)), _check_param(b1, "b1", x, (S,)), _check_param(w2, "w2", x, (C, S)),
            _check_param(b2, "b2", x, (C,)))


def squeeze_excite(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str = "relu",
                   scale_activation: str = "sigmoid", impl: str | None = "auto") -> Tensor:
    """``x * scale_activation(fc2(activation(fc1(mean_hw(x)))))`` as one fused op.

    ``w1`` is fc1's weight [S, C] (or the 1x1 conv weight [S, C, 1, 1]), ``b1`` [S]; ``w2`` [C, S]
    (or [C, S, 1, 1]), ``b2`` [C]. ``activation`` is one of "relu", "relu6", "silu", "hardswish";
    ``scale_activation`` "sigmoid" or "hardsigmoid". Equal to torchvision's ``SqueezeExcitation``.
    """
    w1, b1, w2, b2 = _checked(x, w1, b1, w2, b2, activation, scale_activation)
    return _se_op(x, w1, b1, w2, b2, activation, scale_activation, resolve("squeeze_excite", impl, x))


class _SqueezeExciteConv1x1(torch.autograd.Function):
    """conv1x1(squeeze_excite(x)) saving x (which the SE backward needs anyway), not the SE output."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, weight, activation, scale_activation, impl):
        out = conv1x1(_se_op(x, w1, b1, w2, b2, activation, scale_activation, impl), weight)
        ctx.save_for_backward(x, w1, b1, w2, b2, weight)
        ctx.se_args = activation, scale_activation, impl
        ctx.conv_dtype = out.dtype  # the conv ran in this dtype (autocast may have cast its inputs)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, b2, weight = ctx.saved_tensors
        se = _se_op(x, w1, b1, w2, b2, *ctx.se_args)  # recomputed: one more read of x, one write
        dtype = ctx.conv_dtype
        need_dx = any(ctx.needs_input_grad[:5])
        d_se, d_weight = conv1x1_backward(grad.to(dtype), se.to(dtype), weight.to(dtype),
                                          (need_dx, ctx.needs_input_grad[5]))
        grads = (None,) * 5
        if need_dx:
            grads = _se_backward_op(d_se.to(x.dtype), x, w1, b1, w2, b2, *ctx.se_args)
        d_weight = d_weight.to(weight.dtype) if d_weight is not None else None
        return *grads, d_weight, None, None, None


def squeeze_excite_conv1x1(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, weight: Tensor,
                           activation: str = "relu", scale_activation: str = "sigmoid",
                           impl: str | None = "auto") -> Tensor:
    """``conv2d(squeeze_excite(x, ...), weight)`` for a bias-free 1x1 ``weight`` [O, C, 1, 1]: the
    squeeze-excite and the projection that follows it in MBConv and MobileNetV3 blocks.

    Same values as the two calls. Backward recomputes the squeeze-excite output (one more read of x)
    instead of keeping it for the convolution's weight gradient: x is kept for the squeeze-excite
    backward anyway, so the block saves one expanded-width activation less.
    """
    w1, b1, w2, b2 = _checked(x, w1, b1, w2, b2, activation, scale_activation)
    check_tensor(weight, "weight")
    if weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f"weight must be a 1x1 conv weight [O, {x.shape[1]}, 1, 1], got {tuple(weight.shape)}")
    impl = resolve("squeeze_excite", impl, x)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2, weight))):
        return conv1x1(_se_op(x, w1, b1, w2, b2, activation, scale_activation, impl), weight)  # nothing to save
    return _SqueezeExciteConv1x1.apply(x, w1, b1, w2, b2, weight, activation, scale_activation, impl)
