"""Memory-efficient DenseNet against torchvision's DenseNet with the same weights: outputs, every
gradient and the running statistics, in train and eval mode, for every backend that runs on CPU;
the shared block buffer across passes; and the memory it keeps for backward."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torchvision
from torchvision.models.densenet import _DenseBlock, _DenseLayer, _Transition

import fastblocks
from fastblocks import _backend, models
from fastblocks.models.densenet import saved_bytes
from fastblocks.nn import DenseBlock, DenseLayer, Transition
from tests.conftest import require_backend

densenet_mod = importlib.import_module("fastblocks.nn.densenet")

CPU_BACKENDS = ["torch", "triton", "cpp"]


def _pair(tv_module, fb_module, dtype=torch.float64):
    """The torchvision module (random BN statistics and affine) and the fastblocks one with its weights."""
    for m in tv_module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    tv_module = tv_module.to(dtype)
    fb_module = fb_module.to(dtype)
    fb_module.load_state_dict(tv_module.state_dict(), strict=True)
    return tv_module, fb_module


def _assert_same_step(tv, fb, x, rtol=1e-7, atol=1e-9, check_input_grad=True):
    """One forward + backward of each on x: equal outputs, input gradients, parameter gradients and buffers."""
    x_tv = x.detach().clone().requires_grad_(x.requires_grad)
    x_fb = x.detach().clone().requires_grad_(x.requires_grad)
    y_tv, y_fb = tv(x_tv), fb(x_fb)
    torch.testing.assert_close(y_fb, y_tv, rtol=rtol, atol=atol)
    if y_tv.requires_grad:
        dy = torch.randn_like(y_tv)
        y_tv.backward(dy)
        y_fb.backward(dy)
        if check_input_grad and x.requires_grad:
            torch.testing.assert_close(x_fb.grad, x_tv.grad, rtol=rtol, atol=atol)
        for (name, p_fb), p_tv in zip(fb.named_parameters(), tv.parameters()):
            if p_tv.grad is None:
                assert p_fb.grad is None, name
            else:
                torch.testing.assert_close(p_fb.grad, p_tv.grad, rtol=rtol, atol=atol, msg=name)
    for (name, b_fb), b_tv in zip(fb.named_buffers(), tv.buffers()):
        torch.testing.assert_close(b_fb, b_tv, rtol=rtol, atol=atol, msg=name)
    return y_fb


# ---------------------------------------------------------------------------------------------
# Models: parameter counts, state_dict keys, equality with torchvision.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("densenet121", 7_978_856), ("densenet161", 28_681_000),
                                        ("densenet169", 14_149_480), ("densenet201", 20_013_928)])
def test_parameter_counts_and_state_dict_keys(name, count):
    with torch.device("meta"):
        fb = getattr(models, name)()
        tv = getattr(torchvision.models, name)()
    assert sum(p.numel() for p in fb.parameters()) == count
    assert list(fb.state_dict()) == list(tv.state_dict())
    assert "features.denseblock1.denselayer1.norm1.weight" in fb.state_dict()


def test_densenet_bc_100():
    model = models.densenet_bc_100(num_classes=10, impl="cpp" if fastblocks.backends(False)["bn_act"]["cpu"]["cpp"]
                                   is None else "torch")
    assert sum(p.numel() for p in model.parameters()) == 769_162
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert len(blocks) == 3 and all(len(b) == 16 for b in blocks)
    assert model.features.conv0.out_channels == 24 and model.features.conv0.kernel_size == (3, 3)
    x = torch.randn(2, 3, 16, 16)  # any multiple of 4; 32x32 (CIFAR) works the same, slower
    y = model(x)
    assert y.shape == (2, 10)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_densenet121_matches_torchvision(backend, memory_efficient):
    """Train step (outputs, all gradients, running statistics), then eval; float64 so that a
    mismatch is a bug, not rounding. 64x64 keeps every batch norm over more than two values."""
    require_backend("bn_act", backend, "cpu", torch.float64)
    tv, fb = _pair(torchvision.models.densenet121(num_classes=10),
                   models.densenet121(num_classes=10, memory_efficient=memory_efficient, impl=backend))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    _assert_same_step(tv.train(), fb.train(), x)
    if memory_efficient:
        tv.zero_grad()
        fb.zero_grad()
        _assert_same_step(tv.eval(), fb.eval(), x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_dense_block_matches_torchvision(backend, layout, memory_efficient):
    require_backend("bn_act", backend, "cpu", torch.float64)
    tv, fb = _pair(_DenseBlock(3, 5, bn_size=2, growth_rate=3, drop_rate=0),
                   DenseBlock(3, 5, bn_size=2, growth_rate=3, drop_rate=0, memory_efficient=memory_efficient,
                              impl=backend))
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = _assert_same_step(tv.train(), fb.train(), x)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    _assert_same_step(tv.eval(), fb.eval(), x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_dense_block(backend):
    """gradcheck w.r.t. the input and every parameter of a tiny memory-efficient block, train and eval."""
    require_backend("bn_act", backend, "cpu", torch.float64)
    block = DenseBlock(2, 3, bn_size=2, growth_rate=2, drop_rate=0, impl=backend).double()
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    for training in (True, False):
        block.train(training)
        assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_dense_layer_and_transition_drop_in(memory_efficient):
    """torchvision's _DenseLayer takes a list of tensors; the transition's pool-before-conv is the same function."""
    tv, fb = _pair(_DenseLayer(7, growth_rate=4, bn_size=2, drop_rate=0),
                   DenseLayer(7, growth_rate=4, bn_size=2, drop_rate=0, memory_efficient=memory_efficient))
    parts = [torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True),
             torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)]
    y_tv, y_fb = tv(parts), fb(parts)
    torch.testing.assert_close(y_fb, y_tv)
    g_tv = torch.autograd.grad(y_tv.sum(), parts + list(tv.parameters()))
    g_fb = torch.autograd.grad(y_fb.sum(), parts + list(fb.parameters()))
    for a, b in zip(g_fb, g_tv):
        torch.testing.assert_close(a, b)
    tv_t, fb_t = _pair(_Transition(6, 3), Transition(6, 3, memory_efficient=memory_efficient))
    _assert_same_step(tv_t.train(), fb_t.train(), torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True))


def test_dropout_matches_torchvision():
    """Same random stream as F.dropout on CPU: the same elements are dropped."""
    tv, fb = _pair(_DenseBlock(2, 4, bn_size=2, growth_rate=3, drop_rate=0.3),
                   DenseBlock(2, 4, bn_size=2, growth_rate=3, drop_rate=0.3))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y_tv = tv(x)
    torch.manual_seed(1)
    y_fb = fb(x)
    torch.testing.assert_close(y_fb, y_tv)
    g_tv = torch.autograd.grad(y_tv.square().sum(), [x, *tv.parameters()])
    g_fb = torch.autograd.grad(y_fb.square().sum(), [x, *fb.parameters()])
    for a, b in zip(g_fb, g_tv):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("momentum,track", [(None, True), (0.1, False)])
def test_batchnorm_options(momentum, track):
    """momentum=None (cumulative average) and track_running_stats=False behave like nn.BatchNorm2d."""
    tv, fb = _pair(_DenseBlock(2, 4, bn_size=2, growth_rate=3, drop_rate=0),
                   DenseBlock(2, 4, bn_size=2, growth_rate=3, drop_rate=0))
    for m in list(tv.modules()) + list(fb.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
            if not track:
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    for _ in range(2):
        _assert_same_step(tv.train(), fb.train(), torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True))
    _assert_same_step(tv.eval(), fb.eval(), torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True))


# ---------------------------------------------------------------------------------------------
# The shared buffers: consecutive passes, no input gradient, eval, no_grad.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def blocks():
    return _pair(_DenseBlock(3, 4, bn_size=2, growth_rate=3, drop_rate=0),
                 DenseBlock(3, 4, bn_size=2, growth_rate=3, drop_rate=0))


def test_two_passes_held_at_once(blocks):
    """Two forwards before either backward: each pass's buffers and saved views stay its own."""
    tv, fb = blocks
    xs = [torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ys_tv = [tv(x) for x in xs]
    ys_fb = [fb(x) for x in xs]
    for i in (1, 0):  # backward in reverse order
        dy = torch.randn_like(ys_tv[i])
        g_tv = torch.autograd.grad(ys_tv[i], [xs[i], *tv.parameters()], dy)
        g_fb = torch.autograd.grad(ys_fb[i], [xs[i], *fb.parameters()], dy)
        torch.testing.assert_close(ys_fb[i], ys_tv[i])
        for a, b in zip(g_fb, g_tv):
            torch.testing.assert_close(a, b)
    for (name, b_fb), b_tv in zip(fb.named_buffers(), tv.buffers()):
        torch.testing.assert_close(b_fb, b_tv, msg=name)


def test_consecutive_steps(blocks):
    tv, fb = blocks
    for _ in range(2):
        _assert_same_step(tv, fb, torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True))


