"""CPU inference through one oneDNN convolution (BN folded in, activation as a post-op): the same
outputs as torchvision's modules, used exactly when nothing records a gradient in plain eager mode."""
import pytest
import torch
from torch import nn
from torchvision.models.squeezenet import Fire as TVFire
from torchvision.ops import Conv2dNormActivation

from fastblocks.nn.blocks import ConvNormAct, Fire
from fastblocks.ops import onednn

pytestmark = pytest.mark.skipif(onednn._onednn_op() is None, reason="this torch build has no oneDNN fused conv")

ACTIVATIONS = [None, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the oneDNN calls made (with the backend choice left to auto)."""
    for var in ("FASTBLOCKS_IMPL", "FASTBLOCKS_IMPL_BN_ACT"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    op = onednn._onednn_op()

    def counted(*args):
        calls.append(args[0].shape)
        return op(*args)

    monkeypatch.setattr(onednn, "_onednn_op", lambda: counted)
    return calls


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
    return module


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel_size, stride, groups", [(1, 1, 1), (3, 2, 1), (3, 1, 4)])
def test_conv_norm_act_inference_is_one_onednn_call(onednn_calls, activation, layout, kernel_size, stride, groups):
    torch.manual_seed(0)
    ref = _randomise_bn(Conv2dNormActivation(8, 12, kernel_size, stride, groups=groups, activation_layer=activation))
    fb = ConvNormAct.from_module(ref).eval()
    ref.eval()
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=layout)
    with torch.no_grad():
        y = fb(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=layout)
    nchw_1x1 = kernel_size == 1 and layout == torch.contiguous_format  # conv1x1's batched GEMM is faster
    assert onednn_calls == ([] if nchw_1x1 else [x.shape])


def test_folds_a_conv_bias_and_a_norm_without_affine(onednn_calls):
    torch.manual_seed(0)
    ref = _randomise_bn(nn.Sequential(nn.Conv2d(6, 10, 3, padding=1, bias=True), nn.BatchNorm2d(10, affine=False),
                                      nn.ReLU6())).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ConvNormAct.from_module(ref)(x), ref(x), rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == 1


def test_fire_inference_is_three_onednn_calls(onednn_calls):
    torch.manual_seed(0)
    ref = TVFire(16, 4, 8, 8).eval()
    x = torch.randn(2, 16, 11, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(Fire.from_module(ref)(x), ref(x), rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == 3


def test_unfused_wherever_a_gradient_or_other_path_is_needed(onednn_calls):
    torch.manual_seed(0)
    ref = _randomise_bn(Conv2dNormActivation(8, 8, 1, activation_layer=nn.SiLU)).eval()
    fb = ConvNormAct.from_module(ref)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    y = fb(x)  # eval mode but a gradient is recorded: the differentiable path
    y.sum().backward()
    ref_x = x.detach().requires_grad_()
    ref(ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    with torch.no_grad():
        fb.train()(x)  # batch statistics
        fb.eval()
        fb.double()(x.double())  # float64 (gradcheck's dtype)
        fb.float()
        ConvNormAct.from_module(ref, impl="torch")(x)  # the pinned reference backend
        ConvNormAct.from_module(_randomise_bn(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.GELU())).eval())(x)
    assert onednn_calls == []


def test_unfused_when_onednn_is_unavailable(monkeypatch):
    torch.manual_seed(0)
    ref = _randomise_bn(Conv2dNormActivation(8, 8, 3, activation_layer=nn.Hardswish)).eval()
    monkeypatch.setattr(onednn, "_onednn_op", lambda: None)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(ConvNormAct.from_module(ref)(x), ref(x), rtol=1e-5, atol=1e-5)


def test_compiled_inference_takes_the_traceable_path(onednn_calls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = _randomise_bn(Conv2dNormActivation(8, 8, 1, activation_layer=nn.ReLU)).eval()
    fb = torch.compile(ConvNormAct.from_module(ref), fullgraph=True, backend="eager")
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fb(x), ref(x), rtol=1e-5, atol=1e-5)
    assert onednn_calls == []
