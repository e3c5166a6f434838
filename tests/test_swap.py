"""fastblocks.swap on torchvision and timm models: same outputs, gradients and running statistics."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from torchvision.models import efficientnet as tv_eff  # noqa: E402

import fastblocks  # noqa: E402
from fastblocks.nn.blocks import BatchNormAct2d, ConvNormAct  # noqa: E402
from fastblocks.nn.densenet import DenseBlock, Transition  # noqa: E402
from fastblocks.nn.dwconv import DWConvBNAct  # noqa: E402
from fastblocks.nn.squeeze_excite import SqueezeExcite  # noqa: E402
from tests.conftest import require_backend  # noqa: E402
from tests.test_blocks import _randomize_bn, assert_same_step, require_ops  # noqa: E402

MODELS = {
    "tv_efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "tv_mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "tv_mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(),
    "tv_densenet121": lambda: torchvision.models.densenet121(),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
    "timm_mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100", pretrained=False),
    "timm_densenet121": lambda: timm.create_model("densenet121", pretrained=False),
}
# The fastblocks modules each model must end up with.
EXPECTED = {
    "efficientnet": (DWConvBNAct, SqueezeExcite),
    "mobilenet_v2": (DWConvBNAct,),
    "mobilenet": (DWConvBNAct, SqueezeExcite, fastblocks.nn.HardSwish),
    "densenet": (DenseBlock, Transition),
}


def _expected(name: str):
    return next(types for key, types in EXPECTED.items() if key in name.replace("mobilenetv3", "mobilenet"))


# float32 (oneDNN convolutions: float64 depthwise convolutions are very slow on CPU), the compiled
# kernels; the torch backend on one model (the blocks and models tests cover it in float64).
# DenseNet in float64: in float32 its training-mode input gradient differs from torchvision's by
# ~0.4% (BatchNorm over 8 values per channel in the last block amplifies rounding).
def _dtype(name: str, train: bool) -> torch.dtype:
    """fp64 where an fp32 step is too ill-conditioned to compare two implementations.

    MobileNetV2 at 64 px ends in 2x2 pixels: ReLU6 after BatchNorm over 8 values per channel, so a
    rounding difference that moves one value across a kink changes the input gradient by up to a few
    percent; torchvision's own fp32 step is 0.006-2.4 % from fp64 over five random inputs (and at 48
    px eager NCHW and channels_last differ by 1 %). DenseNet: the concatenations of deep blocks.
    """
    return torch.float64 if "densenet" in name or (train and "mobilenet_v2" in name) else torch.float32


@pytest.mark.parametrize(("name", "impl"),
                         [(name, "cpp") for name in MODELS] + [("timm_mobilenetv3_large_100", "torch")])
def test_swapped_model_matches_original(name, impl):
    for train in (True, False):
        dtype = _dtype(name, train)
        require_ops(impl, dtype)
        if "densenet" in name:
            require_backend("bn_act", impl, "cpu", dtype)
        torch.manual_seed(0)
        ref = MODELS[name]()
        _randomize_bn(ref)
        ref = ref.to(dtype)
        fb = fastblocks.swap(ref, impl=impl)
        for cls in _expected(name):
            assert any(type(m) is cls for m in fb.modules()), f"no {cls.__name__} in the swapped {name}"
        # 64 px keeps 2x2 pixels in the last stage (8 values per channel for training-mode BatchNorm)
        x = torch.randn(2, 3, 64, 64, dtype=dtype)
        assert_same_step(ref, fb, x, train=train)


@pytest.mark.parametrize("name", ["tv_efficientnet_b0", "tv_mobilenet_v3_large", "timm_efficientnet_b0",
                                  "timm_mobilenetv3_large_100"])
def test_stems_and_heads_fuse_batch_norm_and_activation(name):
    """Every conv -> BatchNorm -> activation outside the blocks (stem, head, timm's expansion) is fused."""
    fb = fastblocks.swap(MODELS[name]())
    fused = [m for m in fb.modules() if isinstance(m, ConvNormAct) and m.fused_activation() is not None
             or isinstance(m, BatchNormAct2d)]
    assert len(fused) >= 2
    for m in fb.modules():
        assert type(m).__name__ != "Conv2dNormActivation"
        if type(m) is timm.layers.BatchNormAct2d:
            assert isinstance(m.act, nn.Identity)  # nothing to fuse


def test_copy_or_in_place():
    ref = torchvision.models.mobilenet_v3_small()
    copy = fastblocks.swap(ref)
    assert copy is not ref and type(ref.features[1]).__module__.startswith("torchvision")
    assert not any(c.data_ptr() == r.data_ptr() for c, r in zip(copy.parameters(), ref.parameters()))
    params = list(ref.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    same = fastblocks.swap(ref, inplace=True, impl="torch")
    assert same is ref and type(ref.features[1]).__module__.startswith("fastblocks")
    assert all(a is b for a, b in zip(params, same.parameters()))  # the optimizer still trains the model
    before = [p.detach().clone() for p in params]
    same(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params) if p.grad is not None and p.grad.any())


def test_timm_in_place_keeps_tensors_and_mode():
    ref = timm.create_model("mobilenetv3_large_100", pretrained=False).eval()
    block = ref.blocks[1][0]
    conv_weight, bn_mean = block.conv_dw.weight, block.bn2.running_mean
    fastblocks.swap(ref, inplace=True)
    assert isinstance(block.conv_dw, DWConvBNAct) and isinstance(block.bn2, nn.Identity)
    assert block.conv_dw[0].weight is conv_weight and block.conv_dw[1].running_mean is bn_mean
    assert not any(m.training for m in ref.modules())


def test_verbose_summary(capsys):
    fastblocks.swap(timm.create_model("efficientnet_b0", pretrained=False), verbose=True)
    out = capsys.readouterr().out
    assert "replaced   16 timm.SqueezeExcite -> fastblocks.SqueezeExcite" in out
    assert "timm.InvertedResidual -> itself" in out
    assert "left as they were" in out and "torch.Linear" in out


def test_unknown_and_unsupported_modules_are_left():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 8, 3, groups=8, bias=False))
    swapped = fastblocks.swap(model)
    assert [type(m) for m in swapped] == [nn.Conv2d, nn.GELU, nn.Conv2d]
    # torchvision MBConv with GroupNorm: kept (with the reason), its Hardswish-free inside too.
    gn = tv_eff.MBConv(tv_eff.MBConvConfig(6, 3, 1, 16, 16, 1), 0.0, partial(nn.GroupNorm, 4))
    with pytest.raises(TypeError):
        fastblocks.MBConv.from_module(gn)
    swapped = fastblocks.swap(nn.Sequential(gn, nn.Hardswish()))
    assert type(swapped[0]) is tv_eff.MBConv and isinstance(swapped[1], fastblocks.nn.HardSwish)
    assert isinstance(swapped[0].block[2], SqueezeExcite)  # its squeeze-excite alone is converted


def test_swap_twice_is_a_no_op():
    once = fastblocks.swap(torchvision.models.efficientnet_b0())
    twice = fastblocks.swap(once)
    assert [type(m) for m in once.modules()] == [type(m) for m in twice.modules()]
