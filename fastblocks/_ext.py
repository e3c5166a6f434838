"""Loads the compiled extension ``fastblocks._C`` (kernels registered as ``torch.ops.fastblocks_ext.*``).

Never raises: when the extension is missing or was built against another torch, the ``cpp`` and
``cuda`` backends report why they cannot run and ``import fastblocks`` warns once.
"""
from __future__ import annotations

import warnings

import torch

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` in the fastblocks checkout"

_C = None
LOAD_ERROR: str | None = None

try:
    from fastblocks import _C  # noqa: F811  (registers the kernels with the dispatcher)
except ImportError as e:  # not built (FASTBLOCKS_NO_EXT=1), or built against another torch (undefined symbol)
    _C = None
    if "No module named" in str(e) or "cannot import name '_C'" in str(e):
        LOAD_ERROR = f"the compiled extension fastblocks._C is not built; {REBUILD_HINT}"
    else:
        LOAD_ERROR = f"the compiled extension fastblocks._C failed to load ({e}); it is probably stale: {REBUILD_HINT}"
else:
    if _C.torch_version != torch.__version__:
        LOAD_ERROR = (f"fastblocks._C was built against torch {_C.torch_version} but torch {torch.__version__} "
                      f"is installed; {REBUILD_HINT}")
        _C = None

if LOAD_ERROR is not None:
    warnings.warn(f"fastblocks: {LOAD_ERROR}. The 'torch' and 'triton' backends still work.",
                  RuntimeWarning, stacklevel=2)


def cpp_unavailable(op_name: str) -> str | None:
    """Why the extension cannot run ``op_name`` at all, or None."""
    if _C is None:
        return LOAD_ERROR
    if not hasattr(torch.ops.fastblocks_ext, op_name):
        return f"fastblocks._C has no kernel {op_name!r}; {REBUILD_HINT}"
    return None


def cuda_kernels_built() -> bool:
    return _C is not None and bool(_C.with_cuda)


def why_no_cuda_kernels() -> str | None:
    """Why the extension has no CUDA kernels here, or None when it has them."""
    if _C is None:
        return LOAD_ERROR
    if cuda_kernels_built():
        return None
    return f"fastblocks._C was built without CUDA kernels; {REBUILD_HINT} where nvcc is available"


def op(op_name: str):
    """The extension's raw kernel ``torch.ops.fastblocks_ext.<op_name>`` (no autograd)."""
    return getattr(torch.ops.fastblocks_ext, op_name)
