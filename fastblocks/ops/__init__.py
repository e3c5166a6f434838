"""Functional ops. Each takes ``impl=`` ("auto", "torch", "triton", "cpp", "cuda")."""
from fastblocks.ops.hardswish import hardsigmoid, hardsigmoid_gate, hardswish

__all__ = ["hardswish", "hardsigmoid", "hardsigmoid_gate"]
