"""BatchNorm bookkeeping shared by every fused module that holds an ``nn.BatchNorm2d``.

The fused kernels compute the batch statistics; these helpers apply them to the module exactly as
``nn.BatchNorm2d`` does, so a fused module can keep a real BatchNorm2d (same state_dict keys).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastblocks._backend import resolve
from fastblocks.ops._common import as_param
from fastblocks.ops.bn_act import bn_act
from fastblocks.ops.dwconv_bn_act import _torch_act_


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """True when ``bn`` normalises with the statistics of the current batch (as F.batch_norm decides)."""
    return bn.training or not bn.track_running_stats


def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """Fold one batch's per-channel ``mean`` and biased ``var`` over ``count`` values into ``bn``.

    Same arithmetic as ``nn.BatchNorm2d``: running_var gets the unbiased variance, and
    ``momentum=None`` means a cumulative average over ``num_batches_tracked``. ``mean`` and ``var``
    are statistics from the kernels, which carry no autograd history, so no ``no_grad()`` is needed.
    """
    if not (bn.training and bn.track_running_stats):
        return
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative moving average; stays a tensor so torch.compile keeps one graph
        factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
    else:
        factor = bn.momentum
    bn.running_mean.lerp_(as_param(mean, bn.running_mean.dtype), factor)
    bn.running_var.lerp_(as_param(var * (count / max(count - 1, 1)), bn.running_var.dtype), factor)


def batch_norm_act(bn: nn.BatchNorm2d, x: Tensor, activation: str, impl: str | None) -> Tensor:
    """``act(bn(x))`` as one fused :func:`fastblocks.ops.bn_act`, with ``bn``'s statistics and
    running-statistics updates exactly as ``nn.BatchNorm2d``. ``activation``: a name of bn_act's ACTIVATIONS.

    The ``torch`` backend is eager's ``bn(x)`` and then the activation (what ``impl="auto"`` stands for
    when it prefers ``torch``); bn_act's own ``torch`` backend is a pure-PyTorch statement of the fused
    math, several passes over x, kept as the kernels' test oracle.
    """
    if resolve("bn_act", impl, x) == "torch":
        return _torch_act_(nn.BatchNorm2d.forward(bn, x), activation)
    batch = uses_batch_stats(bn)
    y, mean, var = bn_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, batch, bn.eps, activation, impl)
    if batch:
        update_running_stats(bn, mean, var, x.numel() // max(x.shape[1], 1))
    return y


def check_batch_size(bn: nn.BatchNorm2d, count: int, size) -> None:
    """nn.BatchNorm2d's error for a training batch with one value per channel."""
    if bn.training and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(size)}")


def eval_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with bn(y) == y * scale + shift in eval mode, for folding into a kernel."""
    invstd = torch.rsqrt(bn.running_var + bn.eps)
    scale = invstd if bn.weight is None else bn.weight * invstd
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