def test_input_without_grad(blocks):
    tv, fb = blocks
    _assert_same_step(tv, fb, torch.randn(2, 4, 3, 3, dtype=torch.float64))


def test_frozen_parameters_and_input(blocks):
    tv, fb = blocks
    for p in list(tv.parameters()) + list(fb.parameters()):
        p.requires_grad_(False)
    y = _assert_same_step(tv, fb, torch.randn(2, 4, 3, 3, dtype=torch.float64))
    assert y.grad_fn is None


def test_eval_and_no_grad(blocks):
    tv, fb = blocks
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y = _assert_same_step(tv.train(), fb.train(), x)  # train mode still updates running statistics
        assert y.grad_fn is None
        _assert_same_step(tv.eval(), fb.eval(), x)
    _assert_same_step(tv.eval(), fb.eval(), x)


def test_output_modified_in_place_is_caught(blocks):
    """The block's output is the saved buffer: autograd's version check still guards it."""
    _, fb = blocks
    y = fb(torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------
# Memory: bytes kept for backward (device-independent).
# ---------------------------------------------------------------------------------------------

def test_saved_bytes_densenet121():
    """DenseNet-121, bs 2 @ 64x64, float32: fastblocks keeps <= 0.35x of torchvision plain.

    Measured: fastblocks 4.52 MB, torchvision plain 21.86 MB (0.207x), torchvision
    memory_efficient=True 10.34 MB (0.473x). Every term scales with N * H * W, so the ratios hold
    at bs 64 @ 224 (up to the 1x1 final-stage rounding).
    """
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    measured = {}
    for name, model in [("fastblocks", models.densenet121(impl="torch")),
                        ("plain", torchvision.models.densenet121()),
                        ("checkpoint", torchvision.models.densenet121(memory_efficient=True))]:
        x_in = x.clone().requires_grad_()
        measured[name], _ = saved_bytes(lambda: model(x_in), tuple(model.parameters()) + (x_in,))
    assert measured["fastblocks"] <= 0.35 * measured["plain"], measured
    assert measured["fastblocks"] < measured["checkpoint"], measured


def test_block_keeps_one_buffer_and_the_bottlenecks():
    """A block of L layers keeps its buffer once, each bottleneck, and per-channel statistics only."""
    fb = DenseBlock(4, 8, bn_size=4, growth_rate=6, drop_rate=0, impl="torch")
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    kept, y = saved_bytes(lambda: fb(x), tuple(fb.parameters()) + (x,))
    n_hw, elem = 2 * 5 * 5, 4
    buffer = (8 + 4 * 6) * n_hw * elem
    bottlenecks = 4 * (4 * 6) * n_hw * elem
    assert buffer + bottlenecks <= kept < buffer + bottlenecks + 4096  # + statistics (a few hundred floats)
    assert y.untyped_storage().nbytes() == buffer  # the output is the buffer itself


def test_model_copy_and_repr():
    model = models.densenet121(num_classes=3)
    assert "memory_efficient=True" in repr(model.features.denseblock1.denselayer1)
    copy.deepcopy(model)


def test_auto_prefers_kernels_for_the_recompute(monkeypatch):
    """AUTO_ORDER may rank ``torch`` first for bn_act (measured as eager's nn.BatchNorm2d, which the
    modules run for it); the recompute paths have no such layer, and ``torch`` there means bn_act's
    pure-PyTorch formulas, so ``auto`` takes a kernel backend when one can run."""
    require_backend("bn_act", "cpp")
    monkeypatch.setitem(_backend.AUTO_ORDER, ("bn_act", "cpu"), ("torch", "cpp"))
    x = torch.randn(2, 4, 3, 3)
    assert _backend.resolve("bn_act", "auto", x) == "torch"
    assert _backend.resolve("bn_act", "auto", x, prefer_kernels=True) == "cpp"
    assert _backend.resolve("bn_act", "torch", x, prefer_kernels=True) == "torch"
    calls = []
    real = densenet_mod.bn_act_forward
    monkeypatch.setattr(densenet_mod, "bn_act_forward", lambda *a: calls.append(a[-1]) or real(*a))
    layer = densenet_mod.DenseLayer(4, growth_rate=2, bn_size=2, drop_rate=0.0)
    densenet_mod.dense_block(x.requires_grad_(), [layer])
    assert calls and set(calls) == {"cpp"}
