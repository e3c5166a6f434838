"""Whole models: torchvision eager, torch.compile of it, and the fastblocks model per backend.

Per family: a training step (SGD, cross-entropy; img/s, peak memory on CUDA, and the bytes one
forward keeps for backward, parameters excluded) and eval inference under no_grad (img/s). Models
and inputs are in the bench dtype and layout (bf16 + channels_last on CUDA by default).

    pytest bench/test_models.py --benchmark-only --device cpu --size quick
    pytest bench/test_models.py --benchmark-only               # H100: B0 train bs 128, inference bs 256 @ 224

Issue goals (H100): B0 train >= 1.5x eager with peak <= 3.5 GiB and saved bytes <= 0.6x torchvision,
inference >= 1.3x eager and ahead of compile; MobileNetV3-Large train >= 1.4x eager; SqueezeNet 1.1
>= 1.2x eager. CPU: B0 and MobileNetV3-Large inference at bs 8 @ 224 not slower than eager.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from bench.harness import VARIANTS
from fastblocks import models
from fastblocks.models.densenet import saved_bytes

# family -> fused op used for the backend check (None: no fastblocks kernels, one fastblocks run)
FAMILIES = {"efficientnet_b0": "dwconv_bn_act", "mobilenet_v3_large": "dwconv_bn_act",
            "mobilenet_v2": "dwconv_bn_act", "squeezenet1_1": None}
TRAIN = {"quick": [(4, 96)], "full": [(128, 224)]}  # (batch, resolution)
INFER = {"quick": [(8, 224)], "full": [(256, 224)]}


# Each backend forced, and impl="auto": what a user gets by default (per op, the backend
# fastblocks/_auto_table.py ranks first).
MODEL_VARIANTS = VARIANTS + ["fastblocks-auto"]


def _model(fb_bench, variant: str, name: str) -> torch.nn.Module:
    op = FAMILIES[name]
    if variant == "fastblocks-auto":
        if op is None:
            pytest.skip(f"{name} has no fused kernels: one fastblocks run")
        fb_bench.variant = variant
        return fb_bench.module(getattr(models, name)(impl="auto"))
    if op is None and variant.startswith("fastblocks-"):
        if variant != ("fastblocks-cuda" if fb_bench.device.type == "cuda" else "fastblocks-cpp"):
            pytest.skip(f"{name} has no fused kernels: one fastblocks run")
        fb_bench.variant = "fastblocks"
        return fb_bench.module(getattr(models, name)())
    model = fb_bench.pick(variant, op or "hardswish", whole_model=True, eager=getattr(torchvision.models, name)(),
                          fastblocks=lambda impl: getattr(models, name)(impl=impl))
    return fb_bench.module(model)


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_train_step(fb_bench, name, variant):
    batch, resolution = fb_bench.case(TRAIN, 0)
    model = _model(fb_bench, variant, name).train()
    step, x, params = fb_bench.train_step(model, (batch, 3, resolution, resolution))
    def kept_for_backward():  # a compiled graph keeps its own saved tensors
        return {} if variant == "compile" else {"saved_bytes": saved_bytes(lambda: model(x), tuple(params))[0]}

    fb_bench.run(step, op=f"{name}-train", case=(batch, 3, resolution, resolution), pass_="train", items=batch,
                 after=kept_for_backward)


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_inference(fb_bench, name, variant):
    batch, resolution = fb_bench.case(INFER, 0)
    model = _model(fb_bench, variant, name).eval()
    x = fb_bench.input((batch, 3, resolution, resolution))

    @torch.no_grad()
    def infer():
        return model(x)

    fb_bench.run(infer, op=f"{name}-inference", case=(batch, 3, resolution, resolution), items=batch)
