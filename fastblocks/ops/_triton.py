"""Imports Triton if it is usable, and says why not otherwise.

Kernels are defined at import time with ``@triton.jit`` even where Triton is missing (then the
decorator is a no-op stub and the ``triton`` backend reports ``TRITON_ERROR``).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

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


@triton.jit
def clamp(u, lo, hi):
    """min(max(u, lo), hi) with NaN kept, as PyTorch's relu / hardtanh / hardswish (PTX max / min drop it)."""
    return tl.minimum(tl.maximum(u, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def activate(u, ACT: tl.constexpr):
    """The activation of code ACT (index in fastblocks.ops.dwconv_bn_act.ACTIVATIONS, csrc/activations.h)."""
    if ACT == 1:
        u = tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        u = clamp(u, 0.0, 6.0)
    elif ACT == 3:
        u = u / (1.0 + tl.exp(-u))
    elif ACT == 4:
        u = u * clamp(u + 3.0, 0.0, 6.0) / 6.0
    return u


@triton.jit
def activate_grad(u, ACT: tl.constexpr):
    """Derivatives at the kinks as PyTorch: relu' = 0 at 0, relu6' = 1 only inside (0, 6)."""
    if ACT == 1:
        d = tl.where(u > 0.0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where((u > 0.0) & (u < 6.0), 1.0, 0.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-u))
        d = s * (1.0 + u * (1.0 - s))
    elif ACT == 4:
        d = tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, u / 3.0 + 0.5, 1.0))
    else:
        d = tl.full(u.shape, 1.0, u.dtype)
    return d


@functools.lru_cache(maxsize=None)
def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def split_work(total: int, block: int, programs: int, device) -> tuple[int, int]:
    """(parts, part size): ``total`` rows cut into parts of whole ``block``s, as many as it takes for
    ``programs`` programs per part to give about 4 programs per SM, with at least 4 blocks per part.
    Reductions write one partial row per part and torch finishes them (deterministic, no atomics)."""
    parts = max(1, min(triton.cdiv(4 * num_sms(device), max(programs, 1)), triton.cdiv(total, 4 * block)))
    size = triton.cdiv(triton.cdiv(total, parts), block) * block
    return triton.cdiv(total, size), size


def launches_on_input_device(fn):
    """Decorator for a Triton host function whose first argument is a tensor: its launches go to that
    tensor's CUDA device (and its current stream). Triton launches on the current device, which is not
    the tensors' for a model on cuda:1 without ``torch.cuda.set_device(1)``."""
    @functools.wraps(fn)
    def on_device(x, *args, **kwargs):
        with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
            return fn(x, *args, **kwargs)

    return on_device


def grid1d(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def acc_type(t):
    """Triton accumulation dtype for tensor ``t``: float64 stays float64, everything else float32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32
