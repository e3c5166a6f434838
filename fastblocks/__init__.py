"""fastblocks: drop-in PyTorch modules for efficient CNNs, with fused Triton, C++ and CUDA kernels."""
from fastblocks import _ext  # noqa: F401  (loads the compiled kernels, warns once if they are missing)
from fastblocks import nn, ops
from fastblocks._backend import BackendUnavailable, backends

__version__ = "0.1.0"

__all__ = ["ops", "nn", "backends", "BackendUnavailable", "__version__"]
