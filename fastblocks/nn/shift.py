"""``Shift``: the zero-FLOP, zero-parameter spatial operation of ShiftNet (Wu et al., CVPR 2018)."""
from __future__ import annotations

from torch import Tensor, nn

from fastblocks import ops


class Shift(nn.Module):
    """Shift each group of ``channels // kernel_size²`` channels by one tap of a k x k kernel.

    See ``fastblocks.ops.shift`` for the channel -> offset table and the sign convention. No
    parameters, no buffers; ``stride`` > 1 shifts and subsamples in one pass.
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1, stride: int = 1,
                 impl: str = "auto"):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.stride = stride
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.shape[1] != self.channels:
            raise ValueError(f"Shift({self.channels}) got an input with {x.shape[1]} channels")
        return ops.shift(x, self.kernel_size, self.dilation, self.stride, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"stride={self.stride}, impl={self.impl!r}")
