"""MobileNetV2 and MobileNetV3 (large, small) from fastblocks blocks, with torchvision's names, arguments and keys."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from fastblocks.models._init import init_weights
from fastblocks.nn.activations import HardSwish
from fastblocks.nn.blocks import ConvNormAct, InvertedResidual, make_divisible

__all__ = ["MobileNetV2", "MobileNetV3", "InvertedResidualConfig", "mobilenet_v2", "mobilenet_v3_large",
           "mobilenet_v3_small"]


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    x = nn.functional.adaptive_avg_pool2d(model.features(x), 1)
    return model.classifier(x.flatten(1))


class MobileNetV2(nn.Module):
    """MobileNetV2 with the arguments and ``state_dict`` keys of ``torchvision.models.MobileNetV2``, plus ``impl``."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: list[list[int]] | None = None, round_nearest: int = 8,
                 block: Callable[..., nn.Module] | None = None, norm_layer: Callable[..., nn.Module] | None = None,
                 dropout: float = 0.2, impl: str = "auto"):
        super().__init__()
        block = block or partial(InvertedResidual, impl=impl)
        norm_layer = norm_layer or nn.BatchNorm2d
        if inverted_residual_setting is None:
            inverted_residual_setting = [
                # expand_ratio t, channels c, layers n, stride s
                [1, 16, 1, 1],
                [6, 24, 2, 2],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ]
        if not inverted_residual_setting or len(inverted_residual_setting[0]) != 4:
            raise ValueError(f"inverted_residual_setting should be a non-empty list of [t, c, n, s], "
                             f"got {inverted_residual_setting}")

        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        conv = partial(ConvNormAct, norm_layer=norm_layer, activation=nn.ReLU6, impl=impl)
        features: list[nn.Module] = [conv(3, input_channel, 3, stride=2)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(block(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t,
                                      norm_layer=norm_layer))
                input_channel = output_channel
        features.append(conv(input_channel, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self, lambda w: nn.init.normal_(w, 0, 0.01))

    forward = _forward


class InvertedResidualConfig:
    """One MobileNetV3 block (Tables 1 and 2 of the paper); torchvision's fields."""

    def __init__(self, input_channels: int, kernel: int, expanded_channels: int, out_channels: int, use_se: bool,
                 activation: str, stride: int, dilation: int, width_mult: float):
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.kernel = kernel
        self.expanded_channels = self.adjust_channels(expanded_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.use_se = use_se
        self.use_hs = activation == "HS"
        self.stride = stride
        self.dilation = dilation

    @staticmethod
    def adjust_channels(channels: int, width_mult: float) -> int:
        return make_divisible(channels * width_mult, 8)


class MobileNetV3(nn.Module):
    """MobileNetV3 with the arguments and ``state_dict`` keys of ``torchvision.models.MobileNetV3``, plus ``impl``.

    Hard-swish runs as fastblocks :class:`HardSwish`, the blocks as fastblocks :class:`InvertedResidual`.
    """

    def __init__(self, inverted_residual_setting: list[InvertedResidualConfig], last_channel: int,
                 num_classes: int = 1000, block: Callable[..., nn.Module] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, dropout: float = 0.2, impl: str = "auto"):
        super().__init__()
        if not inverted_residual_setting:
            raise ValueError("inverted_residual_setting should not be empty")
        block = block or partial(InvertedResidual, impl=impl)
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        conv = partial(ConvNormAct, norm_layer=norm_layer, activation=nn.Hardswish, impl=impl)

        first, last = inverted_residual_setting[0], inverted_residual_setting[-1]
        layers: list[nn.Module] = [conv(3, first.input_channels, 3, stride=2)]
        layers += [block(cnf, norm_layer) for cnf in inverted_residual_setting]
        lastconv_channels = 6 * last.out_channels
        layers.append(conv(last.out_channels, lastconv_channels, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_channels, last_channel),
            HardSwish(impl=impl),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        init_weights(self, lambda w: nn.init.normal_(w, 0, 0.01))

    forward = _forward


def _mobilenet_v3_conf(arch: str, width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False):
    """torchvision's block tables: (in, kernel, expanded, out, SE, activation, stride, dilation)."""
    div = 2 if reduced_tail else 1
    dil = 2 if dilated else 1
    bneck = partial(InvertedResidualConfig, width_mult=width_mult)
    if arch == "large":
        setting = [
            bneck(16, 3, 16, 16, False, "RE", 1, 1),
            bneck(16, 3, 64, 24, False, "RE", 2, 1),
            bneck(24, 3, 72, 24, False, "RE", 1, 1),
            bneck(24, 5, 72, 40, True, "RE", 2, 1),
            bneck(40, 5, 120, 40, True, "RE", 1, 1),
            bneck(40, 5, 120, 40, True, "RE", 1, 1),
            bneck(40, 3, 240, 80, False, "HS", 2, 1),
            bneck(80, 3, 200, 80, False, "HS", 1, 1),
            bneck(80, 3, 184, 80, False, "HS", 1, 1),
            bneck(80, 3, 184, 80, False, "HS", 1, 1),
            bneck(80, 3, 480, 112, True, "HS", 1, 1),
            bneck(112, 3, 672, 112, True, "HS", 1, 1),
            bneck(112, 5, 672, 160 // div, True, "HS", 2, dil),
            bneck(160 // div, 5, 960 // div, 160 // div, True, "HS", 1, dil),
            bneck(160 // div, 5, 960 // div, 160 // div, True, "HS", 1, dil),
        ]
        last_channel = InvertedResidualConfig.adjust_channels(1280 // div, width_mult)
    elif arch == "small":
        setting = [
            bneck(16, 3, 16, 16, True, "RE", 2, 1),
            bneck(16, 3, 72, 24, False, "RE", 2, 1),
            bneck(24, 3, 88, 24, False, "RE", 1, 1),
            bneck(24, 5, 96, 40, True, "HS", 2, 1),
            bneck(40, 5, 240, 40, True, "HS", 1, 1),
            bneck(40, 5, 240, 40, True, "HS", 1, 1),
            bneck(40, 5, 120, 48, True, "HS", 1, 1),
            bneck(48, 5, 144, 48, True, "HS", 1, 1),
            bneck(48, 5, 288, 96 // div, True, "HS", 2, dil),
            bneck(96 // div, 5, 576 // div, 96 // div, True, "HS", 1, dil),
            bneck(96 // div, 5, 576 // div, 96 // div, True, "HS", 1, dil),
        ]
        last_channel = InvertedResidualConfig.adjust_channels(1024 // div, width_mult)
    else:
        raise ValueError(f"unknown MobileNetV3 arch {arch!r}")
    return setting, last_channel


def mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2, as torchvision.models.mobilenet_v2; kwargs as :class:`MobileNetV2`."""
    return MobileNetV2(**kwargs)


def mobilenet_v3_large(*, width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False,
                       **kwargs) -> MobileNetV3:
    """MobileNetV3-Large, as torchvision.models.mobilenet_v3_large; kwargs as :class:`MobileNetV3`."""
    return MobileNetV3(*_mobilenet_v3_conf("large", width_mult, reduced_tail, dilated), **kwargs)


def mobilenet_v3_small(*, width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False,
                       **kwargs) -> MobileNetV3:
    """MobileNetV3-Small, as torchvision.models.mobilenet_v3_small; kwargs as :class:`MobileNetV3`."""
    return MobileNetV3(*_mobilenet_v3_conf("small", width_mult, reduced_tail, dilated), **kwargs)
