"""The shift op: every backend against the slicing reference and an independent depthwise-conv
oracle, the documented channel -> offset table, adjointness, gradients, layouts and bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastblocks
from fastblocks import ops
from fastblocks.ops.shift import shift_reference
from tests.conftest import require_backend

# (shape, kernel_size, dilation, stride): odd H and W, N = 1, C divisible by k², C with leftovers,
# C < k² (identity), k = 1 / 3 / 5, dilation 2 and 3 (larger than the image), stride 2 and 3.
CASES = [
    ((2, 18, 5, 7), 3, 1, 1),
    ((1, 20, 6, 5), 3, 1, 1),
    ((2, 5, 4, 3), 3, 1, 1),
    ((1, 27, 7, 9), 3, 2, 1),
    ((2, 19, 7, 6), 3, 1, 2),
    ((1, 50, 9, 8), 5, 1, 1),
    ((1, 4, 3, 5), 1, 1, 1),
    ((2, 30, 5, 5), 5, 2, 2),
    ((1, 9, 2, 2), 3, 3, 1),
    ((2, 11, 5, 7), 3, 1, 3),
    ((2, 18, 2, 2), 3, 1, 2),  # a 1x1 output: both layouts at once, the input's decides
]
LAYOUTS = ["contiguous", "channels_last"]

# The docstring's table for k = 3: group t -> (dy, dx), with out[i, j] = x[i + dy, j + dx].
TABLE_K3 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


def _conv_oracle(x, kernel_size, dilation, stride):
    """Shift as a depthwise convolution with one-hot kernels, written from the docstring alone."""
    C, k = x.shape[1], kernel_size
    group = C // (k * k)
    weight = torch.zeros(C, 1, k, k, dtype=x.dtype)
    for c in range(C):
        tap = c // group if group and c < k * k * group else (k * k) // 2
        weight[c, 0, tap // k, tap % k] = 1
    return F.conv2d(x, weight.to(x.device), stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,k,d,s", CASES)
def test_matches_reference(backend, device, dtype, layout, shape, k, d, s):
    require_backend("shift", backend, device, dtype)
    x = _layout(torch.randn(shape, dtype=dtype, device=device), layout).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y = ops.shift(x, k, d, s, impl=backend)
    yr = shift_reference(xr, k, d, s)
    assert y.shape == (shape[0], shape[1], -(-shape[2] // s), -(-shape[3] // s))
    assert torch.equal(y, yr)  # data movement: bit-exact
    assert torch.equal(y, _conv_oracle(x.detach(), k, d, s))
    if layout == "channels_last" and shape[1] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    assert torch.equal(x.grad, xr.grad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_group_moves_by_its_offset(backend, device, layout):
    """k = 3, C = 2·9 + 2: group t = channels {2t, 2t + 1} moves by TABLE_K3[t], leftovers stay."""
    require_backend("shift", backend, device)
    H, W = 5, 6
    x = _layout(torch.arange(1.0, 1 + 20 * H * W, device=device).reshape(1, 20, H, W), layout)
    y = ops.shift(x, impl=backend)
    for c in range(20):
        dy, dx = TABLE_K3[c // 2] if c < 18 else (0, 0)
        expected = torch.zeros(H, W, device=device)
        rows, cols = slice(max(0, -dy), min(H, H - dy)), slice(max(0, -dx), min(W, W - dx))
        src_rows, src_cols = slice(rows.start + dy, rows.stop + dy), slice(cols.start + dx, cols.stop + dx)
        expected[rows, cols] = x[0, c, src_rows, src_cols]
        assert torch.equal(y[0, c], expected), f"channel {c}"
        # zeros exactly where nothing enters (x has no zeros)
        assert int((y[0, c] == 0).sum()) == H * W - (rows.stop - rows.start) * (cols.stop - cols.start)


def test_dilation_and_stride_offsets(backend, device):
    """Group 5 of k = 3 has dx = +dilation; stride samples out[i, j] = x[i*s + dy, j*s + dx]."""
    require_backend("shift", backend, device)
    x = torch.randn(1, 9, 7, 9, device=device)
    y = ops.shift(x, 3, dilation=2, stride=2, impl=backend)
    assert y.shape == (1, 9, 4, 5)
    torch.testing.assert_close(y[0, 5, :, :4], x[0, 5, ::2, 2::2], rtol=0, atol=0)
    assert torch.all(y[0, 5, :, 4] == 0)  # column 4 reads x[..., 10]: outside
    torch.testing.assert_close(y[0, 1, 1:], x[0, 1, 0:5:2, ::2], rtol=0, atol=0)  # dy = -2
    assert torch.all(y[0, 1, 0] == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,k,d,s", [CASES[1], CASES[4], CASES[7], CASES[9]])
def test_backward_is_the_adjoint(backend, device, layout, shape, k, d, s):
    """<shift(x), g> == <x, shift_backward(g)>, and autograd returns shift_backward(g)."""
    require_backend("shift", backend, device, torch.float64)
    x = _layout(torch.randn(shape, dtype=torch.float64, device=device), layout).requires_grad_()
    y = ops.shift(x, k, d, s, impl=backend)
    g = torch.randn_like(y)
    dx = torch.ops.fastblocks.shift_backward(g, k, d, s, shape[2], shape[3], backend)
    torch.testing.assert_close((y * g).sum(), (x * dx).sum(), rtol=1e-12, atol=1e-12)
    y.backward(g)
    assert torch.equal(x.grad, dx)


def test_gradcheck(backend, device):
    require_backend("shift", backend, device, torch.float64)
    x = torch.randn(1, 10, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.shift(t, 3, 1, 2, impl=backend), (x,))
    # the op is linear, so the random projections of fast mode check the rest as well
    x = torch.randn(2, 11, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    for k, d, s in [(3, 1, 1), (3, 2, 2), (5, 1, 1)]:
        def fn(t):
            return ops.shift(t, k, d, s, impl=backend)
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.shift(t, 3, 1, 2, impl=backend), (xl,), fast_mode=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(backend, layout):
    require_backend("shift", backend)
    x = _layout(torch.randn(2, 12, 5, 7), layout).requires_grad_()
    torch.library.opcheck(torch.ops.fastblocks.shift.default, (x, 3, 1, 2, backend))
    g = _layout(torch.randn(2, 12, 3, 4), layout)
    torch.library.opcheck(torch.ops.fastblocks.shift_backward.default, (g, 3, 1, 2, 5, 7, backend))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_is_bit_exact(backend, device, dtype, layout):
    require_backend("shift", backend, device, dtype)
    x = _layout(torch.randn(2, 21, 7, 5, device=device).to(dtype), layout).requires_grad_()
    y = ops.shift(x, 3, 1, 2, impl=backend)
    assert y.dtype == dtype
    assert torch.equal(y, _conv_oracle(x.detach().double(), 3, 1, 2).to(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().double().requires_grad_()
    shift_reference(xr, 3, 1, 2).backward(g.double())
    assert torch.equal(x.grad, xr.grad.to(dtype))


@pytest.mark.parametrize("shape", [(0, 9, 4, 4), (2, 0, 4, 4), (2, 9, 0, 3)])
def test_empty(backend, device, shape):
    require_backend("shift", backend, device)
    x = torch.randn(shape, device=device, requires_grad=True)
    y = ops.shift(x, stride=2, impl=backend)
    assert y.shape == (shape[0], shape[1], -(-shape[2] // 2), -(-shape[3] // 2))
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_dense_input(backend, device):
    require_backend("shift", backend, device)
    x = torch.randn(2, 18, 6, 10, device=device)[..., ::2]
    torch.testing.assert_close(ops.shift(x, impl=backend), shift_reference(x), rtol=0, atol=0)


def test_bad_inputs_give_clear_errors():
    x = torch.randn(1, 9, 4, 4)
    for k in (2, 0, -1):
        with pytest.raises(ValueError, match="kernel_size must be an odd integer >= 1"):
            ops.shift(x, k)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        ops.shift(x, 3.0)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        ops.shift(x, stride=0)
    with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
        ops.shift(x, dilation=0)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        ops.shift(torch.randn(9, 4, 4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.shift(torch.ones(1, 9, 4, 4, dtype=torch.int64))
    with pytest.raises(fastblocks.BackendUnavailable, match="cuda backend runs CUDA tensors|without CUDA|not built"):
        ops.shift(x, impl="cuda")


def test_extension_checks_its_arguments():
    require_backend("shift", "cpp")
    ext = torch.ops.fastblocks_ext
    x = torch.randn(1, 9, 4, 4)
    with pytest.raises(RuntimeError, match="kernel_size must be an odd integer >= 1"):
        ext.shift_forward(x, 4, 1, 1)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        ext.shift_forward(x, 3, 1, 0)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ext.shift_forward(x[0], 3, 1, 1)
    with pytest.raises(RuntimeError, match="x must be contiguous or channels_last"):
        ext.shift_forward(x[..., ::2], 3, 1, 1)
    with pytest.raises(RuntimeError, match=r"grad must be \[N, C, ceil\(height / stride\)"):
        ext.shift_backward(x, 3, 1, 2, 4, 4)


def test_module(backend):
    require_backend("shift", backend)
    m = fastblocks.nn.Shift(20, kernel_size=3, dilation=2, stride=2, impl=backend)
    x = torch.randn(2, 20, 7, 6)
    assert torch.equal(m(x), shift_reference(x, 3, 2, 2))
    assert list(m.parameters()) == [] and m.state_dict() == {}
    assert "20, kernel_size=3, dilation=2, stride=2" in repr(m)
    with pytest.raises(ValueError, match=r"Shift\(20\) got an input with 19 channels"):
        m(torch.randn(2, 19, 7, 6))


@pytest.mark.parametrize("compile_backend", ["torch", "cpp"])
def test_compile_fullgraph(compile_backend):
    require_backend("shift", compile_backend)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 18, 1), fastblocks.nn.Shift(18, impl=compile_backend),
                                fastblocks.nn.Shift(18, 3, stride=2, impl=compile_backend), torch.nn.Conv2d(18, 4, 1))
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert x.grad is not None


def test_backends_report():
    assert fastblocks.backends(verbose=False)["shift"]["cpu"]["torch"] is None
