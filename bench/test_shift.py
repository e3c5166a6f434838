"""Shift (k = 3) forward and forward+backward against the pad-and-slice reference in eager and under
torch.compile, and a ShiftResNet-56 training step (img/s) against the same model with impl="torch".

    pytest bench/test_shift.py --benchmark-only --device cpu --size quick
    pytest bench/test_shift.py --benchmark-only                  # H100: full shapes, bf16, channels_last

A shift moves every element once: forward reads x and writes y, backward reads dy and writes dx,
so copy_bw_frac is the fraction of copy bandwidth reached (the H100 target is >= 0.8).
"""
from __future__ import annotations

import functools

import pytest

from bench.harness import VARIANTS
from fastblocks import models, ops
from fastblocks.ops.shift import shift_reference

CASES = {
    "quick": [(8, 144, 28, 28), (8, 256, 16, 16)],
    "full": [(64, 144, 56, 56), (128, 256, 32, 32)],
}
MODEL_CASES = {"quick": [16], "full": [128]}  # batch of 32x32 CIFAR images


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("case", [0, 1])
def test_shift(fb_bench, variant, pass_, case):
    shape = fb_bench.case(CASES, case)
    fn = fb_bench.pick(variant, "shift", eager=shift_reference,
                       fastblocks=lambda impl: functools.partial(ops.shift, impl=impl))
    x = fb_bench.input(shape, requires_grad=pass_ != "forward")
    moved = (2 if pass_ == "forward" else 4) * x.nbytes
    fb_bench.run(fn, x, op="shift", case=shape, pass_=pass_, bytes_moved=moved)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shiftresnet56_train_step(fb_bench, variant):
    """"eager" and "compile" run the model with the pure-PyTorch shift (impl="torch")."""
    batch = fb_bench.case(MODEL_CASES, 0)
    model = fb_bench.pick(variant, "shift", whole_model=True,
                          eager=models.shiftresnet56(expansion=6, impl="torch"),
                          fastblocks=lambda impl: models.shiftresnet56(expansion=6, impl=impl))
    model = fb_bench.module(model).train()
    step, _, _ = fb_bench.train_step(model, (batch, 3, 32, 32), num_classes=10, lr=0.1)
    fb_bench.run(step, op="shiftresnet56", case=(batch, 3, 32, 32), pass_="train", items=batch)
