"""MBConv, FusedMBConv, InvertedResidual and Fire against the torchvision blocks they replace.

Same weights -> same outputs, input and parameter gradients and running statistics, in train and
eval mode, for every backend of the fused ops they use. Also: both constructors, from_module, use
inside torchvision's own model classes, the unfused fallback, bad arguments, torch.compile.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.models import efficientnet as tv_eff  # noqa: E402
from torchvision.models import mobilenetv2 as tv_mb2  # noqa: E402
from torchvision.models import mobilenetv3 as tv_mb3  # noqa: E402
from torchvision.models import squeezenet as tv_sq  # noqa: E402

import fastblocks  # noqa: E402
from fastblocks.nn.dwconv import DWConvBNAct  # noqa: E402
from fastblocks.nn.squeeze_excite import SqueezeExcite  # noqa: E402
from fastblocks.nn.blocks import ConvNormAct, Fire, FusedMBConv, InvertedResidual, MBConv  # noqa: E402
from tests.conftest import require_backend  # noqa: E402

# The fused ops a block runs; a backend must be able to run all of them.
OPS = ("dwconv_bn_act", "squeeze_excite", "hardswish", "bn_act")
# Backends for CPU tensors that are fast enough for every case; Triton (interpreted) gets one small case.
CPU_IMPLS = ["torch", "cpp"]
# Per-tensor check ||fb - ref|| <= RTOL * ||ref|| + ATOL * (largest ||ref|| of the group): gradients that are
# zero in exact arithmetic (a bias followed by a training-mode BatchNorm) are rounding noise of the others.
TOL = {torch.float64: (1e-7, 1e-10), torch.float32: (1e-3, 1e-5)}


def require_ops(backend: str, dtype=torch.float32) -> None:
    for op in OPS:
        require_backend(op, backend, "cpu", dtype)


def assert_all_close(pairs, dtype, what: str) -> None:
    """``pairs``: (name, fastblocks tensor, reference tensor) compared as in ``TOL``."""
    rtol, atol = TOL[dtype]
    pairs = list(pairs)
    scale = max(ref.double().norm().item() for _, _, ref in pairs)
    for name, fb, ref in pairs:
        assert fb.shape == ref.shape, f"{what} {name}: shape {tuple(fb.shape)} != {tuple(ref.shape)}"
        err = (fb.double() - ref.double()).norm().item()
        bound = rtol * ref.double().norm().item() + atol * scale
        assert err <= bound, f"{what} {name}: error {err:.3g} > {bound:.3g} (|ref| {ref.double().norm().item():.3g})"


def _step(m: nn.Module, x: torch.Tensor, train: bool, seed: int, dy: torch.Tensor | None = None):
    """One forward + backward of ``m`` with the random stream at ``seed``: [[("output", y)],
    [("input", x.grad)], [(name, param.grad) ...], [(name, buffer) ...]] and the output gradient used
    (``dy``, or a random one drawn after the forward)."""
    m.train(train)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = m(x)
    dy = torch.randn_like(y) if dy is None else dy.to(y.dtype)
    y.backward(dy)
    groups = [[("output", y.detach())], [("input", x.grad)], [(n, p.grad) for n, p in m.named_parameters()],
              list(m.named_buffers())]
    return groups, dy


def assert_same_step(ref: nn.Module, fb: nn.Module, x: torch.Tensor, train: bool, seed: int = 0) -> None:
    """One forward + backward with the same input, random stream and output gradient: the same output,
    input gradient, parameter gradients (matched in order) and, afterwards, buffers."""
    ref_groups, dy = _step(ref, x, train, seed)
    fb_groups, _ = _step(fb, x, train, seed, dy)
    for what, r, f in zip(("output", "grad", "grad", "buffer"), ref_groups, fb_groups):
        assert len(r) == len(f)
        if r:
            assert_all_close([(n, ft, rt) for (n, rt), (_, ft) in zip(r, f)], x.dtype, what)


def _randomize_bn(module: nn.Module) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (eval mode must use them)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def _pair(ref: nn.Module, fb: nn.Module, dtype=torch.float64):
    """(ref, fb) in ``dtype`` with fb carrying ref's weights (loaded by state_dict keys)."""
    _randomize_bn(ref)
    fb.load_state_dict(ref.state_dict())
    return ref.to(dtype), fb.to(dtype)


