"""The CUDA kernels (csrc/*/*.cu) run on the CPU by the CUDA emulator (tests/cuda_emu) and compared
with the C++ CPU kernels (themselves tested against PyTorch) on the same arguments: every op the
extension registers for CUDA, every dtype, both layouts, odd shapes, channel slices and unaligned
storage. This is what the CPU can prove about the CUDA kernels' indexing, reductions, barriers and
shuffles; their speed needs a GPU (bench/)."""
from __future__ import annotations

import importlib
import os
import platform
import re

import pytest
import torch

from fastblocks import _ext
from tests.conftest import require_backend
from tests.cuda_emu import build

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last"]


@pytest.fixture(scope="module")
def emu():
    if os.environ.get("CUDA_EMU_ASAN_PASS_FOLLOWS") == "1" and os.environ.get("CUDA_EMU_ASAN") != "1":
        pytest.skip("CI runs these tests next, under AddressSanitizer (tests/cuda_emu/asan.sh)")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the other tests run the CUDA kernels for real")
    require_backend("shift", "cpp")  # the reference: fastblocks._C's CPU kernels
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the CUDA emulator switches fibers with x86-64 assembly")
    return getattr(torch.ops, build.load())


def test_every_cuda_op_is_compared():
    """Each op csrc/*/*.cu registers for CUDA is compared by some test below."""
    with open(__file__) as f:
        compared = set(re.findall(r'_compare\(emu, "(\w+)"', f.read()))
    assert compared == build.cuda_ops()


def _tol(dtype):
    return {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
            torch.float32: (2e-5, 2e-5), torch.float64: (1e-12, 1e-12)}[dtype]


def _compare(emu, name, *args, mutated=()):
    """Runs op `name` on the emulated CUDA kernels and on the CPU kernels and compares every output
    (values, dtype, strides) and every argument the op writes into (indices in `mutated`)."""
    emu_args = [_clone_strided(a) if i in mutated else a for i, a in enumerate(args)]
    got = getattr(emu, name)(*emu_args)
    want = getattr(torch.ops.fastblocks_ext, name)(*args)
    got, want = (list(o) if isinstance(o, (tuple, list)) else [o] for o in (got, want))
    got += [emu_args[i] for i in mutated]
    want += [args[i] for i in mutated]
    for i, (g, w) in enumerate(zip(got, want)):
        # float32 results of a low-precision op (statistics, weight gradients) sum rounded inputs in
        # another order on each side: the input dtype's tolerance.
        atol, rtol = _tol(w.dtype if w.dtype != torch.float32 else args[0].dtype)
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{name} output {i}: {m}")
        if w.dim() == 4 and min(w.shape[1], w.shape[2] * w.shape[3]) > 1:
            assert g.stride() == w.stride(), f"{name} output {i}: strides {g.stride()} != {w.stride()}"


