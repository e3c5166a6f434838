"""Fused BatchNorm + activation (the BN + SiLU after every expand / stem / head conv of EfficientNet,
fastblocks.nn.BatchNormAct2d) against nn.BatchNorm2d -> nn.SiLU: training forward, forward+backward,
and eval."""
import pytest
from torch import nn

from bench.harness import VARIANTS, pass_wrapper
from fastblocks.nn import BatchNormAct2d

# (N, C, H, W): EfficientNet-B0 expand outputs (stage 2 and 4); quick = CPU-sized.
CASES = {
    "quick": [(8, 96, 56, 56), (8, 240, 28, 28)],
    "full": [(64, 96, 112, 112), (64, 240, 28, 28)],
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward", "eval"])
@pytest.mark.parametrize("case", [0, 1])
def test_bn_act(fb_bench, variant, pass_, case):
    shape = fb_bench.case(CASES, case)
    C = shape[1]
    ref = fb_bench.module(nn.Sequential(nn.BatchNorm2d(C), nn.SiLU())).train(pass_ != "eval")
    wrap = pass_wrapper(pass_)

    def make(impl):
        fused = fb_bench.module(BatchNormAct2d(C, activation=nn.SiLU, impl=impl)).train(pass_ != "eval")
        fused.load_state_dict(ref[0].state_dict())
        return wrap(fused)

    fn = fb_bench.pick(variant, "bn_act", eager=wrap(ref), fastblocks=make)
    x = fb_bench.input(shape, requires_grad=pass_ == "forward+backward")
    # eval reads x and writes y; training adds the statistics pass; backward reads x and dy twice
    # (sums, then dx) and writes dx
    moved = {"eval": 2 * x.nbytes, "forward": 3 * x.nbytes, "forward+backward": 8 * x.nbytes}[pass_]
    fb_bench.run(fn, x, op="bn_act", case=shape, pass_=pass_, bytes_moved=moved, items=shape[0],
                 params=list(ref.parameters()))
