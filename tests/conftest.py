"""Shared fixtures: devices, dtypes and backends, with skips that say why.

Set FASTBLOCKS_REQUIRE_BACKENDS=torch,triton,cpp (CI does) to turn "backend cannot run here" skips
into failures for those backends, so that a broken build cannot pass as skipped tests.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastblocks._backend import BACKENDS, why_not

# fp32 means fp32 in the references too: cuDNN convolutions default to TF32 (10-bit mantissa) on
# Ampere and later, which put torchvision's squeeze-excite gradients 1e-3 away from exact ones.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REQUIRED = {b for b in os.environ.get("FASTBLOCKS_REQUIRE_BACKENDS", "").split(",") if b}


def require_backend(op: str, backend: str, device="cpu", dtype=torch.float32) -> None:
    """Skip (or fail, for required backends on CPU) when ``backend`` cannot run ``op`` here."""
    device = torch.device(device)
    reason = why_not(op, backend, device, dtype)
    if reason is None:
        return
    low_precision_interpreter = backend == "triton" and dtype not in (torch.float32, torch.float64)
    if backend in REQUIRED and device.type == "cpu" and not low_precision_interpreter:
        pytest.fail(f"required backend {backend!r} cannot run {op}: {reason}")
    pytest.skip(f"{backend}: {reason}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
