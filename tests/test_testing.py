"""The public checking helpers catch real differences."""
import pytest
import torch
from torch import nn

import fastblocks
from fastblocks.testing import compare_to_reference, gradcheck_op


def test_compare_to_reference_passes_on_equal_models_and_fails_on_different_ones():
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish())
    fb = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), fastblocks.nn.HardSwish(impl="torch"))
    fb.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 9, 9)
    errors = compare_to_reference(fb, ref, x)
    assert {"output", "0.weight.grad", "1.running_mean"} <= set(errors)
    with torch.no_grad():
        fb[0].weight[0, 0, 0, 0] += 1
    with pytest.raises(AssertionError, match="output differs"):
        compare_to_reference(fb, ref, x)


def test_gradcheck_op():
    assert gradcheck_op(fastblocks.ops.hardsigmoid_gate, torch.randn(2, 3, 2, 2), torch.randn(2, 3), impl="torch")
