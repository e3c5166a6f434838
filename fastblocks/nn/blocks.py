"""Drop-in blocks of EfficientNet, MobileNetV2/V3 and SqueezeNet: MBConv, FusedMBConv, InvertedResidual, Fire.

Each takes torchvision's constructor arguments and has torchvision's ``state_dict`` keys, so
``block.load_state_dict(torchvision_block.state_dict())`` works and gives the same outputs. Inside,
the depthwise conv + BatchNorm + activation is one fused :class:`DWConvBNAct`, the squeeze-excite a
fused :class:`SqueezeExcite`, hard-swish a fastblocks :class:`HardSwish`; 1x1 and full convolutions
stay cuDNN / oneDNN convolutions, followed by a fused BatchNorm + activation where there is one.
torchvision itself is not needed at run time: :class:`ConvNormAct` reproduces its
``Conv2dNormActivation`` layout (keys ``0.weight``, ``1.weight``, ...).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from fastblocks._backend import requested_impl
from fastblocks.nn._batchnorm import batch_norm_act
from fastblocks.nn.activations import HardSigmoid, HardSwish
from fastblocks.nn.dwconv import DWConvBNAct
from fastblocks.nn.squeeze_excite import SqueezeExcite
from fastblocks.ops.conv1x1 import is_plain_1x1, run_conv
from fastblocks.ops.onednn import can_fuse, conv_norm_act

# Activations the fused kernels implement (class -> their name in DWConvBNAct and fastblocks.ops.bn_act).
_FUSED_ACTIVATIONS = {nn.SiLU: "silu", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish",
                      HardSwish: "hardswish"}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10% (TF MobileNet rule)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def activation_module(activation: Callable[..., nn.Module] | None, impl: str = "auto") -> nn.Module:
    """Instantiate an activation class, in place where that is safe; hard-swish/-sigmoid become fastblocks'."""
    if activation is None:
        return nn.Identity()
    if activation in (nn.Hardswish, HardSwish):
        return HardSwish(impl=impl)
    if activation in (nn.Hardsigmoid, HardSigmoid):
        return HardSigmoid(impl=impl)
    if activation in (nn.ReLU, nn.ReLU6, nn.SiLU):
        return activation(inplace=True)
    return activation()