def _clone_strided(t):
    """A copy of t with t's strides and storage offset (also for a slice of a larger buffer)."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
    return storage.as_strided(t.size(), t.stride(), t.storage_offset()).copy_(t)


def _x(shape, layout, dtype, scale=1.0, slice_extra=0):
    N, C, H, W = shape
    buf = torch.randn(N, C + slice_extra, H, W, dtype=torch.float64).mul_(scale).to(dtype)
    if layout == "channels_last":
        buf = buf.contiguous(memory_format=torch.channels_last)
    return buf[:, :C]


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel(C, dtype, lo=-1.0, hi=1.0):
    return torch.rand(C, dtype=_acc(dtype)) * (hi - lo) + lo


# Shapes: odd sizes, N = 1, C below, at and above a 32-channel tile, planes below a warp and planes
# larger than a 256-thread block.
SHAPES = [(2, 3, 5, 7), (1, 33, 4, 6), (3, 40, 9, 2), (2, 70, 3, 3), (2, 5, 17, 19)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("slice_extra", [0, 5])
def test_bn_act(emu, shape, layout, dtype, slice_extra):
    C = shape[1]
    x = _x(shape, layout, dtype, 2.0, slice_extra)
    _compare(emu, "bn_act_stats", x)
    mean, invstd = torch.ops.fastblocks_ext.bn_act_stats(x)
    w, b = _channel(C, dtype), _channel(C, dtype)
    grad = _x(shape, layout, dtype)  # dense in the output's layout
    for act in range(5):
        _compare(emu, "bn_act_forward", x, mean, invstd, w, b, act)
        for batch_stats in (True, False):
            _compare(emu, "bn_act_backward", grad, x, mean, invstd, w, b, batch_stats, act)
            grad_x = _x(shape, layout, dtype, 1.0, slice_extra)
            _compare(emu, "bn_act_backward_into", grad, x, mean, invstd, w, b, batch_stats, act, grad_x, mutated=(8,))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 3, 3)])
def test_bn_act_empty(emu, shape):
    """No values per channel (zero statistics and gradients), or no channels."""
    x = torch.randn(shape, dtype=torch.float64)
    _compare(emu, "bn_act_stats", x)
    mean, invstd = torch.ops.fastblocks_ext.bn_act_stats(x)
    w, b = _channel(shape[1], torch.float64), _channel(shape[1], torch.float64)
    _compare(emu, "bn_act_forward", x, mean, invstd, w, b, 3)
    _compare(emu, "bn_act_backward", torch.randn_like(x), x, mean, invstd, w, b, True, 3)


DW_CASES = [  # (shape, kernel, stride, padding, dilation): B0 / MobileNet-like, odd sizes, asymmetric
    ((2, 3, 7, 9), 3, (1, 1), (1, 1), (1, 1)),
    ((1, 33, 8, 5), 5, (2, 2), (2, 2), (1, 1)),
    ((2, 40, 9, 9), 7, (1, 1), (3, 3), (1, 1)),
    ((3, 8, 6, 7), 3, (2, 1), (0, 1), (2, 1)),
    ((2, 6, 20, 21), 3, (1, 1), (1, 1), (1, 1)),
    ((1, 5, 10, 11), 3, (3, 3), (1, 1), (1, 1)),  # stride 3: dx's general source-row division
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: f"{c[0]}-k{c[1]}s{c[2][0]}")
def test_dwconv_bn_act(emu, case, layout, dtype):
    shape, K, stride, padding, dilation = case
    C = shape[1]
    x = _x(shape, layout, dtype).contiguous(memory_format=_fmt(layout))
    w = torch.randn(C, 1, K, K, dtype=_acc(dtype)) / K
    geom = (list(stride), list(padding), list(dilation))
    _compare(emu, "dwconv_bn_stats", x, w, *geom)
    scale, shift, center = _channel(C, dtype, 0.5, 2.0), _channel(C, dtype), _channel(C, dtype)
    p, q = _channel(C, dtype), _channel(C, dtype)
    y = torch.ops.fastblocks_ext.dwconv_affine_act_forward(x, w, scale, shift, *geom, 0)
    grad = torch.randn(y.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=_fmt(layout))
    for act in range(5):
        _compare(emu, "dwconv_affine_act_forward", x, w, scale, shift, *geom, act)
        _compare(emu, "dwconv_affine_act_grad_stats", grad, x, w, scale, shift, center, *geom, act)
        _compare(emu, "dwconv_affine_act_backward", grad, x, w, scale, shift, p, q, *geom, act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 40, 3, 3), (3, 33, 1, 1), (2, 9, 17, 19)])
def test_hardswish_family(emu, shape, layout, dtype):
    x = _x(shape, layout, dtype, 4.0).contiguous(memory_format=_fmt(layout))
    grad = _x(shape, layout, dtype).contiguous(memory_format=_fmt(layout))
    _compare(emu, "hardswish_forward", x)
    _compare(emu, "hardswish_backward", grad, x)
    _compare(emu, "hardsigmoid_forward", x)
    _compare(emu, "hardsigmoid_backward", grad, x)
    g = torch.randn(shape[:2], dtype=torch.float64).mul_(4).to(dtype)
    _compare(emu, "hardsigmoid_gate_forward", x, g)
    _compare(emu, "hardsigmoid_gate_backward", grad, x, g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_unaligned_storage(emu, dtype):
    """An operand that starts off a 16-byte boundary takes the scalar (non-vector) kernel."""
    x = torch.randn(2 * 3 * 5 * 7 + 1, dtype=torch.float64).mul_(4).to(dtype)[1:].view(2, 3, 5, 7)
    grad = torch.randn(2, 3, 5, 7, dtype=torch.float64).to(dtype)
    _compare(emu, "hardswish_forward", x)
    _compare(emu, "hardswish_backward", grad, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, kernel_size, dilation, stride", [
    ((2, 9, 5, 7), 3, 1, 1), ((1, 7, 6, 5), 3, 2, 1), ((2, 30, 9, 8), 5, 1, 2), ((3, 4, 3, 3), 3, 1, 1),
    ((2, 36, 7, 7), 1, 1, 2), ((2, 9, 17, 19), 3, 1, 1)])
def test_shift(emu, shape, kernel_size, dilation, stride, layout, dtype):
    x = _x(shape, layout, dtype).contiguous(memory_format=_fmt(layout))
    _compare(emu, "shift_forward", x, kernel_size, dilation, stride)
    y = torch.ops.fastblocks_ext.shift_forward(x, kernel_size, dilation, stride)
    grad = torch.randn(y.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=_fmt(layout))
    _compare(emu, "shift_backward", grad, kernel_size, dilation, stride, shape[2], shape[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, squeeze", [((2, 3, 5, 7), 2), ((1, 40, 7, 7), 10), ((3, 70, 2, 3), 8),
                                            ((2, 33, 1, 1), 4), ((2, 5, 17, 19), 3)])
def test_squeeze_excite(emu, shape, squeeze, layout, dtype):
    C = shape[1]
    x = _x(shape, layout, dtype, 2.0).contiguous(memory_format=_fmt(layout))
    grad = _x(shape, layout, dtype).contiguous(memory_format=_fmt(layout))
    params = [torch.randn(squeeze, C) / C ** 0.5, torch.randn(squeeze), torch.randn(C, squeeze) / squeeze ** 0.5,
              torch.randn(C)]
    params = [p.to(dtype) for p in params]
    for act, hard_sigmoid in ((1, True), (3, False), (2, False), (4, True)):
        _compare(emu, "squeeze_excite_forward", x, *params, act, hard_sigmoid)
        _compare(emu, "squeeze_excite_backward", grad, x, *params, act, hard_sigmoid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DW_CASES[1:3], ids=lambda c: f"{c[0]}-k{c[1]}s{c[2][0]}")
def test_dwconv_cuda_training_passes(emu, monkeypatch, case, layout, dtype):
    """The CUDA backend's training step (the four kernels and the per-channel algebra between them
    in Python, which only CUDA tensors take) on the emulated kernels, against the torch reference."""
    dw = importlib.import_module("fastblocks.ops.dwconv_bn_act")  # the module (ops.dwconv_bn_act is the op)

    shape, K, stride, padding, dilation = case
    C = shape[1]
    x = _x(shape, layout, dtype).contiguous(memory_format=_fmt(layout))
    w = torch.randn(C, 1, K, K, dtype=_acc(dtype)) / K
    gamma, beta = _channel(C, dtype, 0.5, 2.0), _channel(C, dtype)
    geom = (list(stride), list(padding), list(dilation))
    for act in ("silu", "hardswish", "relu"):
        want = dw._train_op(x, w, gamma, beta, 1e-3, *geom, act, "torch")
        grad = torch.randn(want[0].shape, dtype=dtype).contiguous(memory_format=_fmt(layout))
        want_grads = dw._train_backward_op(grad, x, w, gamma, beta, want[1], want[2], *geom, act, "torch")
        with monkeypatch.context() as m:
            m.setattr(_ext, "op", lambda name: getattr(emu, name))
            got = dw._KERNELS["cuda"].train_forward(x, w, gamma, beta, 1e-3, geom, act)
            got_grads = dw._KERNELS["cuda"].train_backward(grad, x, w, gamma, beta, want[1], want[2], geom, act)
        atol, rtol = _tol(dtype)
        for g, r in zip((*got, *got_grads), (*want, *want_grads)):
            torch.testing.assert_close(g, r, atol=atol * 10, rtol=rtol * 10)
