"""The one backend resolver used by every fastblocks op.

Precedence: an explicit ``impl=`` backend name > ``FASTBLOCKS_IMPL_<OP>`` > ``FASTBLOCKS_IMPL`` >
automatic choice. ``impl="auto"`` (the default everywhere) means "not pinned": the environment
variables apply, then the automatic choice.

An explicitly requested backend that cannot run raises ``BackendUnavailable`` saying why. The
automatic choice walks ``fastblocks._auto_table.AUTO_ORDER`` for the op and device and takes the first
backend that can run; when it has to skip the preferred one it warns once per op and reason.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastblocks import _ext
from fastblocks._auto_table import AUTO_ORDER, DEFAULT_AUTO_ORDER
from fastblocks.ops._triton import triton_unavailable

BACKENDS = ("torch", "triton", "cpp", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


@dataclass(frozen=True)
class OpInfo:
    name: str
    ext_kernel: str  # a kernel of fastblocks._C whose presence means the extension has this op


_OPS: dict[str, OpInfo] = {}
_warned: set[tuple[str, str]] = set()


def register_op(name: str, ext_kernel: str) -> None:
    _OPS[name] = OpInfo(name, ext_kernel)


def registered_ops() -> list[str]:
    return sorted(_OPS)


_why_not_cache: dict[tuple[str, str, torch.device, torch.dtype], str | None] = {}


def why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run ``op`` for tensors of this device and dtype, or None if it can."""
    if torch.compiler.is_compiling():  # traced once per graph; no cache state for Dynamo to guard on
        return _why_not(op, backend, device, dtype)
    key = (op, backend, device, dtype)
    if key not in _why_not_cache:  # the answer is fixed once the extension and Triton are imported
        _why_not_cache[key] = _why_not(op, backend, device, dtype)
    return _why_not_cache[key]


def _why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in FLOAT_DTYPES:
        return f"fastblocks kernels take float16, bfloat16, float32 or float64 tensors, got {dtype}"
    if backend == "torch":
        return None
    if backend == "triton":
        return triton_unavailable(device, dtype)
    if backend in ("cpp", "cuda"):
        missing = _ext.cpp_unavailable(_OPS[op].ext_kernel)
        if missing:
            return missing
        if backend == "cpp" and device.type != "cpu":
            return f"the cpp backend runs CPU tensors; got a {device.type} tensor (use impl='cuda')"
        if backend == "cuda":
            if device.type != "cuda":
                return f"the cuda backend runs CUDA tensors; got a {device.type} tensor (use impl='cpp')"
            return _ext.why_no_cuda_kernels()
        return None
    raise ValueError(f"unknown backend {backend!r}")


def requested_impl(op: str, impl: str | None) -> str:
    """The backend asked for, after applying the environment variables; may be 'auto'."""
    if impl not in (None, "auto"):
        choice, source = impl, "impl="
    else:
        env_op = f"FASTBLOCKS_IMPL_{op.upper()}"
        choice, source = os.environ.get(env_op), env_op
        if not choice:
            choice, source = os.environ.get("FASTBLOCKS_IMPL", "auto"), "FASTBLOCKS_IMPL"
    if choice != "auto" and choice not in BACKENDS:
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {choice!r}")
    return choice


def resolve(op: str, impl: str | None, x: torch.Tensor,
            unsupported: Callable[[str], str | None] | None = None, prefer_kernels: bool = False) -> str:
    """Pick the backend that runs ``op`` on tensors like ``x``.

    ``unsupported(backend)`` may add op-specific reasons (kernel size, stride, ...). ``prefer_kernels``:
    ``auto`` ranks ``torch`` last, for call sites where ``torch`` means the op's pure-PyTorch formulas;
    AUTO_ORDER ranks it by the benchmarks' eager layers, which is what the modules run for ``torch``.
    """
    def reason(backend: str) -> str | None:
        # "is not None", not the function's truth value: Dynamo of torch 2.11 cannot branch on that.
        return why_not(op, backend, x.device, x.dtype) or (unsupported(backend) if unsupported is not None else None)

    choice = requested_impl(op, impl)
    if choice != "auto":
        why = reason(choice)
        if why is not None:
            raise BackendUnavailable(f"fastblocks.ops.{op}: impl={choice!r} cannot run: {why}")
        return choice
    order = auto_order(op, x.device.type)
    if prefer_kernels:
        order = tuple(b for b in order if b != "torch") + ("torch",)
    for backend in order:
        why = reason(backend)
        if why is None:
            return backend
        # A missing extension was already announced once at import; other reasons warn once per op.
        if (backend == order[0] and why != _ext.LOAD_ERROR and not torch.compiler.is_compiling()
                and (op, why) not in _warned):
            _warned.add((op, why))
            warnings.warn(f"fastblocks.ops.{op}: auto cannot use {backend!r} ({why}); falling back",
                          RuntimeWarning, stacklevel=3)
    raise BackendUnavailable(f"fastblocks.ops.{op}: no backend can run {x.dtype} tensors on {x.device}: "
                             + "; ".join(f"{b}: {reason(b)}" for b in order))


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    order = AUTO_ORDER.get((op, device_type)) or DEFAULT_AUTO_ORDER.get(device_type, ("torch",))
    return order if "torch" in order else order + ("torch",)


def backends(verbose: bool = True) -> dict[str, dict[str, dict[str, str | None]]]:
    """Which backend can run each op, per device, and why the others cannot.

    Returns ``{op: {device: {backend: None or reason}}}`` and prints it when ``verbose``.
    """
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    report = {
        op: {str(d): {b: why_not(op, b, d, torch.float32) for b in BACKENDS} for d in devices}
        for op in registered_ops()
    }
    no_gpu = "no CUDA device is visible"
    if not torch.cuda.is_available():
        for op in report:
            report[op]["cuda"] = {b: no_gpu for b in BACKENDS}
    if verbose:
        for op, per_device in report.items():
            print(op)
            for dev, per_backend in per_device.items():
                if all(why == no_gpu for why in per_backend.values()):
                    print(f"  {dev:5s} {no_gpu}")
                    continue
                auto = next((b for b in auto_order(op, torch.device(dev).type) if per_backend[b] is None), None)
                print(f"  {dev:5s} auto -> {auto}")
                for b, why in per_backend.items():
                    print(f"    {b:7s} {'ok' if why is None else 'no: ' + why}")
    return report
