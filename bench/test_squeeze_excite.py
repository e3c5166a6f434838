"""Squeeze-excite forward and forward+backward: torchvision's SqueezeExcitation (eager, compiled) vs
fastblocks.nn.SqueezeExcite with each backend, at EfficientNet-B0 and MobileNetV3-Large shapes."""
import pytest
from torch import nn
from torchvision.ops import SqueezeExcitation

from bench.harness import VARIANTS
from fastblocks.nn import SqueezeExcite

EFFICIENTNET = (nn.SiLU, nn.Sigmoid)
MOBILENET_V3 = (nn.ReLU, nn.Hardsigmoid)
# (input shape, squeeze channels, activations)
CASES = {
    "quick": [((8, 144, 28, 28), 6, EFFICIENTNET), ((8, 480, 14, 14), 120, MOBILENET_V3),
              ((32, 960, 7, 7), 240, MOBILENET_V3)],
    "full": [((64, 144, 56, 56), 6, EFFICIENTNET),    # EfficientNet-B0 stage 2
             ((64, 480, 14, 14), 120, MOBILENET_V3),  # MobileNetV3-Large, 14x14 stage
             ((256, 960, 7, 7), 240, MOBILENET_V3)],  # MobileNetV3-Large tail
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", [0, 1, 2])
def test_squeeze_excite(fb_bench, variant, pass_, case):
    shape, squeeze, (act, scale) = fb_bench.case(CASES, case)
    ref = fb_bench.module(SqueezeExcitation(shape[1], squeeze, act, scale))
    fn = fb_bench.pick(variant, "squeeze_excite", eager=ref,
                       fastblocks=lambda impl: SqueezeExcite.from_module(ref, impl=impl))
    x = fb_bench.input(shape, requires_grad=pass_ != "forward")
    # floor: forward reads x twice and writes y; backward reads x and dy and writes dx
    moved = (3 if pass_ == "forward" else 6) * x.nbytes
    fb_bench.run(fn, x, op="squeeze_excite", case=shape, pass_=pass_, bytes_moved=moved,
                 params=list(ref.parameters()) + (list(fn.parameters()) if isinstance(fn, nn.Module) else []))
