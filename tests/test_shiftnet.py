"""ShiftResNet-20 / 56 / 110: published parameter counts, and the same outputs and gradients with
every shift backend as with the pure-PyTorch build."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastblocks.models as models
from fastblocks import ops
from tests.conftest import require_backend

# Wu et al. 2018 / github.com/alvinwan/shiftresnet-cifar, CIFAR-10, millions of parameters, for
# expansion 1, 3, 6, 9 ("c", "3c", "6c", "9c").
PUBLISHED = {20: (0.03, 0.10, 0.19, 0.28), 56: (0.10, 0.29, 0.58, 0.87), 110: (0.20, 0.59, 1.18, 1.76)}
EXPANSIONS = (1, 3, 6, 9)
BUILDERS = {20: models.shiftresnet20, 56: models.shiftresnet56, 110: models.shiftresnet110}


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper(capsys):
    rows = ["| model | " + " | ".join(f"ε={e}" for e in EXPANSIONS) + " |", "|---|" + "---|" * len(EXPANSIONS)]
    mismatches = []
    for depth, published in PUBLISHED.items():
        counts = [_count(BUILDERS[depth](expansion=e, impl="torch")) for e in EXPANSIONS]
        rows.append(f"| ShiftResNet{depth} | " + " | ".join(
            f"{c:,} ({c / 1e6:.2f} / paper {p:.2f})" for c, p in zip(counts, published)) + " |")
        mismatches += [(depth, e) for e, c, p in zip(EXPANSIONS, counts, published) if round(c / 1e6, 2) != p]
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert not mismatches


def test_state_dict_keys_follow_the_official_code():
    keys = set(models.shiftresnet20(impl="torch").state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
                "layer2.0.shortcut.0.weight", "layer3.2.conv2.weight", "linear.weight", "linear.bias"]:
        assert key in keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)  # same shape: identity shortcut


def test_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        models.ShiftResNet(depth=21)


def test_strided_shift_equals_strided_pointwise_conv():
    """The block's stride is taken by the shift; the official code strides the 1x1 conv after it."""
    torch.manual_seed(0)
    block = models.CSCBlock(16, 32, stride=2, expansion=3, impl="torch").eval()
    x = torch.randn(2, 16, 9, 9)
    mid = F.relu(block.bn1(block.conv1(x)))
    official = F.relu(block.bn2(F.conv2d(ops.shift(mid, impl="torch"), block.conv2.weight, stride=2))
                      + block.shortcut(x))
    torch.testing.assert_close(block(x), official)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_same_outputs_and_gradients_as_the_torch_build(backend, device, layout):
    require_backend("shift", backend, device)
    torch.manual_seed(0)
    ref = models.shiftresnet20(impl="torch").to(device)
    model = models.shiftresnet20(impl=backend).to(device)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, device=device)
    if layout == "channels_last":
        x, ref, model = (m.to(memory_format=torch.channels_last) for m in (x, ref, model))
    y, yr = model(x), ref(x)  # train mode: batch statistics
    assert y.shape == (2, 10)
    torch.testing.assert_close(y, yr)
    y.square().sum().backward()
    yr.square().sum().backward()
    for (name, p), pr in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, pr.grad, msg=name)
    for b, br in zip(model.buffers(), ref.buffers()):  # running statistics updated alike
        torch.testing.assert_close(b, br)


def test_cifar100_head_and_eval():
    model = models.shiftresnet56(num_classes=100, expansion=1, impl="torch").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)