def stochastic_depth(x: Tensor, p: float, training: bool) -> Tensor:
    """torchvision.ops.stochastic_depth in "row" mode (same random draws): drop whole samples of a residual branch."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation with torchvision ``Conv2dNormActivation``'s children (and keys).

    When the norm is a plain ``nn.BatchNorm2d`` and the activation SiLU, ReLU, ReLU6 or hard-swish, BN
    and the activation run as one fused :func:`fastblocks.ops.bn_act` on the conv output: one pass
    over it instead of two, and backward keeps only the conv output, not also the BN output. BatchNorm
    semantics (batch statistics and running-statistics updates in training, running statistics in
    eval) are those of ``nn.BatchNorm2d``. Other norms and activations, or no activation (nothing to
    fuse), run the children one after the other. CPU float32 inference (no gradient recorded) runs
    conv, BN and activation as one oneDNN convolution with BN folded in (:mod:`fastblocks.ops.onednn`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, dilation: int = 1, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
                 activation: Callable[..., nn.Module] | None = None, impl: str = "auto"):
        padding = (kernel_size - 1) // 2 * dilation
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False),
                  norm_layer(out_channels)]
        if activation is not None:
            layers.append(activation_module(activation, impl))
        super().__init__(*layers)
        self.out_channels = out_channels
        self.impl = impl

    def fused_activation(self) -> str | None:
        """bn_act's name of the activation when BN + activation run fused, else None. Read from the
        children at every call, so a replaced child is honoured."""
        if len(self) != 3 or type(self[1]) is not nn.BatchNorm2d:
            return None
        return _FUSED_ACTIVATIONS.get(type(self[2]))

    def forward(self, x: Tensor) -> Tensor:
        conv, norm = self[0], self[1]
        activation = self.fused_activation()
        if ((len(self) == 2 or activation is not None) and requested_impl("bn_act", self.impl) in ("auto", "cpp")
                and can_fuse(x, conv, norm, activation)):
            return conv_norm_act(x, conv, norm, activation)  # CPU inference: one oneDNN call
        return self.norm_act(run_conv(conv, x))

    def norm_act(self, y: Tensor) -> Tensor:
        """Everything after the conv, applied to the conv output ``y``."""
        activation = self.fused_activation()
        if activation is not None:
            return batch_norm_act(self[1], y, activation, self.impl)
        for layer in list(self)[1:]:
            y = layer(y)
        return y

    @classmethod
    def from_module(cls, m: nn.Sequential, impl: str = "auto") -> ConvNormAct:
        """A ConvNormAct holding the very children (so the same tensors and keys) of torchvision's
        ``Conv2dNormActivation`` or any ``Sequential(conv, norm[, activation])``."""
        if not isinstance(m, nn.Sequential) or len(m) not in (2, 3) or not isinstance(m[0], nn.Conv2d):
            raise ValueError(f"ConvNormAct.from_module needs Sequential(conv, norm[, activation]), got {m}")
        new = cls.__new__(cls)
        nn.Sequential.__init__(new, *m)
        new.out_channels, new.impl = m[0].out_channels, impl
        return new.train(m.training)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` (an ``nn.BatchNorm2d`` with ``drop`` and ``act`` children: the same keys)
    computed by the fused :func:`fastblocks.ops.bn_act`. ``activation``: a class or an instance of
    nn.SiLU, nn.ReLU, nn.ReLU6 or a hard-swish; ``drop`` is always the identity."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: nn.Module | type[nn.Module] = nn.ReLU,
                 impl: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        act = activation() if isinstance(activation, type) else activation
        if type(act) not in _FUSED_ACTIVATIONS:
            raise ValueError(f"BatchNormAct2d fuses nn.SiLU, nn.ReLU, nn.ReLU6 or a hard-swish, got {activation!r}")
        self.drop, self.act, self.activation = nn.Identity(), act, _FUSED_ACTIVATIONS[type(act)]
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm_act(self, x, self.activation, self.impl)

    @classmethod
    def from_module(cls, m: nn.BatchNorm2d, impl: str = "auto") -> BatchNormAct2d:
        """The same tensors as timm's BatchNormAct2d ``m``; ValueError unless its act is fusable and it has no drop."""
        if not isinstance(getattr(m, "drop", None), nn.Identity):
            raise ValueError(f"BatchNormAct2d cannot fuse a {type(getattr(m, 'drop', None)).__name__} drop layer")
        with torch.device("meta"):
            new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, getattr(m, "act", None),
                      impl)
        return adopt(new, m)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}, impl={self.impl!r}"


def depthwise_conv_norm_act(channels: int, kernel_size: int, stride: int, norm_layer: Callable[..., nn.Module],
                            activation: Callable[..., nn.Module] | None, impl: str = "auto",
                            dilation: int = 1) -> nn.Sequential:
    """A fused :class:`DWConvBNAct` when ``norm_layer`` makes a plain ``nn.BatchNorm2d``, else a ConvNormAct."""
    norm = norm_layer(channels)
    if (type(norm) is nn.BatchNorm2d and norm.affine and norm.track_running_stats
            and (activation is None or activation in _FUSED_ACTIVATIONS)):
        return DWConvBNAct(channels, kernel_size, stride, dilation=dilation,
                           activation=_FUSED_ACTIVATIONS.get(activation), eps=norm.eps, momentum=norm.momentum,
                           impl=impl)
    return ConvNormAct(channels, channels, kernel_size, stride, channels, dilation, norm_layer, activation, impl)


