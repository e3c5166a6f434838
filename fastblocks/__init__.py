"""fastblocks: drop-in PyTorch modules for efficient CNNs, with fused Triton, C++ and CUDA kernels."""
from fastblocks import _ext  # noqa: F401  (loads the compiled kernels, warns once if they are missing)
from fastblocks import models, nn, ops
from fastblocks._backend import BackendUnavailable, backends
from fastblocks.nn.blocks import MBConv, FusedMBConv, InvertedResidual, Fire
from fastblocks.swap import swap

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "backends", "BackendUnavailable", "__version__",
           "MBConv", "FusedMBConv", "InvertedResidual", "Fire", "swap"]
