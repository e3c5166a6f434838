"""Checks users can run on their own models and ops (the test suite uses them too).

    from fastblocks.testing import compare_to_reference, gradcheck_op
    fb = fastblocks.swap(model)
    compare_to_reference(fb, model, torch.randn(2, 3, 64, 64))      # outputs, every grad, buffers
    gradcheck_op(fastblocks.ops.hardswish, torch.randn(2, 3, 4, 4), impl="cpp")
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def gradcheck_op(fn, *inputs: Tensor, impl: str = "auto", **kwargs) -> bool:
    """``torch.autograd.gradcheck`` of ``fn(*inputs, impl=impl, **kwargs)`` in float64.

    Floating-point inputs are cast to float64 and made to require grad; raises on a mismatch.
    """
    args = tuple(t.detach().double().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t
                 for t in inputs)
    return torch.autograd.gradcheck(lambda *a: fn(*a, impl=impl, **kwargs), args)


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, Tensor))
    return next(v for v in out if isinstance(v, Tensor))


def compare_to_reference(module: nn.Module, reference: nn.Module, *inputs: Tensor, train: bool = True,
                         rtol: float = 1e-4, atol: float = 1e-4, copy_modules: bool = True) -> dict[str, float]:
    """Run ``module`` and ``reference`` (same weights) on the same inputs and compare everything.

    Compares the output, the gradient of every parameter and input (with a common random output
    gradient) when ``train``, and every buffer afterwards (running statistics). Parameters are
    matched by name, so both modules must have the same state_dict keys. Returns the largest absolute
    error per compared tensor; raises AssertionError naming the first tensor that differs.
    """
    if copy_modules:
        module, reference = copy.deepcopy(module), copy.deepcopy(reference)
    module.train(train)
    reference.train(train)
    errors: dict[str, float] = {}

    def check(name: str, a: Tensor | None, b: Tensor | None):
        if a is None or b is None:
            if (a is None) != (b is None):
                raise AssertionError(f"{name}: one side is None")
            return
        errors[name] = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name} differs: {m}")

    xs = [t.detach().clone().requires_grad_(train and t.is_floating_point()) for t in inputs]
    xr = [t.detach().clone().requires_grad_(train and t.is_floating_point()) for t in inputs]
    with torch.set_grad_enabled(train):
        out, ref = _first_tensor(module(*xs)), _first_tensor(reference(*xr))
    check("output", out, ref)
    if train:
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        for i, (a, b) in enumerate(zip(xs, xr)):
            check(f"input[{i}].grad", a.grad, b.grad)
        ref_params = dict(reference.named_parameters())
        for name, p in module.named_parameters():
            check(f"{name}.grad", p.grad, ref_params[name].grad)
    ref_buffers = dict(reference.named_buffers())
    for name, b in module.named_buffers():
        if name in ref_buffers:
            check(name, b, ref_buffers[name])
    return errors
