"""Fused depthwise conv + BatchNorm + SiLU (the MBConv depthwise stage) against torchvision's
Conv2dNormActivation: training forward, forward+backward and eval (inference, no_grad)."""
import pytest
from torch import nn
from torchvision.ops import Conv2dNormActivation

from bench.harness import VARIANTS, pass_wrapper
from fastblocks.nn import DWConvBNAct

# (N, C, H, W, kernel, stride): EfficientNet-B0 / MobileNetV2 depthwise layers (issue 4). quick: the same
# layers at batch 8, the batch of the CPU model benchmarks (smaller ones measure per-call overhead only).
CASES = {
    "quick": [(8, 144, 56, 56, 3, 1), (8, 240, 28, 28, 5, 1), (8, 96, 112, 112, 3, 2)],
    "full": [(64, 144, 56, 56, 3, 1), (64, 240, 28, 28, 5, 1), (64, 96, 112, 112, 3, 2)],
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward", "eval"])
@pytest.mark.parametrize("case", range(3))
def test_dwconv_bn_act(fb_bench, variant, pass_, case):
    N, C, H, W, k, s = fb_bench.case(CASES, case)
    ref = fb_bench.module(Conv2dNormActivation(C, C, k, s, groups=C, activation_layer=nn.SiLU))
    ref.train(pass_ != "eval")
    wrap = pass_wrapper(pass_)
    fused = {}

    def make(impl):
        fused["module"] = DWConvBNAct.from_module(ref, impl=impl)
        return wrap(fused["module"])

    fn = fb_bench.pick(variant, "dwconv_bn_act", eager=wrap(ref), fastblocks=make)
    x = fb_bench.input((N, C, H, W), requires_grad=pass_ == "forward+backward")
    y_bytes = x.nbytes // (s * s)
    # Compulsory traffic of the fused GPU kernels: eval reads x and writes y; the training forward
    # reads x twice (statistics, then output) and writes y; backward reads dy and x twice, writes
    # and reads dz, and writes dx.
    moved = {"eval": x.nbytes + y_bytes,
             "forward": 2 * x.nbytes + y_bytes,
             "forward+backward": 5 * x.nbytes + 5 * y_bytes}[pass_]
    fb_bench.run(fn, x, op="dwconv_bn_act", case=(N, C, H, W, f"k{k}", f"s{s}"), pass_=pass_, bytes_moved=moved,
                 items=N, params=list(fused.get("module", ref).parameters()))