def _bn(eps=1e-5, momentum=0.1):
    return partial(nn.BatchNorm2d, eps=eps, momentum=momentum)


# (id, torchvision block factory, fastblocks block factory, input channels); impl is passed to fastblocks.
def _v3(*cnf):
    return tv_mb3.InvertedResidualConfig(*cnf, width_mult=1.0)


CASES = {
    "mbconv_residual": (lambda: tv_eff.MBConv(tv_eff.MBConvConfig(4, 3, 1, 8, 8, 1), 0.25, _bn(1e-3, 0.01)),
                        lambda impl: MBConv(tv_eff.MBConvConfig(4, 3, 1, 8, 8, 1), 0.25, _bn(1e-3, 0.01), impl=impl),
                        8),
    "mbconv_no_expand_k5_s2": (lambda: tv_eff.MBConv(tv_eff.MBConvConfig(1, 5, 2, 16, 24, 1), 0.0, _bn()),
                               lambda impl: MBConv(tv_eff.MBConvConfig(1, 5, 2, 16, 24, 1), 0.0, _bn(), impl=impl),
                               16),
    "fused_mbconv_expand": (lambda: tv_eff.FusedMBConv(tv_eff.FusedMBConvConfig(4, 3, 1, 8, 8, 1), 0.25, _bn(1e-3)),
                            lambda impl: FusedMBConv(tv_eff.FusedMBConvConfig(4, 3, 1, 8, 8, 1), 0.25, _bn(1e-3),
                                                     impl=impl),
                            8),
    "fused_mbconv_plain_s2": (lambda: tv_eff.FusedMBConv(tv_eff.FusedMBConvConfig(1, 3, 2, 8, 16, 1), 0.0, _bn()),
                              lambda impl: FusedMBConv(tv_eff.FusedMBConvConfig(1, 3, 2, 8, 16, 1), 0.0, _bn(),
                                                       impl=impl),
                              8),
    "v2_residual": (lambda: tv_mb2.InvertedResidual(8, 8, 1, 6),
                    lambda impl: InvertedResidual(8, 8, 1, 6, impl=impl), 8),
    "v2_no_expand_s2": (lambda: tv_mb2.InvertedResidual(16, 8, 2, 1),
                        lambda impl: InvertedResidual(16, 8, 2, 1, impl=impl), 16),
    "v3_se_hardswish": (lambda: tv_mb3.InvertedResidual(_v3(8, 5, 24, 8, True, "HS", 1, 1), _bn(1e-3, 0.01)),
                        lambda impl: InvertedResidual(_v3(8, 5, 24, 8, True, "HS", 1, 1), _bn(1e-3, 0.01), impl=impl),
                        8),
    "v3_relu_s2": (lambda: tv_mb3.InvertedResidual(_v3(8, 3, 24, 16, False, "RE", 2, 1), _bn()),
                   lambda impl: InvertedResidual(_v3(8, 3, 24, 16, False, "RE", 2, 1), _bn(), impl=impl), 8),
    "v3_se_no_expand_dilated": (lambda: tv_mb3.InvertedResidual(_v3(16, 3, 16, 16, True, "RE", 2, 2), _bn()),
                                lambda impl: InvertedResidual(_v3(16, 3, 16, 16, True, "RE", 2, 2), _bn(), impl=impl),
                                16),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_block_matches_torchvision(impl, case, layout):
    """float64, odd spatial size: a training step (running statistics updated alike), then eval mode."""
    require_ops(impl, torch.float64)
    make_ref, make_fb, channels = CASES[case]
    ref, fb = _pair(make_ref(), make_fb(impl))
    x = torch.randn(2, channels, 7, 9, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same_step(ref, fb, x, train=True)
    assert_same_step(ref, fb, x, train=False)


@pytest.mark.parametrize("case", ["mbconv_residual", "v3_se_hardswish", "v2_residual"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_block_float32(impl, case):
    require_ops(impl)
    make_ref, make_fb, channels = CASES[case]
    ref, fb = _pair(make_ref(), make_fb(impl), torch.float32)
    x = torch.randn(2, channels, 8, 8)
    assert_same_step(ref, fb, x, train=True)
    assert_same_step(ref, fb, x, train=False)


def test_block_triton():
    """Triton, interpreted on CPU (slow: one narrow MobileNetV3 block with SE and hard-swish, tiny input)."""
    require_ops("triton", torch.float64)
    cnf = _v3(8, 3, 16, 8, True, "HS", 1, 1)
    ref, fb = _pair(tv_mb3.InvertedResidual(cnf, _bn()), InvertedResidual(cnf, _bn(), impl="triton"))
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    assert_same_step(ref, fb, x, train=True)
    assert_same_step(ref, fb, x.contiguous(memory_format=torch.channels_last), train=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("case", ["mbconv_residual", "v3_se_hardswish", "v2_residual"])
def test_block_cuda(case, impl):
    for op in OPS:
        require_backend(op, impl, "cuda")
    make_ref, make_fb, channels = CASES[case]
    ref, fb = _pair(make_ref(), make_fb(impl), torch.float32)
    ref, fb = ref.cuda(), fb.cuda()
    x = torch.randn(4, channels, 17, 15, device="cuda").contiguous(memory_format=torch.channels_last)
    assert_same_step(ref, fb, x, train=True)
    assert_same_step(ref, fb, x, train=False)


def test_fire_matches_torchvision():
    ref, fb = _pair(tv_sq.Fire(12, 6, 8, 10), Fire(12, 6, 8, 10))
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64)
    assert_same_step(ref, fb, x, train=True)
    assert_same_step(ref, fb, x.contiguous(memory_format=torch.channels_last), train=False)


def test_blocks_use_fused_modules():
    mb = MBConv(in_channels=16, out_channels=16, expand_ratio=4)
    assert [type(m) for m in mb.block] == [ConvNormAct, DWConvBNAct, SqueezeExcite, ConvNormAct]
    v3 = InvertedResidual(_v3(16, 5, 40, 24, True, "HS", 2, 1), _bn())
    assert isinstance(v3.block[1], DWConvBNAct) and v3.block[1].activation == "hardswish"
    assert isinstance(v3.block[0][2], fastblocks.nn.HardSwish)
    se = v3.block[2]
    assert se.fc1.out_channels == 16  # make_divisible(40 // 4, 8): 8 would lose more than 10% of 10
    v2 = InvertedResidual(8, 16, 2, 6)
    assert isinstance(v2.conv[1], DWConvBNAct) and v2.conv[1].activation == "relu6"


def test_keyword_constructor_matches_config_form():
    cnf = tv_eff.MBConvConfig(6, 5, 2, 24, 40, 1)
    by_config = MBConv(cnf, 0.1, _bn(1e-3, 0.01))
    by_keyword = MBConv(in_channels=24, out_channels=40, kernel_size=5, stride=2, expand_ratio=6,
                        stochastic_depth_prob=0.1, norm_eps=1e-3, norm_momentum=0.01)
    tv_block = tv_eff.MBConv(cnf, 0.1, _bn(1e-3, 0.01))
    for sd in (by_config.state_dict(), by_keyword.state_dict()):
        assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in tv_block.state_dict().items()}
    assert by_keyword.block[1][1].eps == 1e-3 and by_keyword.block[1][1].momentum == 0.01
    assert not by_keyword.use_res_connect and by_keyword.stochastic_depth_prob == 0.1
    no_se = MBConv(in_channels=8, out_channels=8, expand_ratio=1, se_ratio=0)
    assert not any(isinstance(m, SqueezeExcite) for m in no_se.modules()) and no_se.use_res_connect
    fused = FusedMBConv(in_channels=24, out_channels=48, kernel_size=3, stride=2, expand_ratio=4)
    tv_fused = tv_eff.FusedMBConv(tv_eff.FusedMBConvConfig(4, 3, 2, 24, 48, 1), 0.0, nn.BatchNorm2d)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == \
        [(k, v.shape) for k, v in tv_fused.state_dict().items()]


@pytest.mark.parametrize("case", list(CASES))
def test_from_module_shares_tensors(case):
    make_ref, _, channels = CASES[case]
    ref = make_ref()
    _randomize_bn(ref)
    ref.eval()
    cls = {"mbconv": MBConv, "fused": FusedMBConv}.get(case.split("_")[0], InvertedResidual)
    fb = cls.from_module(ref, impl="torch")
    assert type(fb) is cls and not fb.training
    ref_tensors = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    for name, t in [*fb.named_parameters(), *fb.named_buffers()]:
        assert t is ref_tensors[name], name
    x = torch.randn(2, channels, 9, 11)
    torch.testing.assert_close(fb(x), ref(x), rtol=1e-4, atol=1e-5)


def test_fire_from_module_shares_tensors():
    ref = tv_sq.Fire(8, 4, 6, 6)
    fb = Fire.from_module(ref)
    assert fb.expand3x3.weight is ref.expand3x3.weight
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(fb(x), ref(x))


def test_from_module_rejects_other_norms():
    ref = tv_eff.MBConv(tv_eff.MBConvConfig(6, 3, 1, 16, 16, 1), 0.0, partial(nn.GroupNorm, 4))
    with pytest.raises(TypeError, match="BatchNorm"):
        MBConv.from_module(ref)


def test_other_norm_layer_runs_unfused():
    """A norm_layer that is not BatchNorm2d keeps the depthwise stage unfused and still matches torchvision."""
    norm = partial(nn.GroupNorm, 4)
    ref = tv_eff.MBConv(tv_eff.MBConvConfig(6, 3, 1, 8, 8, 1), 0.0, norm)
    fb = MBConv(tv_eff.MBConvConfig(6, 3, 1, 8, 8, 1), 0.0, norm)
    assert not any(isinstance(m, DWConvBNAct) for m in fb.modules())
    fb.load_state_dict(ref.state_dict())
    assert_same_step(ref.double(), fb.double(), torch.randn(2, 8, 6, 6, dtype=torch.float64), train=True)


def test_blocks_build_torchvision_models():
    """fastblocks blocks passed to torchvision's own model classes (block=...) build working models."""
    def settings(block):
        cnf = partial(tv_eff.MBConvConfig, width_mult=0.5, depth_mult=0.5, block=block)
        return [cnf(1, 3, 1, 32, 16, 1), cnf(6, 3, 2, 16, 24, 2), cnf(6, 5, 2, 24, 40, 2)]

    fb_model = tv_eff.EfficientNet(settings(MBConv), dropout=0.0, num_classes=10)
    assert sum(isinstance(m, MBConv) for m in fb_model.modules()) == 3
    ref, fb_model = _pair(tv_eff.EfficientNet(settings(None), dropout=0.0, num_classes=10), fb_model)
    assert_same_step(ref, fb_model, torch.randn(2, 3, 32, 32, dtype=torch.float64), train=True)

    v2 = torchvision.models.MobileNetV2(width_mult=0.25, block=InvertedResidual, num_classes=10)
    v3_setting, last = tv_mb3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.5)
    v3 = tv_mb3.MobileNetV3(v3_setting, last, block=InvertedResidual, num_classes=10)
    for model in (v2, v3):
        assert any(isinstance(m, InvertedResidual) for m in model.modules())
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_stochastic_depth_drops_rows_like_torchvision():
    make_ref, make_fb, _ = CASES["mbconv_residual"]
    ref, fb = _pair(make_ref(), make_fb("torch"))
    ref.stochastic_depth.p = fb.stochastic_depth_prob = 0.5
    x = torch.randn(16, 8, 4, 4, dtype=torch.float64)
    assert_same_step(ref, fb, x, train=True, seed=3)


def test_bad_arguments():
    with pytest.raises(TypeError, match="in_channels"):
        MBConv()
    with pytest.raises(TypeError, match="not both"):
        MBConv(tv_eff.MBConvConfig(6, 3, 1, 16, 16, 1), 0.0, nn.BatchNorm2d, in_channels=16, out_channels=16)
    with pytest.raises(ValueError, match="stride"):
        MBConv(in_channels=8, out_channels=8, stride=3)
    with pytest.raises(ValueError, match="stride"):
        InvertedResidual(8, 8, 3, 6)
    with pytest.raises(TypeError, match="in_channels"):
        FusedMBConv(out_channels=8)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])  # channels_last: 1x1 convs as GEMMs
@pytest.mark.parametrize("case", ["mbconv_residual", "v3_se_hardswish"])
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_compile_fullgraph(case, impl, layout):
    require_ops(impl)
    torch._dynamo.reset()  # each case compiles the same forward code again: stay under dynamo's recompile limit
    make_ref, make_fb, channels = CASES[case]
    fb = make_fb(impl)
    _randomize_bn(fb)
    x = torch.randn(2, channels, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for train in (True, False):
        fb.train(train)
        torch.manual_seed(0)
        expected = fb(x)
        compiled = torch.compile(fb, fullgraph=True, backend="aot_eager")
        torch.manual_seed(0)
        torch.testing.assert_close(compiled(x), expected)
