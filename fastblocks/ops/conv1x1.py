"""1x1 convolutions (the expand, project and squeeze convs of every block) as GEMMs on CPU.

A 1x1 convolution with stride 1, no padding and one group is a matrix product with the [O, C]
weight, and its backward two. Both CPU layouts are matrices already, so no copy is made:
- channels_last: the [N*H*W, C] pixel matrix, one GEMM (``F.linear`` on a view);
- NCHW (also a channel slice of a wider NCHW buffer, as DenseNet's concatenated input): N images,
  each a [C, H*W] matrix, one batched GEMM (``torch.bmm`` with the weight expanded over the batch;
  ``torch.matmul`` would fold the batch into one GEMM when gradients are recorded, copying x and
  the output, measured up to 1.8x slower forward+backward).
aten runs CPU 1x1 convs through its im2col path (``_slow_conv2d``) for channels_last, measured (2
cores, fp32, torch 2.14) 1.2-2.8x slower than the GEMM forward and 1.3-2.5x forward+backward on
MobileNetV2's pointwise convs at batch 4 @ 96, 0.8-1.4x (about even) at batch 8 @ 224; and through
oneDNN for NCHW, which reorders to its blocked layout and back: 1.2-2.4x slower than the batched GEMM
forward and 1.2-2.8x backward, from DenseNet's bottlenecks at batch 4 @ 64 to [64, 512, 14, 14].
So CPU fp32 / fp64 tensors in either layout take the GEMM; other dtypes, other strides and every
other device keep ``F.conv2d`` (cuDNN's 1x1 conv on CUDA is a GEMM already). Values equal the
convolution's up to summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastblocks.ops._common import images_contiguous, is_channels_last

_aten = torch.ops.aten


def gemm_layout(x: Tensor) -> str | None:
    """"pixels" (channels_last), "images" (each image a contiguous [C, H*W] matrix) or None (aten's conv)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if is_channels_last(x):
        return "pixels"
    return "images" if images_contiguous(x) else None


def _rows(t: Tensor) -> Tensor:
    """[N, C, H, W] as the [N*H*W, C] pixel matrix (a view for channels_last tensors)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    """[N*H*W, C] back to a channels_last [N, C, H, W] view with ``like``'s N, H, W."""
    N, _, H, W = like.shape
    return rows.view(N, H, W, rows.shape[1]).permute(0, 3, 1, 2)


def _images(t: Tensor) -> Tensor:
    """[N, C, H, W] as N [C, H*W] matrices (a view for per-image contiguous tensors)."""
    return t.flatten(2)


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight`` [O, C, 1, 1] (stride 1, no padding, one
    group); a GEMM for CPU input in either layout. Differentiable (autograd of the matrix products)."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f"conv1x1 needs x [N, C, H, W] and a weight [O, C, 1, 1] with the same C, got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    layout = gemm_layout(x)
    if layout == "pixels":
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    if layout == "images":
        y = torch.bmm(weight.flatten(1).expand(x.shape[0], -1, -1), _images(x))
        if bias is not None:
            y = y.add_(bias[:, None])  # the product's backward does not need y: safe in place
        return y.view(x.shape[0], weight.shape[0], *x.shape[2:])
    return F.conv2d(x, weight, bias)


def conv1x1_backward(grad: Tensor, x: Tensor, weight: Tensor,
                     output_mask: tuple[bool, bool] = (True, True)) -> tuple[Tensor | None, Tensor | None]:
    """(grad_x, grad_weight) of :func:`conv1x1` without bias, each None where ``output_mask`` says so."""
    layout = gemm_layout(x)
    if layout is None:
        dx, dw, _ = _aten.convolution_backward(grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                               [*output_mask, False])
        return dx, dw
    w = weight.flatten(1)
    if layout == "pixels":
        g = _rows(grad)
        dx = _from_rows(g @ w, x) if output_mask[0] else None
        dw = (g.t() @ _rows(x)).view_as(weight) if output_mask[1] else None
        return dx, dw
    g = _images(grad)
    dx = torch.bmm(w.t().expand(x.shape[0], -1, -1), g).view(x.shape) if output_mask[0] else None
    dw = torch.bmm(g, _images(x).transpose(1, 2)).sum(0).view_as(weight) if output_mask[1] else None
    return dx, dw


def is_plain_1x1(conv: nn.Module) -> bool:
    """True for an ``nn.Conv2d`` (not a subclass) that :func:`conv1x1` computes: 1x1, stride 1, no padding, one group."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and conv.padding_mode == "zeros")


def run_conv(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)``, with a plain 1x1 ``nn.Conv2d`` without hooks run as :func:`conv1x1`."""
    if is_plain_1x1(conv) and not (conv._forward_hooks or conv._forward_pre_hooks):
        return conv1x1(x, conv.weight, conv.bias)
    return conv(x)
