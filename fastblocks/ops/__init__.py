"""Functional ops. Each takes ``impl=`` ("auto", "torch", "triton", "cpp", "cuda"). One import line per op file."""
from fastblocks.ops.hardswish import hardsigmoid, hardsigmoid_gate, hardswish  # noqa: F401