def batchnorm_layer_of(module: nn.Module) -> Callable[..., nn.BatchNorm2d]:
    """``partial(nn.BatchNorm2d, eps, momentum)`` rebuilding every BatchNorm of ``module``; TypeError if they differ."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    settings = {(type(m), m.eps, m.momentum, m.affine, m.track_running_stats) for m in norms}
    if len(settings) != 1:
        raise TypeError(f"{type(module).__name__}: expected BatchNorm2d layers with one setting, got {settings}")
    kind, eps, momentum, affine, tracked = settings.pop()
    if kind is not nn.BatchNorm2d or not (affine and tracked):
        raise TypeError(f"{type(module).__name__}: only affine nn.BatchNorm2d with running stats is converted, "
                        f"got {kind.__name__}(affine={affine}, track_running_stats={tracked})")
    return partial(nn.BatchNorm2d, eps=eps, momentum=momentum)


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` (built on the meta device) the very parameters and buffers of ``old``, and its mode."""
    new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
    leftover = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{type(new).__name__}.from_module: no value for {leftover}")
    return new.train(old.training)


class _Body(nn.Sequential):
    """A block's layers, run in order (keys as nn.Sequential's), a bare 1x1 conv as
    :func:`fastblocks.ops.conv1x1`. When gradients are recorded and a fastblocks SqueezeExcite feeds
    a 1x1 projection, the two run as one :func:`fastblocks.ops.squeeze_excite_conv1x1`: backward
    recomputes the excited tensor instead of keeping it, one expanded-width activation less per block."""

    def forward(self, x: Tensor) -> Tensor:
        *head, se, project = self
        fuse_se = (torch.is_grad_enabled() and isinstance(se, SqueezeExcite) and isinstance(project, ConvNormAct)
                   and is_plain_1x1(project[0]) and project[0].bias is None)
        for layer in head if fuse_se else self:
            x = run_conv(layer, x)
        return project.norm_act(se.forward_conv1x1(x, project[0].weight)) if fuse_se else x


class _Residual(nn.Module):
    """Body, then (row-mode stochastic depth and) the identity shortcut when shapes allow."""

    _body = "block"  # the attribute holding the body: torchvision names it "conv" in MobileNetV2
    use_res_connect: bool
    stochastic_depth_prob: float = 0.0

    def forward(self, x: Tensor) -> Tensor:
        out = getattr(self, self._body)(x)
        if self.use_res_connect:
            out = stochastic_depth(out, self.stochastic_depth_prob, self.training)
            out += x  # in place like torchvision: nothing saved for backward is the body's output
        return out


def _check_stride(stride: int) -> None:
    if stride not in (1, 2):
        raise ValueError(f"stride should be 1 or 2, got {stride}")


def _channels(cls_name: str, cnf, in_channels, out_channels) -> tuple[int, int]:
    """(in, out) from torchvision's config or the keywords; exactly one of the two forms."""
    if cnf is not None:
        if in_channels is not None or out_channels is not None:
            raise TypeError(f"{cls_name}: pass either torchvision's cnf or in_channels=/out_channels=, not both")
        return cnf.input_channels, cnf.out_channels
    if in_channels is None or out_channels is None:
        raise TypeError(f"{cls_name} takes torchvision's (cnf, stochastic_depth_prob, norm_layer) "
                        "or the keywords in_channels= and out_channels=")
    return in_channels, out_channels


