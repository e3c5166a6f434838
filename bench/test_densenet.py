"""DenseNet-121 training step: torchvision plain, torchvision memory_efficient=True (checkpointing),
torch.compile of torchvision plain, and fastblocks' memory-efficient DenseNet per backend.

Records img/s, peak memory (CUDA), and the bytes one forward keeps for backward (any device; unique
storages, so the block buffer counts once; parameters excluded). On a GPU, also the largest batch
whose training step fits a fixed memory budget, per variant.

    pytest bench/test_densenet.py --benchmark-only --device cpu --size quick
    pytest bench/test_densenet.py --benchmark-only                  # H100: bs 64 @ 224, bf16, channels_last
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from bench.harness import VARIANTS
from fastblocks import models
from fastblocks.models.densenet import saved_bytes

CASES = {"quick": [(4, 64)], "full": [(64, 224)]}  # (batch, resolution)
CHECKPOINT = "eager-memory_efficient"  # torchvision's memory_efficient=True
BUDGET_BYTES = 4 << 30  # for the largest-batch search (the target peak is 2 GiB at bs 64)


def _model(fb_bench, variant: str) -> torch.nn.Module:
    if variant == CHECKPOINT:
        model = fb_bench.pick("eager", "bn_act", eager=torchvision.models.densenet121(memory_efficient=True),
                              fastblocks=None)
        fb_bench.variant = CHECKPOINT
    else:
        model = fb_bench.pick(variant, "bn_act", whole_model=True, eager=torchvision.models.densenet121(),
                              fastblocks=lambda impl: models.densenet121(impl=impl))
    return fb_bench.module(model)


@pytest.mark.parametrize("variant", VARIANTS + [CHECKPOINT])
@pytest.mark.parametrize("case", [0])
def test_densenet121_train_step(fb_bench, variant, case):
    batch, resolution = fb_bench.case(CASES, case)
    model = _model(fb_bench, variant).train()
    step, x, params = fb_bench.train_step(model, (batch, 3, resolution, resolution))
    def kept_for_backward():  # compiled graphs keep their own saved tensors
        return {} if variant == "compile" else {"saved_bytes": saved_bytes(lambda: model(x), tuple(params))[0]}

    fb_bench.run(step, op="densenet121", case=(batch, 3, resolution, resolution), pass_="train", items=batch,
                 after=kept_for_backward)


def _fits(model, batch: int, resolution: int, fb_bench) -> bool:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step, _, _ = fb_bench.train_step(model, (batch, 3, resolution, resolution))
        step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() <= BUDGET_BYTES


@pytest.mark.parametrize("variant", VARIANTS + [CHECKPOINT])
def test_densenet121_largest_batch_in_budget(fb_bench, variant):
    if fb_bench.device.type != "cuda":
        pytest.skip("peak memory is measured on CUDA only")
    _, resolution = fb_bench.case(CASES, 0)
    model = _model(fb_bench, variant).train()
    lo, hi = 0, 8  # largest batch known to fit, first batch to try
    while _fits(model, hi, resolution, fb_bench):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(model, mid, resolution, fb_bench) else (lo, mid)
    if lo == 0:
        pytest.skip(f"no batch fits in {BUDGET_BYTES / 2**30:.1f} GiB")
    step, _, _ = fb_bench.train_step(model, (lo, 3, resolution, resolution))
    fb_bench.run(step, op="densenet121-max-batch", case=(lo, 3, resolution, resolution), pass_="train", items=lo,
                 extra={"max_batch": lo, "budget_bytes": BUDGET_BYTES})
