"""1x1 convolutions as GEMMs: values and gradients against aten's convolution, which path each input
takes, and the module helper's fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastblocks.ops.conv1x1 import conv1x1, conv1x1_backward, is_plain_1x1, run_conv

# name -> x [N, C, H, W]: channels_last (one GEMM), NCHW and a channel slice of a wider NCHW buffer
# (a batched GEMM), a channel slice of a channels_last buffer (aten's conv: not a matrix); N = 1, odd H, W.
INPUTS = {
    "channels_last": lambda dt: torch.randn(2, 12, 5, 7, dtype=dt).contiguous(memory_format=torch.channels_last),
    "contiguous": lambda dt: torch.randn(2, 12, 5, 7, dtype=dt),
    "nchw_slice": lambda dt: torch.randn(3, 20, 5, 1, dtype=dt)[:, 4:16],
    "channels_last_slice": lambda dt: torch.randn(1, 20, 3, 9, dtype=dt).contiguous(
        memory_format=torch.channels_last)[:, :12],
}
GEMM = {"channels_last", "contiguous", "nchw_slice"}


def _conv_nodes(y: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``y``."""
    names, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", list(INPUTS))
def test_matches_conv2d(layout, bias, dtype):
    x = INPUTS[layout](dtype).requires_grad_()
    w = torch.randn(5, 12, 1, 1, dtype=dtype, requires_grad=True)
    b = torch.randn(5, dtype=dtype, requires_grad=True) if bias else None
    y = conv1x1(x, w, b)
    y_ref = F.conv2d(x, w, b)
    assert y.shape == y_ref.shape and y.stride() == y_ref.stride()
    assert ("ConvolutionBackward0" in _conv_nodes(y)) != (layout in GEMM)  # the documented path
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), dy)
    grads_ref = torch.autograd.grad(y_ref, [x, w] + ([b] if bias else []), dy)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("layout", list(INPUTS))
def test_backward_matches_aten(layout, mask):
    x = INPUTS[layout](torch.float64)
    w = torch.randn(5, 12, 1, 1, dtype=torch.float64)
    grad = torch.randn(x.shape[0], 5, *x.shape[2:], dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    dx, dw = conv1x1_backward(grad, x, w, mask)
    dx_ref, dw_ref, _ = torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
                                                            1, [True, True, False])
    for got, ref, wanted in ((dx, dx_ref, mask[0]), (dw, dw_ref, mask[1])):
        if wanted:
            torch.testing.assert_close(got, ref)
        else:
            assert got is None


@pytest.mark.parametrize("layout", sorted(GEMM))
def test_gradcheck_gemm_paths(layout):
    x = INPUTS[layout](torch.float64).detach().requires_grad_()  # detach keeps the strides
    w = torch.randn(3, 12, 1, 1, dtype=torch.float64, requires_grad=True)
    assert "ConvolutionBackward0" not in _conv_nodes(conv1x1(x, w))
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv1x1, (x, w, b))


def test_run_conv():
    x = INPUTS["channels_last"](torch.float32)
    plain = nn.Conv2d(12, 4, 1)
    assert is_plain_1x1(plain)
    torch.testing.assert_close(run_conv(plain, x), plain(x))
    assert "ConvolutionBackward0" not in _conv_nodes(run_conv(plain, x))
    # not a plain 1x1 conv: the module itself runs
    for conv in (nn.Conv2d(12, 4, 1, stride=2), nn.Conv2d(12, 4, 3, padding=1), nn.Conv2d(12, 4, 1, groups=2),
                 nn.Conv2d(12, 4, 1, padding=1, padding_mode="reflect")):
        assert not is_plain_1x1(conv)
        torch.testing.assert_close(run_conv(conv, x), conv(x))
    # hooks are honoured
    calls = []
    plain.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    run_conv(plain, x)
    assert calls == [(2, 4, 5, 7)]


def test_bad_inputs():
    x = INPUTS["channels_last"](torch.float32)
    with pytest.raises(ValueError, match=r"weight \[O, C, 1, 1\] with the same C"):
        conv1x1(x, torch.randn(4, 12, 3, 3))
    with pytest.raises(ValueError, match="got x"):
        conv1x1(x, torch.randn(4, 11, 1, 1))
    with pytest.raises(ValueError, match=r"x \[N, C, H, W\]"):
        conv1x1(x[0], torch.randn(4, 12, 1, 1))
