"""Input checks and layout helpers shared by the op files."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.utils._python_dispatch import _get_current_dispatch_mode


def check_tensor(t, name: str, ndim: int | None = None) -> None:
    """Clear errors for the argument ``name`` instead of failures inside a kernel."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        shape = "[N, C, H, W]" if ndim == 4 else f"{ndim}-D"
        raise ValueError(f"{name} must be {shape}, got shape {tuple(t.shape)}")


def check_same(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def dense(t: Tensor) -> Tensor:
    """``t`` itself when its storage is dense (any dimension order), else a contiguous copy."""
    return t if is_non_overlapping_and_dense_or_false(t) else t.contiguous()


def nchw_or_nhwc(t: Tensor) -> Tensor:
    """``t`` when it is NCHW-contiguous or channels_last, else a contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def is_channels_last(t: Tensor) -> bool:
    """True when a 4-D tensor is channels_last and not also NCHW-contiguous (C == 1 or H == W == 1)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with exactly ``ref``'s strides (gradients arrive in whatever layout autograd chose)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def direct_call_ok(*tensors: Tensor) -> bool:
    """Whether an op's Python implementation may run directly instead of through its registered op.

    The registration (``torch.library.custom_op``) adds autograd, torch.compile / FX tracing and
    tensor-subclass handling. With no gradient to record, nothing tracing and plain tensors it is
    dispatch overhead only (~30 us a call on CPU, as long as the kernel for small inputs), so
    inference skips it.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) in (Tensor, nn.Parameter) and not (grad and t.requires_grad) for t in tensors)
