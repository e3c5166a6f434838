"""hard-swish forward and forward+backward: a real MobileNetV3 shape and a 256 MB tensor."""
import functools

import pytest
import torch.nn.functional as F

from bench.harness import VARIANTS
from fastblocks import ops

CASES = {
    "quick": [(8, 240, 28, 28), (16, 64, 64, 64)],  # 16 MB fp32 stands in for the 256 MB case on CPU
    "full": [(64, 240, 28, 28), (128, 256, 64, 64)],  # the second is 256 MB in bf16
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", [0, 1])
def test_hardswish(fb_bench, variant, pass_, case):
    shape = fb_bench.case(CASES, case)
    fn = fb_bench.pick(variant, "hardswish", eager=F.hardswish,
                       fastblocks=lambda impl: functools.partial(ops.hardswish, impl=impl))
    x = fb_bench.input(shape, requires_grad=pass_ != "forward")
    # forward reads x, writes y; backward reads dy and x, writes dx
    moved = 2 * x.nbytes if pass_ == "forward" else 5 * x.nbytes
    fb_bench.run(fn, x, op="hardswish", case=shape, pass_=pass_, bytes_moved=moved)
