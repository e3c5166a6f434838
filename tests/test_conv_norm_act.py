"""ConvNormAct (conv -> fused BatchNorm + activation) against torchvision's Conv2dNormActivation, and the
fused BatchNormAct2d against timm's: outputs, gradients, running statistics, what backward keeps."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.ops.misc import Conv2dNormActivation  # noqa: E402

import fastblocks  # noqa: E402
from fastblocks.nn.blocks import BatchNormAct2d, ConvNormAct  # noqa: E402
from tests.conftest import require_backend  # noqa: E402
from tests.test_blocks import assert_same_step  # noqa: E402

FUSED_MODULES = {"silu": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}
BN_VARIANTS = {"default": {}, "momentum_none": {"momentum": None}, "affine_false": {"affine": False},
               "no_running_stats": {"track_running_stats": False}}


def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics (eval mode must use them)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return module


@pytest.mark.parametrize("variant", list(BN_VARIANTS))
@pytest.mark.parametrize("activation", list(FUSED_MODULES))
def test_conv_norm_act_matches_torchvision(backend, activation, variant):
    """Outputs, input and parameter gradients, running statistics (two training steps) and eval mode."""
    require_backend("bn_act", backend, "cpu", torch.float64)
    norm = lambda c: nn.BatchNorm2d(c, **BN_VARIANTS[variant])  # noqa: E731
    act = FUSED_MODULES[activation]
    ref = _randomize(Conv2dNormActivation(5, 6, 3, 2, norm_layer=norm, activation_layer=act)).double()
    fb = ConvNormAct(5, 6, 3, 2, norm_layer=norm, activation=act, impl=backend).double()
    fb.load_state_dict(ref.state_dict())
    assert list(fb.state_dict()) == list(ref.state_dict())
    assert fb.fused_activation() == activation
    layout = torch.channels_last if activation in ("silu", "relu6") else torch.contiguous_format
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64).contiguous(memory_format=layout)
    for _ in range(2):
        assert_same_step(ref, fb, x, train=True)
    assert_same_step(ref, fb, x, train=False)


@pytest.mark.parametrize("impl, kept", [("cpp", 1), ("triton", 1), ("torch", 2)])
def test_conv_norm_act_keeps_only_the_conv_output(impl, kept):
    """Training with the fused kernels saves the conv input and output; torchvision also saves the
    BatchNorm output, and so does the `torch` backend (eager's BatchNorm2d and activation)."""
    require_backend("bn_act", impl)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    counts = {}
    for name, module in [("torchvision", Conv2dNormActivation(4, 8, 1, activation_layer=nn.SiLU)),
                         ("fastblocks", ConvNormAct(4, 8, 1, activation=nn.SiLU, impl=impl))]:
        saved = set()

        def pack(t, saved=saved):
            if t.dim() == 4 and t.shape[1] == 8:  # the conv output and what is computed from it
                saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        counts[name] = len(saved)
    assert counts == {"torchvision": 2, "fastblocks": kept}


def test_conv_norm_act_impl_reaches_the_op():
    module = ConvNormAct(3, 4, 1, activation=nn.ReLU, impl="cuda")
    with pytest.raises(fastblocks.BackendUnavailable):
        module(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("norm, act", [(partial(nn.GroupNorm, 2), nn.SiLU), (nn.BatchNorm2d, nn.GELU),
                                       (nn.BatchNorm2d, None)])
def test_conv_norm_act_unfusable_runs_its_children(norm, act):
    ref = Conv2dNormActivation(4, 6, 3, norm_layer=norm, activation_layer=act, inplace=None)
    fb = ConvNormAct(4, 6, 3, norm_layer=norm, activation=act)
    fb.load_state_dict(ref.state_dict())
    assert fb.fused_activation() is None
    x = torch.randn(2, 4, 5, 5)
    assert_same_step(ref, fb, x, train=True)


def test_conv_norm_act_from_module_holds_the_same_children():
    ref = _randomize(Conv2dNormActivation(3, 8, 3, 2, activation_layer=nn.Hardswish))
    fb = ConvNormAct.from_module(ref, impl="torch")
    assert all(a is b for a, b in zip(fb, ref)) and fb.fused_activation() == "hardswish"
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fb.eval()(x), ref.eval()(x))
    with pytest.raises(ValueError, match="needs Sequential"):
        ConvNormAct.from_module(nn.Sequential(nn.BatchNorm2d(3)))


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_conv_norm_act_compile_fullgraph(impl):
    require_backend("bn_act", impl)
    torch._dynamo.reset()
    fb = _randomize(ConvNormAct(4, 6, 3, activation=nn.SiLU, impl=impl))
    ref = ConvNormAct(4, 6, 3, activation=nn.SiLU, impl=impl)
    ref.load_state_dict(fb.state_dict())
    compiled = torch.compile(fb, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 5, 5)
    for train in (True, False):
        fb.train(train)
        ref.train(train)
        torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(fb[1].running_var, ref[1].running_var)
    assert fb[1].num_batches_tracked == ref[1].num_batches_tracked == 1


@pytest.mark.parametrize("activation", ["silu", "hardswish"])
def test_batch_norm_act_matches_timm(backend, activation):
    timm = pytest.importorskip("timm")
    require_backend("bn_act", backend, "cpu", torch.float64)
    ref = _randomize(timm.layers.BatchNormAct2d(6, momentum=None, act_layer=activation)).double()
    fb = BatchNormAct2d.from_module(ref, impl="torch")
    assert fb.activation == activation and list(fb.state_dict()) == list(ref.state_dict())
    assert fb.weight is ref.weight and fb.running_var is ref.running_var
    ref = _randomize(timm.layers.BatchNormAct2d(6, momentum=None, act_layer=activation)).double()
    fb = BatchNormAct2d(6, momentum=None, activation=FUSED_MODULES[activation], impl=backend).double()
    fb.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    for _ in range(2):
        assert_same_step(ref, fb, x, train=True)
    assert_same_step(ref, fb, x, train=False)
    with pytest.raises(ValueError, match="cannot fuse a Dropout"):
        BatchNormAct2d.from_module(timm.layers.BatchNormAct2d(6, drop_layer=nn.Dropout))
    with pytest.raises(ValueError, match="BatchNormAct2d fuses"):
        BatchNormAct2d.from_module(timm.layers.BatchNormAct2d(6, act_layer=nn.GELU))
