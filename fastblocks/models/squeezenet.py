"""SqueezeNet 1.0 and 1.1 built from fastblocks :class:`Fire` modules, with torchvision's names, arguments and keys."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastblocks.nn.blocks import Fire

__all__ = ["SqueezeNet", "squeezenet1_0", "squeezenet1_1"]

# version -> (stem conv (out, kernel), then Fire (inplanes, squeeze, expand1x1, expand3x3) or "M" for max-pool)
_LAYOUTS = {
    "1_0": ((96, 7), ["M", (96, 16, 64, 64), (128, 16, 64, 64), (128, 32, 128, 128), "M", (256, 32, 128, 128),
                      (256, 48, 192, 192), (384, 48, 192, 192), (384, 64, 256, 256), "M", (512, 64, 256, 256)]),
    "1_1": ((64, 3), ["M", (64, 16, 64, 64), (128, 16, 64, 64), "M", (128, 32, 128, 128), (256, 32, 128, 128), "M",
                      (256, 48, 192, 192), (384, 48, 192, 192), (384, 64, 256, 256), (512, 64, 256, 256)]),
}


class SqueezeNet(nn.Module):
    """SqueezeNet with the arguments and ``state_dict`` keys of ``torchvision.models.SqueezeNet``."""

    def __init__(self, version: str = "1_0", num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        if version not in _LAYOUTS:
            raise ValueError(f"Unsupported SqueezeNet version {version}: 1_0 or 1_1 expected")
        self.num_classes = num_classes
        (stem_channels, stem_kernel), fires = _LAYOUTS[version]
        layers: list[nn.Module] = [nn.Conv2d(3, stem_channels, kernel_size=stem_kernel, stride=2),
                                   nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True) if f == "M" else Fire(*f) for f in fires]
        self.features = nn.Sequential(*layers)
        final_conv = nn.Conv2d(512, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet1_0(**kwargs) -> SqueezeNet:
    """SqueezeNet 1.0, as torchvision.models.squeezenet1_0; kwargs: ``num_classes``, ``dropout``."""
    return SqueezeNet("1_0", **kwargs)


def squeezenet1_1(**kwargs) -> SqueezeNet:
    """SqueezeNet 1.1, as torchvision.models.squeezenet1_1; kwargs: ``num_classes``, ``dropout``."""
    return SqueezeNet("1_1", **kwargs)
