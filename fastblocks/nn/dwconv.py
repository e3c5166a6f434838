"""Depthwise conv + BatchNorm + activation as one fused op: drop-in for torchvision's
``Conv2dNormActivation(C, C, k, groups=C)`` (same children, hence the same state_dict keys)."""
from __future__ import annotations

from torch import Tensor, nn

from fastblocks.nn._batchnorm import update_running_stats, uses_batch_stats
from fastblocks.ops.dwconv_bn_act import _dwconv_bn_act

# Activation modules the fused kernels implement, by name. Order matters for isinstance:
# fastblocks.nn.HardSwish subclasses nn.Hardswish; ReLU6 subclasses Hardtanh, not ReLU.
_ACTIVATION_MODULES = {"silu": nn.SiLU, "hardswish": nn.Hardswish, "relu6": nn.ReLU6, "relu": nn.ReLU}


def _activation(activation) -> tuple[nn.Module | None, str]:
    """(module to hold, kernel name) for a class, an instance, a name or None."""
    if activation is None or isinstance(activation, nn.Identity) or activation is nn.Identity:
        return None, "none"
    if isinstance(activation, str):
        name = activation.lower()
        if name == "none":
            return None, "none"
        if name not in _ACTIVATION_MODULES:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATION_MODULES)} or None, got {activation!r}")
        return _ACTIVATION_MODULES[name](), name
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        activation = activation()
    for name, cls in _ACTIVATION_MODULES.items():
        if isinstance(activation, cls):
            return activation, name
    raise ValueError(f"DWConvBNAct fuses SiLU, Hardswish, ReLU, ReLU6 or no activation; got {activation!r}")


class DWConvBNAct(nn.Sequential):
    """``act(bn(conv(x)))`` with a depthwise ``conv`` (groups = channels), computed by one fused op.

    Children and ``state_dict`` keys are those of torchvision's ``Conv2dNormActivation`` with
    ``groups=channels`` (``0.weight``, ``1.weight``, ``1.bias``, ``1.running_mean``, ...). Training
    mode normalises with batch statistics and updates the running statistics exactly as
    ``nn.BatchNorm2d``; eval mode folds BN into the kernel. ``activation``: a class, an instance or
    a name among SiLU, Hardswish, ReLU, ReLU6, or None. ``padding=None`` is
    ``(kernel_size - 1) // 2 * dilation`` as in torchvision.
    """

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, activation=nn.SiLU, eps: float = 1e-5, momentum: float | None = 0.1,
                 impl: str = "auto"):
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        act_module, act_name = _activation(activation)
        layers = [nn.Conv2d(channels, channels, kernel_size, stride, padding, dilation, groups=channels, bias=False),
                  nn.BatchNorm2d(channels, eps, momentum)]
        super().__init__(*layers, *([act_module] if act_module is not None else []))
        self.activation = act_name
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self[0], self[1]
        y, stats = _dwconv_bn_act(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                  uses_batch_stats(bn), bn.eps, conv.stride, conv.padding, conv.dilation,
                                  self.activation, self.impl)
        if stats is not None:
            update_running_stats(bn, *stats)
        return y

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, impl={self.impl!r}"

    @classmethod
    def from_module(cls, module: nn.Module, impl: str = "auto") -> DWConvBNAct:
        """A DWConvBNAct with the weights and buffers of ``module``: torchvision's
        ``Conv2dNormActivation`` or ``nn.Sequential(conv, bn[, act])`` with a depthwise conv, or timm's
        ``ConvNormAct`` (conv + BatchNormAct2d). Raises ValueError for anything it cannot fuse."""
        conv, bn, act = _split(module)
        if type(conv) is not nn.Conv2d:
            raise ValueError(f"from_module needs a plain nn.Conv2d, got {type(conv).__name__}")
        C = conv.in_channels
        if conv.groups != C or conv.out_channels != C:
            raise ValueError(f"from_module needs a depthwise conv (groups = in = out channels), got {conv}")
        if conv.bias is not None or conv.padding_mode != "zeros":
            raise ValueError(f"from_module needs a conv without bias and with zero padding, got {conv}")
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != C:
            raise ValueError(f"from_module needs an nn.BatchNorm2d({C}) after the conv, got {bn}")
        if conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError(f"from_module needs a square kernel, got {conv.kernel_size}")
        padding = conv.padding
        if isinstance(padding, str):  # "valid" or "same" (odd kernels: symmetric)
            padding = [0, 0] if padding == "valid" else [d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size)]
        new = cls(C, conv.kernel_size[0], conv.stride, tuple(padding), conv.dilation, activation=act, eps=bn.eps,
                  momentum=bn.momentum, impl=impl)
        new[1] = nn.BatchNorm2d(C, bn.eps, bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)
        new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        new[0].load_state_dict(conv.state_dict())
        new[1].load_state_dict(bn.state_dict())
        return new.train(module.training)


def _split(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """(conv, bn, activation or None) of a conv-BN-activation block."""
    if isinstance(module, nn.Sequential):
        parts = list(module)
        if len(parts) in (2, 3):
            return parts[0], parts[1], parts[2] if len(parts) == 3 else None
        raise ValueError(f"from_module needs Sequential(conv, bn[, activation]), got {len(parts)} children")
    if hasattr(module, "conv") and hasattr(module, "bn"):  # timm ConvNormAct / ConvBnAct
        bn = module.bn
        for extra in (getattr(module, "aa", None), getattr(bn, "drop", None)):
            if extra is not None and not isinstance(extra, nn.Identity):
                raise ValueError(f"from_module cannot fuse {type(extra).__name__} in {type(module).__name__}")
        return module.conv, bn, getattr(bn, "act", None)
    raise ValueError(f"from_module needs Conv2dNormActivation, Sequential(conv, bn[, act]) or timm ConvNormAct, "
                     f"got {type(module).__name__}")
