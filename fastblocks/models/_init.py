"""torchvision's weight initialisation, shared by the EfficientNet and MobileNet builders."""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def init_weights(model: nn.Module, init_linear: Callable[[Tensor], object]) -> None:
    """Kaiming (fan_out) convs, unit norms, zero biases; ``init_linear`` sets each Linear's weight."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_linear(m.weight)
            nn.init.zeros_(m.bias)
