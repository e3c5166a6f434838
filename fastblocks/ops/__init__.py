"""Functional ops. Each takes ``impl=`` ("auto", "torch", "triton", "cpp", "cuda"). One import line per op file."""
from fastblocks.ops.bn_act import bn_act  # noqa: F401
from fastblocks.ops.dwconv_bn_act import dwconv_bn_act  # noqa: F401
from fastblocks.ops.hardswish import hardsigmoid, hardsigmoid_gate, hardswish  # noqa: F401
from fastblocks.ops.shift import shift  # noqa: F401
from fastblocks.ops.squeeze_excite import squeeze_excite, squeeze_excite_conv1x1  # noqa: F401