class MBConv(_Residual):
    """EfficientNet's mobile inverted bottleneck: expand 1x1, fused depthwise conv + BN + act, fused SE, project 1x1.

    Two ways to build it::

        MBConv(cnf, stochastic_depth_prob, norm_layer)            # torchvision (cnf: MBConvConfig)
        MBConv(in_channels=16, out_channels=24, kernel_size=3, stride=2, expand_ratio=6)

    ``se_layer`` (torchvision form) replaces the fused squeeze-excite; ``expanded_channels`` /
    ``squeeze_channels`` override the widths the ratios give (``squeeze_channels=0``: no SE).
    """

    def __init__(self, cnf=None, stochastic_depth_prob: float = 0.0,
                 norm_layer: Callable[..., nn.Module] | None = None,
                 se_layer: Callable[..., nn.Module] | None = None, *,
                 in_channels: int | None = None, out_channels: int | None = None, kernel_size: int = 3,
                 stride: int = 1, expand_ratio: float = 6.0, se_ratio: float = 0.25,
                 activation: Callable[..., nn.Module] = nn.SiLU, norm_eps: float = 1e-3,
                 norm_momentum: float = 0.1, expanded_channels: int | None = None,
                 squeeze_channels: int | None = None, impl: str = "auto"):
        super().__init__()
        in_channels, out_channels = _channels("MBConv", cnf, in_channels, out_channels)
        if cnf is not None:
            kernel_size, stride, expand_ratio = cnf.kernel, cnf.stride, cnf.expand_ratio
        _check_stride(stride)
        if expanded_channels is None:
            expanded_channels = make_divisible(in_channels * expand_ratio, 8)
        if squeeze_channels is None:
            squeeze_channels = max(1, int(in_channels * se_ratio)) if se_ratio else 0
        if norm_layer is None:
            norm_layer = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)

        layers: list[nn.Module] = []
        if expanded_channels != in_channels:
            layers.append(ConvNormAct(in_channels, expanded_channels, 1, norm_layer=norm_layer,
                                      activation=activation, impl=impl))
        layers.append(depthwise_conv_norm_act(expanded_channels, kernel_size, stride, norm_layer, activation, impl))
        if squeeze_channels:
            if se_layer is None:
                layers.append(SqueezeExcite(expanded_channels, squeeze_channels, activation=activation,
                                            scale_activation=nn.Sigmoid, impl=impl))
            else:
                layers.append(se_layer(expanded_channels, squeeze_channels,
                                       activation=partial(activation, inplace=True)))
        layers.append(ConvNormAct(expanded_channels, out_channels, 1, norm_layer=norm_layer))
        self.block = _Body(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.stochastic_depth_prob = stochastic_depth_prob
        self.out_channels = out_channels

    @classmethod
    def from_module(cls, m: nn.Module, impl: str = "auto") -> MBConv:
        """The fastblocks MBConv with the parameters and buffers (the same tensors) of torchvision's ``m``."""
        *expand, dw, se, project = m.block
        conv = dw[0]
        with torch.device("meta"):
            new = cls(in_channels=expand[0][0].in_channels if expand else conv.in_channels,
                      out_channels=project[0].out_channels, kernel_size=conv.kernel_size[0], stride=conv.stride[0],
                      expanded_channels=conv.out_channels, squeeze_channels=se.fc1.out_channels,
                      activation=type(dw[-1]), stochastic_depth_prob=m.stochastic_depth.p,
                      norm_layer=batchnorm_layer_of(m), impl=impl)
        return adopt(new, m)

    def extra_repr(self) -> str:
        return f"stochastic_depth_prob={self.stochastic_depth_prob}"


class FusedMBConv(_Residual):
    """EfficientNetV2's fused MBConv: a full kxk conv expands (no depthwise conv), a 1x1 conv projects.

    Nothing here maps onto a fastblocks kernel: the convolutions are cuDNN's, as in torchvision. It
    exists so EfficientNetV2 is built from fastblocks blocks, with the keyword constructor::

        FusedMBConv(cnf, stochastic_depth_prob, norm_layer)       # torchvision (cnf: FusedMBConvConfig)
        FusedMBConv(in_channels=24, out_channels=48, kernel_size=3, stride=2, expand_ratio=4)
    """

    def __init__(self, cnf=None, stochastic_depth_prob: float = 0.0,
                 norm_layer: Callable[..., nn.Module] | None = None, *,
                 in_channels: int | None = None, out_channels: int | None = None, kernel_size: int = 3,
                 stride: int = 1, expand_ratio: float = 4.0, activation: Callable[..., nn.Module] = nn.SiLU,
                 norm_eps: float = 1e-3, norm_momentum: float = 0.1, expanded_channels: int | None = None,
                 impl: str = "auto"):
        super().__init__()
        in_channels, out_channels = _channels("FusedMBConv", cnf, in_channels, out_channels)
        if cnf is not None:
            kernel_size, stride, expand_ratio = cnf.kernel, cnf.stride, cnf.expand_ratio
        _check_stride(stride)
        if expanded_channels is None:
            expanded_channels = make_divisible(in_channels * expand_ratio, 8)
        if norm_layer is None:
            norm_layer = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)

        conv = partial(ConvNormAct, norm_layer=norm_layer, impl=impl)
        if expanded_channels != in_channels:
            layers = [conv(in_channels, expanded_channels, kernel_size, stride, activation=activation),
                      conv(expanded_channels, out_channels, 1)]
        else:
            layers = [conv(in_channels, out_channels, kernel_size, stride, activation=activation)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.stochastic_depth_prob = stochastic_depth_prob
        self.out_channels = out_channels

    @classmethod
    def from_module(cls, m: nn.Module, impl: str = "auto") -> FusedMBConv:
        """The fastblocks FusedMBConv with the parameters and buffers (the same tensors) of torchvision's ``m``."""
        first, last = m.block[0], m.block[-1]
        with torch.device("meta"):
            new = cls(in_channels=first[0].in_channels, out_channels=last[0].out_channels,
                      kernel_size=first[0].kernel_size[0], stride=first[0].stride[0],
                      expanded_channels=first[0].out_channels if len(m.block) == 2 else first[0].in_channels,
                      activation=type(first[-1]), stochastic_depth_prob=m.stochastic_depth.p,
                      norm_layer=batchnorm_layer_of(m), impl=impl)
        return adopt(new, m)

    def extra_repr(self) -> str:
        return f"stochastic_depth_prob={self.stochastic_depth_prob}"


def _is_v3_config(obj) -> bool:
    return hasattr(obj, "expanded_channels") and hasattr(obj, "use_hs")


class InvertedResidual(_Residual):
    """MobileNetV2 and MobileNetV3 inverted residual, with either of torchvision's constructors::

        InvertedResidual(inp, oup, stride, expand_ratio, norm_layer=None)   # mobilenetv2 (body in .conv)
        InvertedResidual(cnf, norm_layer, se_layer=None)                    # mobilenetv3 (body in .block)

    V2: expand 1x1 + ReLU6, fused depthwise conv + BN + ReLU6, linear 1x1 projection. V3: expand 1x1,
    fused depthwise conv + BN + (hard-swish or ReLU), optional fused squeeze-excite (ReLU, hard-sigmoid
    gate, squeeze width ``make_divisible(expanded // 4)``), linear 1x1 projection.
    """

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__()
        if (args and _is_v3_config(args[0])) or "cnf" in kwargs:
            self._build_v3(*args, impl=impl, **kwargs)
        else:
            self._build_v2(*args, impl=impl, **kwargs)

    def _build_v2(self, inp: int, oup: int, stride: int, expand_ratio: float,
                  norm_layer: Callable[..., nn.Module] | None = None, *, impl: str) -> None:
        _check_stride(stride)
        norm_layer = norm_layer or nn.BatchNorm2d
        hidden = int(round(inp * expand_ratio))
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(inp, hidden, 1, norm_layer=norm_layer, activation=nn.ReLU6, impl=impl))
        layers += [depthwise_conv_norm_act(hidden, 3, stride, norm_layer, nn.ReLU6, impl),
                   nn.Conv2d(hidden, oup, 1, bias=False),
                   norm_layer(oup)]
        self._body = "conv"
        self.conv = _Body(*layers)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.out_channels = oup
        self._is_cn = stride > 1

    def _build_v3(self, cnf, norm_layer: Callable[..., nn.Module],
                  se_layer: Callable[..., nn.Module] | None = None, *, impl: str) -> None:
        _check_stride(cnf.stride)
        activation = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(ConvNormAct(cnf.input_channels, cnf.expanded_channels, 1, norm_layer=norm_layer,
                                      activation=activation, impl=impl))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(depthwise_conv_norm_act(cnf.expanded_channels, cnf.kernel, stride, norm_layer, activation,
                                              impl, cnf.dilation))
        if cnf.use_se:
            squeeze = make_divisible(cnf.expanded_channels // 4, 8)
            if se_layer is None:
                layers.append(SqueezeExcite(cnf.expanded_channels, squeeze, activation=nn.ReLU,
                                            scale_activation=nn.Hardsigmoid, impl=impl))
            else:
                layers.append(se_layer(cnf.expanded_channels, squeeze))
        layers.append(ConvNormAct(cnf.expanded_channels, cnf.out_channels, 1, norm_layer=norm_layer))
        self.block = _Body(*layers)
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        self.out_channels = cnf.out_channels
        self._is_cn = cnf.stride > 1

    @classmethod
    def from_module(cls, m: nn.Module, impl: str = "auto") -> InvertedResidual:
        """The fastblocks block with the parameters and buffers (the same tensors) of torchvision's
        mobilenetv2 or mobilenetv3 ``InvertedResidual`` ``m``."""
        norm_layer = batchnorm_layer_of(m)
        if hasattr(m, "conv"):  # mobilenetv2
            *expand, dw, project, _ = m.conv
            inp = expand[0][0].in_channels if expand else dw[0].in_channels
            ratio = dw[0].in_channels / inp if expand else 1
            with torch.device("meta"):
                new = cls(inp, project.out_channels, m.stride, ratio, norm_layer, impl=impl)
            return adopt(new, m)
        layers = list(m.block)
        use_se = len(layers) >= 3 and hasattr(layers[-2], "fc1")
        dw = layers[-3 if use_se else -2]
        conv = dw[0]
        cnf = SimpleNamespace(input_channels=layers[0][0].in_channels, kernel=conv.kernel_size[0],
                              expanded_channels=conv.out_channels, out_channels=layers[-1][0].out_channels,
                              use_se=use_se, use_hs=isinstance(dw[-1], nn.Hardswish),
                              stride=2 if m._is_cn else 1, dilation=conv.dilation[0])
        with torch.device("meta"):
            new = cls(cnf, norm_layer, impl=impl)
        return adopt(new, m)


class Fire(nn.Module):
    """SqueezeNet's Fire module: squeeze 1x1 + ReLU, then 1x1 and 3x3 expands, concatenated and ReLU'd.

    Same arguments and keys as torchvision's. One ReLU runs in place on the concatenation instead of
    one per branch before it: the same values, but backward keeps only the block output (which the
    next layer saves anyway) instead of a second copy of it in the two branch outputs. CPU float32
    inference runs each conv with its ReLU as one oneDNN call (:mod:`fastblocks.ops.onednn`).
    """

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int):
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if all(can_fuse(x, conv, activation="relu") for conv in (self.squeeze, self.expand1x1, self.expand3x3)):
            s = conv_norm_act(x, self.squeeze, activation="relu")  # CPU inference: conv + ReLU per oneDNN call
            return torch.cat([conv_norm_act(s, conv, activation="relu") for conv in (self.expand1x1, self.expand3x3)], 1)
        s = torch.relu_(run_conv(self.squeeze, x))
        return torch.relu_(torch.cat([run_conv(self.expand1x1, s), self.expand3x3(s)], 1))

    @classmethod
    def from_module(cls, m: nn.Module) -> Fire:
        """The fastblocks Fire with the parameters (the same tensors) of torchvision's ``m``."""
        with torch.device("meta"):
            new = cls(m.inplanes, m.squeeze.out_channels, m.expand1x1.out_channels, m.expand3x3.out_channels)
        return adopt(new, m)
