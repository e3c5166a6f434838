"""EfficientNet B0-B7 and V2-S/M/L built from fastblocks blocks, with torchvision's names, arguments and keys.

Compound scaling (Tan & Le, 2019): one coefficient phi scales depth by alpha**phi, width by beta**phi
and resolution by gamma**phi, with alpha * beta**2 * gamma**2 ~= 2 so that FLOPs grow ~2**phi; a grid
search on B0 at phi = 1 gave alpha = 1.2, beta = 1.1, gamma = 1.15. :func:`compound_scaling` returns
the exact multipliers; the released B1-B7 (``EFFICIENTNET_SCALES``) are rounded values of it, see
its docstring. Channels are then rounded by ``make_divisible(c * width_mult, 8)`` and each stage's
layer count by ``ceil(n * depth_mult)``, as in torchvision.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from functools import partial

from torch import Tensor, nn

from fastblocks.models._init import init_weights
from fastblocks.nn.blocks import ConvNormAct, FusedMBConv, MBConv, make_divisible

__all__ = [
    "EfficientNet", "MBConvConfig", "FusedMBConvConfig", "compound_scaling", "efficientnet", "EFFICIENTNET_SCALES",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
]

# name -> (width_mult, depth_mult, resolution, dropout): the released table (torchvision, TF; b8 from TF).
EFFICIENTNET_SCALES = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
    "b8": (2.2, 3.6, 672, 0.5),
}


def compound_scaling(phi: float, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
                     base_resolution: int = 224) -> tuple[float, float, int]:
    """``(width_mult, depth_mult, resolution) = (beta**phi, alpha**phi, round(base_resolution * gamma**phi))``.

    FLOPs scale by ``depth * width**2 * resolution**2 = (alpha * beta**2 * gamma**2)**phi ~= 1.92**phi``.
    The released table is this rule, rounded: B1 is phi = 0.5 (1.05 -> 1.0, 1.095 -> 1.1, 240), B2-B3
    phi = 1-2, B4 ~ 3.5 (1.40, 1.89, 365 vs 1.4, 1.8, 380), B5-B8 phi = 5-8, with width and resolution
    within ~3% of beta**phi and 224 * gamma**phi, but depth held 12-16% below alpha**phi
    (2.2 / 2.6 / 3.1 / 3.6 vs 2.49 / 2.99 / 3.58 / 4.30).
    Pass the result to :func:`efficientnet`: ``efficientnet(*compound_scaling(3)[:2], dropout=0.4)``.
    """
    return beta ** phi, alpha ** phi, round(base_resolution * gamma ** phi)


class MBConvConfig:
    """One EfficientNet stage of MBConv blocks (torchvision's fields; channels/depth scaled at construction)."""

    def __init__(self, expand_ratio: float, kernel: int, stride: int, input_channels: int, out_channels: int,
                 num_layers: int, width_mult: float = 1.0, depth_mult: float = 1.0,
                 block: Callable[..., nn.Module] | None = None):
        self.expand_ratio = expand_ratio
        self.kernel = kernel
        self.stride = stride
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.num_layers = self.adjust_depth(num_layers, depth_mult)
        self.block = block or MBConv

    @staticmethod
    def adjust_channels(channels: int, width_mult: float, min_value: int | None = None) -> int:
        return make_divisible(channels * width_mult, 8, min_value)

    @staticmethod
    def adjust_depth(num_layers: int, depth_mult: float) -> int:
        return int(math.ceil(num_layers * depth_mult))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "block")
        return f"{type(self).__name__}({fields}, block={self.block.__name__})"


class FusedMBConvConfig(MBConvConfig):
    """One EfficientNetV2 stage of FusedMBConv blocks (never width/depth scaled, as in torchvision)."""

    def __init__(self, expand_ratio: float, kernel: int, stride: int, input_channels: int, out_channels: int,
                 num_layers: int, block: Callable[..., nn.Module] | None = None):
        super().__init__(expand_ratio, kernel, stride, input_channels, out_channels, num_layers,
                         block=block or FusedMBConv)


class EfficientNet(nn.Module):
    """EfficientNet V1/V2: stem conv, stages of (Fused)MBConv blocks, 1x1 head conv, pooling, classifier.

    Same arguments and ``state_dict`` keys as ``torchvision.models.EfficientNet``, plus ``impl``
    (the fastblocks backend of every fused op). ``stochastic_depth_prob`` grows linearly with the
    block index from 0 to its value at the last block.
    """

    def __init__(self, inverted_residual_setting: Sequence[MBConvConfig], dropout: float,
                 stochastic_depth_prob: float = 0.2, num_classes: int = 1000,
                 norm_layer: Callable[..., nn.Module] | None = None, last_channel: int | None = None,
                 impl: str = "auto"):
        super().__init__()
        if not inverted_residual_setting:
            raise ValueError("inverted_residual_setting should not be empty")
        norm_layer = norm_layer or nn.BatchNorm2d
        conv = partial(ConvNormAct, norm_layer=norm_layer, activation=nn.SiLU, impl=impl)

        layers: list[nn.Module] = [conv(3, inverted_residual_setting[0].input_channels, 3, stride=2)]
        total_blocks = sum(cnf.num_layers for cnf in inverted_residual_setting)
        block_id = 0
        for cnf in inverted_residual_setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = copy.copy(cnf)
                if stage:  # later blocks of a stage keep the width and the resolution
                    block_cnf.input_channels, block_cnf.stride = cnf.out_channels, 1
                sd_prob = stochastic_depth_prob * block_id / total_blocks
                fastblocks_block = cnf.block in (MBConv, FusedMBConv)
                stage.append(cnf.block(block_cnf, sd_prob, norm_layer, **({"impl": impl} if fastblocks_block else {})))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = inverted_residual_setting[-1].out_channels
        last_out = last_channel if last_channel is not None else 4 * last_in
        layers.append(conv(last_in, last_out, 1))

        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_out, num_classes))

        init_weights(self, lambda w: nn.init.uniform_(w, -1.0 / math.sqrt(w.shape[0]), 1.0 / math.sqrt(w.shape[0])))

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def _b_stages(width_mult: float, depth_mult: float) -> list[MBConvConfig]:
    stage = partial(MBConvConfig, width_mult=width_mult, depth_mult=depth_mult)
    return [  # expand_ratio, kernel, stride, in, out, layers (B0, Table 1 of the paper)
        stage(1, 3, 1, 32, 16, 1),
        stage(6, 3, 2, 16, 24, 2),
        stage(6, 5, 2, 24, 40, 2),
        stage(6, 3, 2, 40, 80, 3),
        stage(6, 5, 1, 80, 112, 3),
        stage(6, 5, 2, 112, 192, 4),
        stage(6, 3, 1, 192, 320, 1),
    ]


