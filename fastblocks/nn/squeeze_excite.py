"""Drop-in squeeze-and-excitation: torchvision's ``SqueezeExcitation`` as one fused fastblocks op."""
from __future__ import annotations

from torch import Tensor, nn

from fastblocks import ops

# Activation modules the fused op computes, by op name. timm's own classes (used when its layer
# config asks for them) count by class name, restricted to modules defined in timm.
_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}
_SCALE_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
_TIMM_CLASSES = {"Swish": "silu", "SwishMe": "silu", "HardSwish": "hardswish", "HardSwishMe": "hardswish",
                 "Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid", "HardSigmoidMe": "hardsigmoid"}
_ALIASES = {"swish": "silu", "hard_swish": "hardswish", "hard_sigmoid": "hardsigmoid"}  # timm's names


def _resolve(arg, table: dict[str, type], what: str) -> tuple[str, nn.Module]:
    """(op name, module instance) for an activation given as a class, an instance or a name."""
    if isinstance(arg, str):
        name = _ALIASES.get(arg.lower(), arg.lower())
        if name not in table:
            raise ValueError(f"{what} {arg!r} is not supported; use one of {tuple(table)}")
        return name, table[name]()
    module = arg() if isinstance(arg, type) else arg
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what} must be an nn.Module class, instance or name, got {arg!r}")
    for name, cls in table.items():
        if isinstance(module, cls):
            return name, module
    name = _TIMM_CLASSES.get(type(module).__name__)
    if name in table and type(module).__module__.startswith("timm."):
        return name, module
    raise ValueError(f"{what} {type(module).__name__} is not supported by fastblocks.nn.SqueezeExcite; "
                     f"supported: {', '.join(cls.__name__ for cls in table.values())}")


class SqueezeExcite(nn.Module):
    """``torchvision.ops.SqueezeExcitation`` computed by one fused op (``fastblocks.ops.squeeze_excite``).

    Same constructor and ``state_dict`` keys (``fc1.weight`` [S, C, 1, 1], ``fc1.bias``, ``fc2.weight``,
    ``fc2.bias``). ``activation``: ReLU, ReLU6, SiLU or Hardswish; ``scale_activation``: Sigmoid or
    Hardsigmoid — each as a class, an instance or a name ("relu", "silu", "hard_sigmoid", ...).
    EfficientNet uses SiLU + Sigmoid, MobileNetV3 ReLU + Hardsigmoid.
    """

    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.ReLU,
                 scale_activation=nn.Sigmoid, impl: str = "auto"):
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.act_name, self.activation = _resolve(activation, _ACTIVATIONS, "activation")
        self.scale_act_name, self.scale_activation = _resolve(scale_activation, _SCALE_ACTIVATIONS,
                                                              "scale_activation")
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        return ops.squeeze_excite(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                  self.act_name, self.scale_act_name, impl=self.impl)

    def forward_conv1x1(self, x: Tensor, weight: Tensor) -> Tensor:
        """``conv2d(self(x), weight)`` for a 1x1 projection ``weight``, without keeping ``self(x)`` for
        backward (:func:`fastblocks.ops.squeeze_excite_conv1x1`)."""
        return ops.squeeze_excite_conv1x1(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, weight,
                                          self.act_name, self.scale_act_name, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"

    @classmethod
    def from_module(cls, m: nn.Module, impl: str = "auto") -> SqueezeExcite:
        """Converts torchvision's ``SqueezeExcitation`` or timm's ``SqueezeExcite`` (EfficientNet /
        MobileNetV3 blocks: ``conv_reduce``, ``act1``, ``conv_expand``, ``gate``) or ``SEModule``
        (``fc1``, ``act``, ``fc2``, ``gate``), keeping its weights, device, dtype and training mode.
        The result uses torchvision's key names (``fc1`` / ``fc2``)."""
        if hasattr(m, "conv_reduce") and hasattr(m, "conv_expand"):  # timm _efficientnet_blocks.SqueezeExcite
            fc1, fc2, act, gate = m.conv_reduce, m.conv_expand, m.act1, m.gate
        elif hasattr(m, "scale_activation"):  # torchvision.ops.SqueezeExcitation
            fc1, fc2, act, gate = m.fc1, m.fc2, m.activation, m.scale_activation
        elif hasattr(m, "fc1") and hasattr(m, "gate"):  # timm.layers.SEModule
            if getattr(m, "add_maxpool", False) or not isinstance(getattr(m, "bn", nn.Identity()), nn.Identity):
                raise ValueError("SEModule with add_maxpool or a norm layer is not supported by SqueezeExcite")
            fc1, fc2, act, gate = m.fc1, m.fc2, m.act, m.gate
        else:
            raise TypeError(f"cannot convert {type(m).__name__} to SqueezeExcite: expected torchvision's "
                            "SqueezeExcitation or timm's SqueezeExcite / SEModule")
        for conv in (fc1, fc2):
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.bias is None or conv.groups != 1:
                raise ValueError(f"{type(m).__name__}: expected 1x1 convolutions with bias, got {conv}")
        se = cls(fc1.in_channels, fc1.out_channels, act, gate, impl=impl)
        se.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        se.fc1.load_state_dict(fc1.state_dict())
        se.fc2.load_state_dict(fc2.state_dict())
        return se.train(m.training)
