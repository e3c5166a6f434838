"""Drop-in replacements for ``nn.Hardswish`` and ``nn.Hardsigmoid``."""
from __future__ import annotations

from torch import Tensor, nn

from fastblocks import ops


class HardSwish(nn.Hardswish):
    """``nn.Hardswish`` computed by a fastblocks kernel.

    ``inplace`` is accepted for drop-in compatibility and ignored: the output is a new tensor, since
    backward needs the unmodified input.
    """

    def __init__(self, inplace: bool = False, impl: str = "auto"):
        super().__init__(inplace)
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        return ops.hardswish(x, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


class HardSigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` computed by a fastblocks kernel (``inplace`` accepted and ignored)."""

    def __init__(self, inplace: bool = False, impl: str = "auto"):
        super().__init__(inplace)
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        return ops.hardsigmoid(x, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
