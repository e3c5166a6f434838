"""Functional ops. The fused ops take ``impl=`` ("auto", "torch", "triton", "cpp", "cuda"); ``conv1x1`` is aten's
GEMM or convolution, whichever is faster for the input. One import line per op file."""
from fastblocks.ops.bn_act import bn_act  # noqa: F401
from fastblocks.ops.conv1x1 import conv1x1  # noqa: F401
from fastblocks.ops.dwconv_bn_act import dwconv_bn_act  # noqa: F401
from fastblocks.ops.hardswish import hardsigmoid, hardsigmoid_gate, hardswish  # noqa: F401
from fastblocks.ops.shift import shift  # noqa: F401
from fastblocks.ops.squeeze_excite import squeeze_excite, squeeze_excite_conv1x1  # noqa: F401
