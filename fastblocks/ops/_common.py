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


def images_contiguous(t: Tensor) -> bool:
    """Each image's [C, H, W] block of a 4-D tensor is contiguous (NCHW, or a channel slice of an NCHW
    buffer): ``t[0].is_contiguous()`` without making the view."""
    _, C, H, W = t.shape
    return (W == 1 or t.stride(3) == 1) and (H == 1 or t.stride(2) == W) and (C == 1 or t.stride(1) == H * W)


def dense(t: Tensor) -> Tensor:
    """``t`` itself when its storage is dense (any dimension order), else a contiguous copy."""
    # the two common layouts first: the general check is Python (symbolic-shape aware) and cost
    # ~100 us a call on CPU, a third of a hard-swish over [8, 240, 28, 28]
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t if is_non_overlapping_and_dense_or_false(t) else t.contiguous()


def nchw_or_nhwc(t: Tensor) -> Tensor:
    """``t`` when it is NCHW-contiguous or channels_last, else a contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def is_channels_last(t: Tensor) -> bool:
    """True when a 4-D tensor is channels_last and not also NCHW-contiguous (C == 1 or H == W == 1)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def as_param(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype).contiguous()``, without the calls when ``t`` is that already (each tensor call
    from Python costs microseconds, a fused layer makes a dozen, and a small layer's kernels take ~10 us)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


def like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with exactly ``ref``'s strides (gradients arrive in whatever layout autograd chose)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def plain_eager(args) -> bool:
    """No torch.compile / export / FX tracing, dispatch mode or functorch transform is active, and
    every tensor argument is a plain tensor or parameter (not a subclass)."""
    if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(type(a) in (Tensor, nn.Parameter) for a in args if isinstance(a, Tensor))


class CustomOp:
    """A ``torch.library.custom_op`` that plain eager calls skip.

    The registration gives autograd, torch.compile / export / FX tracing, dispatch modes and tensor
    subclasses. A plain eager call needs none of it but pays for it: custom-op dispatch and its
    autograd wrapper cost ~100-250 us per call on CPU, as long as a kernel on a small input (enough
    to make a small model train slower than eager). So calling a ``CustomOp`` runs the Python
    implementation directly when nothing but plain tensors is involved: as it is when no gradient
    is recorded, inside a ``torch.autograd.Function`` built from the same ``setup_context`` and
    ``backward`` when one is. Everything else goes through the registered op (``.op``).
    """

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn
        self.op = torch.library.custom_op(name, fn, mutates_args=())
        self._function = None

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, *, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        def forward(ctx, *inputs):
            output = fn(*inputs)
            setup_context(ctx, inputs, output)
            return output

        node_name = self.name.split("::")[-1]  # autograd graphs and profiles say which op
        self._function = type(node_name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                                       "backward": staticmethod(backward)})

    def __call__(self, *args):
        if not plain_eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            # no autograd of our own (a backward op under create_graph): the registered op decides
            return self._function.apply(*args) if self._function is not None else self.op(*args)
        return self.fn(*args)


def custom_op(name: str):
    """Decorator: ``torch.library.custom_op(name, mutates_args=())`` as a :class:`CustomOp`."""
    return lambda fn: CustomOp(name, fn)
