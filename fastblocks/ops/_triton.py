"""Imports Triton if it is usable, and says why not otherwise.

Kernels are defined at import time with ``@triton.jit`` even where Triton is missing (then the
decorator is a no-op stub and the ``triton`` backend reports ``TRITON_ERROR``).
"""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except ImportError as e:  # e.g. not Linux, or a CPU build of torch without triton
    TRITON_ERROR = f"Triton is not installed ({e})"

    class _Stub:
        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = tl = _Stub()

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable(device, dtype) -> str | None:
    """Why Triton cannot run on this device / dtype, or None."""
    import torch

    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not INTERPRET:
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
        if dtype not in (torch.float32, torch.float64):
            return f"the Triton interpreter supports float32 and float64 only, got {dtype}"
        return None
    return f"Triton needs CUDA tensors, got device {device}"


@triton.jit
def tile_offsets(n, ps, cs, C, HW, CHANNELS_LAST: tl.constexpr):
    """Flat offsets of the [pixels ps, channels cs] tile of image n in an NCHW or channels_last tensor."""
    if CHANNELS_LAST:  # element (n, c, p) at (n * HW + p) * C + c
        return (n * HW + ps[:, None]) * C + cs[None, :]
    else:  # element (n, c, p) at (n * C + c) * HW + p
        return (n * C + cs[None, :]) * HW + ps[:, None]


def grid1d(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def acc_type(t):
    """Triton accumulation dtype for tensor ``t``: float64 stays float64, everything else float32."""
    import torch

    return tl.float64 if t.dtype == torch.float64 else tl.float32
