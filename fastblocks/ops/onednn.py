"""CPU inference: convolution + eval-mode BatchNorm + activation as one oneDNN convolution.

In eval mode BatchNorm is a per-channel affine map, so it folds into the convolution's weight and
bias (``w' = w * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``), and oneDNN
applies the activation to each output tile while it is still in cache (a post-op). The output is
written once, instead of once by the convolution and read and written again by BN and by the
activation (our fused ``bn_act`` made that one extra pass; this removes it). aten exposes the fused
call as ``torch.ops.mkldnn._convolution_pointwise``, the op inductor's CPU backend emits for the
same pattern; it is private, so its absence or a changed behaviour (checked once on a tiny example; other
builds, ``torch.backends.mkldnn`` disabled) just means the caller's unfused path runs.

The op has no autograd and is opaque to tracing, so it is used only in plain eager calls that
record no gradient (``torch.no_grad()`` / ``inference_mode``, or nothing requires grad), on CPU
float32 tensors. Measured (2 cores, fp32, channels_last, batch 8 @ 224, inference vs torchvision
eager in one process, unfused -> fused): MobileNetV2 1.30x -> 1.65x, MobileNetV3-Large 1.05x ->
1.38x, EfficientNet-B0 1.21x -> 1.31x, SqueezeNet 1.1 0.94x -> 1.01x.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from fastblocks.ops._common import plain_eager
from fastblocks.ops.conv1x1 import gemm_layout, is_plain_1x1

# fastblocks activation name -> (oneDNN post-op, its scalars)
_POST_OPS = {None: ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]),
             "silu": ("swish", []), "hardswish": ("hardswish", [])}


@functools.lru_cache(maxsize=None)
def _checked_op():
    """The aten op, if it exists and gives relu(conv) of a 1x1 example: a private op may change."""
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if op is None:
        return None
    try:
        y = op(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([-3.0]), [0, 0], [1, 1], [1, 1],
               1, "relu", [], "")
    except (RuntimeError, TypeError):
        return None
    return op if y.shape == (1, 1, 1, 1) and y.item() == 0.0 else None


def _onednn_op():
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    return _checked_op()


def can_fuse(x: Tensor, conv: nn.Module, norm: nn.Module | None = None, activation: str | None = None) -> bool:
    """True when ``activation(norm(conv(x)))`` can run as one oneDNN convolution here and that is the
    faster route: CPU float32, a plain zero-padded ``nn.Conv2d``, an eval-mode ``nn.BatchNorm2d`` with
    running statistics (or no norm), an activation oneDNN fuses, no gradient recorded, plain eager
    mode; and not a plain 1x1 conv on NCHW input, which is faster as :func:`fastblocks.ops.conv1x1`'s
    batched GEMM followed by the unfused norm and activation (oneDNN reorders NCHW to its blocked
    layout and back; inference at bs 8 @ 224, NCHW, 2 threads: MobileNetV2 103 -> 88 ms, MobileNetV3-
    Large 68 -> 59, EfficientNet-B0 142 -> 137, SqueezeNet 1.1 93 -> 87)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or activation not in _POST_OPS
            or type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
            or conv._forward_hooks or conv._forward_pre_hooks):
        return False
    if is_plain_1x1(conv) and gemm_layout(x) == "images":
        return False
    tensors = [x, conv.weight, conv.bias]
    if norm is not None:
        if (type(norm) is not nn.BatchNorm2d or norm.training or norm.running_mean is None
                or norm._forward_hooks or norm._forward_pre_hooks):
            return False
        tensors += [norm.weight, norm.bias, norm.running_mean, norm.running_var]
    tensors = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return plain_eager(tensors) and _onednn_op() is not None


def conv_norm_act(x: Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d | None = None,
                  activation: str | None = None) -> Tensor:
    """``activation(norm(conv(x)))`` as one oneDNN call, for inputs :func:`can_fuse` accepts. The
    output has x's memory format."""
    weight, bias = conv.weight, conv.bias
    if norm is not None:
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale if bias is None else (bias - norm.running_mean) * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        weight, bias = weight * scale.view(-1, 1, 1, 1), shift
    post_op, scalars = _POST_OPS[activation]
    return _onednn_op()(x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, post_op,
                        scalars, "")
