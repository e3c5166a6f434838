"""Fused BatchNorm + activation (fastblocks.ops.bn_act) against F.batch_norm + the activation, for every
backend and activation, on dense tensors and on channel slices of NCHW and channels_last buffers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastblocks
from fastblocks import ops
from fastblocks.ops.bn_act import ACTIVATIONS, batch_stats, bn_act_backward
from tests.conftest import require_backend

LAYOUTS = ["contiguous", "channels_last", "slice", "slice_channels_last", "strided"]
ACTIVATION_FNS = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}


def _input(shape, layout, dtype=torch.float32, device="cpu", extra=5):
    """x of `shape` in `layout`; the slices are x = buf[:, :C] of a buffer with `extra` more channels."""
    N, C, H, W = shape
    buf = torch.randn(N, C + extra, H, W, dtype=torch.float64, device=device).mul_(2).add_(0.5).to(dtype)
    if layout in ("channels_last", "slice_channels_last"):
        buf = buf.contiguous(memory_format=torch.channels_last)
    if layout.startswith("slice"):
        return buf[:, :C]
    if layout == "strided":  # neither layout: every other column
        return buf[:, :C].contiguous()[..., ::2]
    return buf[:, :C].contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)


def _reference(x, w, b, rm=None, rv=None, training=True, eps=1e-5, activation="relu"):
    return ACTIVATION_FNS[activation](F.batch_norm(x, rm, rv, w, b, training, 0.1, eps))


def test_every_activation_is_tested():
    assert set(ACTIVATION_FNS) == set(ACTIVATIONS)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape, activation", [((2, 3, 5, 7), "relu"), ((1, 20, 3, 3), "silu"),
                                               ((3, 67, 4, 2), "hardswish"), ((2, 9, 3, 5), "relu6"),
                                               ((2, 4, 3, 3), "none"), ((2, 70, 2, 3), "silu")])
def test_matches_batch_norm_act(backend, device, layout, training, shape, activation):
    require_backend("bn_act", backend, device)
    C = shape[1]
    x = _input(shape, layout, device=device).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    y, mean, var = ops.bn_act(x, w, b, rm, rv, training, 1e-5, activation, impl=backend)
    yr = _reference(xr, w, b, rm.clone(), rv.clone(), training, activation=activation)
    torch.testing.assert_close(y, yr)
    if layout.endswith("channels_last") and min(shape[1], shape[2] * shape[3]) > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    if training:
        torch.testing.assert_close(mean, xr.detach().mean((0, 2, 3)))
        torch.testing.assert_close(var, xr.detach().var((0, 2, 3), unbiased=False))
    dy = torch.randn_like(yr)
    grads = torch.autograd.grad(y, [x, w, b], dy)
    grads_ref = torch.autograd.grad(yr, [xr, w, b], dy)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-4)


def test_slice_is_read_in_place_not_copied(backend):
    """The view of the block buffer is what backward saves: no copy of the slice."""
    require_backend("bn_act", backend)
    for layout in ("slice", "slice_channels_last"):
        x = _input((2, 6, 3, 4), layout).requires_grad_()
        w, b = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ops.bn_act(x, w, b, activation="silu", impl=backend)
        ptrs = {t.untyped_storage().data_ptr() for t in saved if t.dim() == 4}
        assert ptrs == {x.untyped_storage().data_ptr()}


def test_variance_without_cancellation(backend):
    """A large mean and a tiny spread: a one-pass sum of squares in float32 would lose the variance."""
    require_backend("bn_act", backend)
    x = (1000 + 1e-2 * torch.randn(4, 3, 8, 8, dtype=torch.float64)).float()
    mean, var = batch_stats(x, backend)
    exact = x.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), exact, rtol=1e-3, atol=0)


def _away_from_kinks(u: torch.Tensor, activation: str) -> bool:
    """No pre-activation value within 1e-3 of a kink, where finite differences are meaningless."""
    kinks = {"relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0)}.get(activation, ())
    return all(((u - k).abs() > 1e-3).all() for k in kinks)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "slice_channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(backend, device, layout, training, activation):
    require_backend("bn_act", backend, device, torch.float64)
    x = _input((2, 3, 2, 3), layout, torch.float64, device).requires_grad_()
    w = torch.tensor([1.5, -2.0, 3.0], dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    rm = torch.randn(3, dtype=torch.float64, device=device)
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    u = F.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), training, 0.1, 1e-5)
    assert _away_from_kinks(u, activation)
    assert torch.autograd.gradcheck(
        lambda t, w, b: ops.bn_act(t, w, b, rm, rv, training, activation=activation, impl=backend)[0], (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout, activation", [("contiguous", "relu"), ("slice_channels_last", "silu"),
                                                ("channels_last", "hardswish")])
def test_low_precision_error_within_twice_eager(backend, device, dtype, layout, activation):
    require_backend("bn_act", backend, device, dtype)
    x = _input((4, 24, 9, 9), layout, dtype, device)
    w = torch.rand(24, device=device) + 0.5
    b = torch.randn(24, device=device)
    exact = _reference(x.double(), w.double(), b.double(), activation=activation)
    err_fb = (ops.bn_act(x, w, b, activation=activation, impl=backend)[0].double() - exact).abs().max()
    err_eager = (_reference(x, w.to(dtype), b.to(dtype), activation=activation).double() - exact).abs().max()
    assert err_fb <= 2 * err_eager + 1e-6


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training, activation", [(True, "relu"), (False, "silu"), (True, "hardswish")])
def test_backward_adds_into_grad_x(backend, device, layout, training, activation):
    """DenseNet's accumulation: with grad_x, dx is added into it and nothing else in its buffer changes.
    grad_x laid out like x (a slice of a buffer shaped like x's) is the fused path; a dense grad_x with
    other strides (x a slice or channels_last) takes the separate add."""
    require_backend("bn_act", backend, device)
    x = _input((3, 6, 3, 5), layout, device=device)
    shape = x.shape  # 3 columns for "strided"
    mean, var = batch_stats(x, "torch")
    invstd = torch.rsqrt(var + 1e-5)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    grad = torch.randn(shape, device=device)
    dx, dw, db = bn_act_backward(grad, x, mean, invstd, w, b, training, activation, backend)
    def like_x(buf):  # x's view of a buffer shaped like x's own buffer, or a buffer shaped like x
        return buf.as_strided(x.shape, x.stride(), x.storage_offset()) if buf.shape != shape else buf

    base = x if x._base is None else x._base
    for buf in (torch.randn_like(base), torch.randn(shape, device=device)):
        expected = buf.clone()
        like_x(expected).add_(dx)
        out, dw2, db2 = bn_act_backward(grad, x, mean, invstd, w, b, training, activation, backend, grad_x=like_x(buf))
        assert out.data_ptr() == like_x(buf).data_ptr()
        torch.testing.assert_close((dw2, db2), (dw, db))
        torch.testing.assert_close(buf, expected)


def test_affine_false_and_no_running_stats(backend):
    require_backend("bn_act", backend)
    x = _input((2, 5, 3, 3), "slice")
    y, _, _ = ops.bn_act(x, None, None, activation="silu", impl=backend)
    torch.testing.assert_close(y, _reference(x, None, None, activation="silu"))


def test_opcheck(backend):
    require_backend("bn_act", backend)
    for layout, act in zip(("contiguous", "slice", "slice_channels_last"), ("silu", "relu", "hardswish")):
        x = _input((2, 6, 3, 5), layout).requires_grad_()
        mean, var = torch.ops.fastblocks.bn_act_stats(x.detach(), backend)
        torch.library.opcheck(torch.ops.fastblocks.bn_act_stats.default, (x.detach(), backend))
        invstd = torch.rsqrt(var + 1e-5)
        w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
        torch.library.opcheck(torch.ops.fastblocks.bn_act.default, (x, mean, invstd, w, b, True, act, backend))
        y = torch.ops.fastblocks.bn_act(x, mean, invstd, w, b, True, act, backend)
        torch.library.opcheck(torch.ops.fastblocks.bn_act_backward.default,
                              (torch.randn_like(y), x.detach(), mean, invstd, w.detach(), b.detach(), False, act,
                               backend))


@pytest.mark.parametrize("compile_backend", ["torch", "cpp"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_compile_fullgraph(compile_backend, activation):
    require_backend("bn_act", compile_backend)
    torch._dynamo.reset()
    w, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)

    def f(buf):
        return ops.bn_act(buf[:, :5], w, b, activation=activation, impl=compile_backend)[0].sum()

    buf = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(buf)
    torch.testing.assert_close(out, f(buf))
    out.backward()
    expected = torch.autograd.grad(f(buf), buf)[0]
    torch.testing.assert_close(buf.grad, expected)


@pytest.mark.parametrize("layout", ["contiguous", "slice_channels_last"])
def test_triton_reductions_split_over_pixels_as_on_a_gpu(monkeypatch, layout):
    """With an H100's 132 SMs the Triton reductions cut the pixels into parts (one partial row each);
    the interpreter counts one SM, so this pretends to have 132."""
    require_backend("bn_act", "triton")
    from fastblocks.ops import _triton

    monkeypatch.setattr(_triton, "num_sms", lambda device: 132)
    assert _triton.split_work(2 * 40 * 33, 32, 1, torch.device("cpu"))[0] > 1
    x = _input((2, 5, 40, 33), layout, torch.float64).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    w, b = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    y, mean, var = ops.bn_act(x, w, b, activation="silu", impl="triton")
    yr = F.silu(F.batch_norm(xr, None, None, w, b, training=True))
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(var, xr.detach().var((0, 2, 3), unbiased=False))
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_like_pytorch(backend, activation):
    require_backend("bn_act", backend)
    x = torch.tensor([float("nan"), -1.0, 2.0, 7.0]).view(1, 1, 2, 2).repeat(2, 3, 1, 1)
    stats = torch.zeros(3), torch.ones(3)
    y, _, _ = ops.bn_act(x, torch.ones(3), torch.zeros(3), *stats, training=False, activation=activation, impl=backend)
    ref = ACTIVATION_FNS[activation](F.batch_norm(x, *stats))
    torch.testing.assert_close(y, ref, equal_nan=True)


def test_empty_batch(backend):
    require_backend("bn_act", backend)
    x = torch.empty(0, 3, 4, 4, requires_grad=True)
    y, _, _ = ops.bn_act(x, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3), training=False,
                          impl=backend)
    assert y.shape == x.shape


def test_bad_inputs_give_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    w = torch.ones(3)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        ops.bn_act(torch.randn(2, 3), w, w)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.bn_act(torch.ones(2, 3, 4, 4, dtype=torch.int64), w, w)
    with pytest.raises(ValueError, match=r"weight must have shape \[C\] = \[3\]"):
        ops.bn_act(x, torch.ones(4), w)
    with pytest.raises(ValueError, match="running_mean and running_var must both be given"):
        ops.bn_act(x, w, w, running_mean=torch.zeros(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ops.bn_act(torch.randn(1, 3, 1, 1), w, w)
    with pytest.raises(ValueError, match="impl= must be one of"):
        ops.bn_act(x, w, w, impl="fast")
    with pytest.raises(ValueError, match=r"activation must be one of \('none', 'relu'"):
        ops.bn_act(x, w, w, activation="gelu")
    with pytest.raises(fastblocks.BackendUnavailable, match="cuda backend runs CUDA tensors|without CUDA|not built"):
        ops.bn_act(x, w, w, impl="cuda")


def test_extension_checks_its_inputs():
    require_backend("bn_act", "cpp")
    ext = torch.ops.fastblocks_ext
    x = torch.randn(2, 3, 4, 4)
    c = torch.ones(3)
    with pytest.raises(RuntimeError, match="x must be NCHW or channels_last"):
        ext.bn_act_stats(x[..., ::2])
    with pytest.raises(RuntimeError, match="mean must be a contiguous"):
        ext.bn_act_forward(x, torch.ones(4), c, c, c, 1)
    with pytest.raises(RuntimeError, match="invstd must be Float"):
        ext.bn_act_forward(x, c, c.double(), c, c, 1)
    with pytest.raises(RuntimeError, match="grad must be dense"):
        ext.bn_act_backward(x.transpose(2, 3), x, c, c, c, c, True, 1)
    with pytest.raises(RuntimeError, match="grad_x must have the shape, strides"):
        ext.bn_act_backward_into(x, x, c, c, c, c, True, 1, torch.zeros(2, 3, 4, 4).contiguous(
            memory_format=torch.channels_last))
    for bad in (-1, len(ACTIVATIONS)):
        with pytest.raises(RuntimeError, match="activation must be a code"):
            ext.bn_act_forward(x, c, c, c, c, bad)
        with pytest.raises(RuntimeError, match="activation must be a code"):
            ext.bn_act_backward(x, x, c, c, c, c, True, bad)