def efficientnet(width_mult: float = 1.0, depth_mult: float = 1.0, dropout: float = 0.2, **kwargs) -> EfficientNet:
    """EfficientNet at any scale: B0's stages with channels x ``width_mult`` and layers x ``depth_mult``.

    ``efficientnet(2.2, 3.6, 0.5)`` is B8; ``efficientnet(*compound_scaling(phi)[:2])`` any phi. Keyword
    arguments (``num_classes``, ``stochastic_depth_prob``, ``norm_layer``, ``impl``) go to :class:`EfficientNet`.
    """
    return EfficientNet(_b_stages(width_mult, depth_mult), dropout, **kwargs)


def _efficientnet_b(name: str, tf_batchnorm: bool = False):
    width_mult, depth_mult, resolution, dropout = EFFICIENTNET_SCALES[name]

    def build(**kwargs) -> EfficientNet:
        if tf_batchnorm:  # torchvision's B5-B7 weights were ported from TF: its BatchNorm settings
            kwargs.setdefault("norm_layer", partial(nn.BatchNorm2d, eps=0.001, momentum=0.01))
        return efficientnet(width_mult, depth_mult, kwargs.pop("dropout", dropout), **kwargs)

    build.__name__ = build.__qualname__ = f"efficientnet_{name}"
    build.__doc__ = (f"EfficientNet-{name.upper()} (width x{width_mult}, depth x{depth_mult}, trained at "
                     f"{resolution}px), as torchvision.models.efficientnet_{name}; kwargs as :class:`EfficientNet`.")
    return build


efficientnet_b0 = _efficientnet_b("b0")
efficientnet_b1 = _efficientnet_b("b1")
efficientnet_b2 = _efficientnet_b("b2")
efficientnet_b3 = _efficientnet_b("b3")
efficientnet_b4 = _efficientnet_b("b4")
efficientnet_b5 = _efficientnet_b("b5", tf_batchnorm=True)
efficientnet_b6 = _efficientnet_b("b6", tf_batchnorm=True)
efficientnet_b7 = _efficientnet_b("b7", tf_batchnorm=True)

# EfficientNetV2 (Table 4 of the paper; torchvision's stages): expand_ratio, kernel, stride, in, out, layers.
_V2_STAGES = {
    "s": ([(1, 3, 1, 24, 24, 2), (4, 3, 2, 24, 48, 4), (4, 3, 2, 48, 64, 4)],
          [(4, 3, 2, 64, 128, 6), (6, 3, 1, 128, 160, 9), (6, 3, 2, 160, 256, 15)], 0.2),
    "m": ([(1, 3, 1, 24, 24, 3), (4, 3, 2, 24, 48, 5), (4, 3, 2, 48, 80, 5)],
          [(4, 3, 2, 80, 160, 7), (6, 3, 1, 160, 176, 14), (6, 3, 2, 176, 304, 18), (6, 3, 1, 304, 512, 5)], 0.3),
    "l": ([(1, 3, 1, 32, 32, 4), (4, 3, 2, 32, 64, 7), (4, 3, 2, 64, 96, 7)],
          [(4, 3, 2, 96, 192, 10), (6, 3, 1, 192, 224, 19), (6, 3, 2, 224, 384, 25), (6, 3, 1, 384, 640, 7)], 0.4),
}


def _efficientnet_v2(size: str):
    fused, mbconv, dropout = _V2_STAGES[size]

    def build(**kwargs) -> EfficientNet:
        stages = [FusedMBConvConfig(*s) for s in fused] + [MBConvConfig(*s) for s in mbconv]
        kwargs.setdefault("norm_layer", partial(nn.BatchNorm2d, eps=1e-3))
        return EfficientNet(stages, kwargs.pop("dropout", dropout), last_channel=1280, **kwargs)

    build.__name__ = build.__qualname__ = f"efficientnet_v2_{size}"
    build.__doc__ = (f"EfficientNetV2-{size.upper()}, as torchvision.models.efficientnet_v2_{size}; "
                     "kwargs as :class:`EfficientNet`.")
    return build


efficientnet_v2_s = _efficientnet_v2("s")
efficientnet_v2_m = _efficientnet_v2("m")
efficientnet_v2_l = _efficientnet_v2("l")
