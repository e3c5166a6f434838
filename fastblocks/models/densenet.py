"""DenseNet-121 / 161 / 169 / 201 (torchvision's names, arguments, parameter counts and state_dict keys)
and DenseNet-BC-100 for CIFAR, built from the memory-efficient blocks of ``fastblocks.nn.densenet``.

A torchvision DenseNet's ``state_dict`` loads unchanged. Besides the dense blocks, the stem's
BN + ReLU + max pool, each transition and the final BN + ReLU + global pool keep only their input
for backward (the block buffer, which the block keeps anyway) and recompute the rest.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastblocks.nn.densenet import DenseBlock, Transition, bn_relu_then

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet_bc_100", "saved_bytes"]


def _max_pool(z: Tensor) -> Tensor:
    return F.max_pool2d(z, kernel_size=3, stride=2, padding=1)


def _global_pool(z: Tensor) -> Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(z, (1, 1)), 1)


class DenseNet(nn.Module):
    """torchvision's ``DenseNet`` (same arguments plus ``impl``; ``memory_efficient`` defaults to True).

    ``cifar_stem=True`` replaces the ImageNet stem (7x7 conv stride 2, BN, ReLU, max pool) with one
    3x3 conv (DenseNet-BC for 32x32 inputs); ``compression`` is the transitions' channel factor.
    """

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0, num_classes: int = 1000,
                 memory_efficient: bool = True, impl: str = "auto", cifar_stem: bool = False,
                 compression: float = 0.5):
        super().__init__()
        self.memory_efficient, self.impl, self.cifar_stem = memory_efficient, impl, cifar_stem
        if cifar_stem:
            stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
        else:
            stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                               growth_rate=growth_rate, drop_rate=drop_rate, memory_efficient=memory_efficient,
                               impl=impl)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(num_features * compression)
                self.features.add_module(f"transition{i + 1}", Transition(num_features, out_features,
                                                                          memory_efficient, impl))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features
        x = f.conv0(x)
        if not self.cifar_stem:
            x = bn_relu_then(f.norm0, x, _max_pool, [], self.impl, self.memory_efficient)
        for name, module in f.named_children():
            if name.startswith(("denseblock", "transition")):
                x = module(x)
        x = bn_relu_then(f.norm5, x, _global_pool, [], self.impl, self.memory_efficient)
        return self.classifier(x)


def _densenet(growth_rate: int, block_config: tuple[int, ...], num_init_features: int, num_classes: int,
              memory_efficient: bool, drop_rate: float, impl: str, **kwargs) -> DenseNet:
    return DenseNet(growth_rate, block_config, num_init_features, num_classes=num_classes,
                    memory_efficient=memory_efficient, drop_rate=drop_rate, impl=impl, **kwargs)


def densenet121(num_classes: int = 1000, memory_efficient: bool = True, drop_rate: float = 0.0,
                impl: str = "auto", **kwargs) -> DenseNet:
    """DenseNet-121 (7,978,856 parameters with 1000 classes)."""
    return _densenet(32, (6, 12, 24, 16), 64, num_classes, memory_efficient, drop_rate, impl, **kwargs)


def densenet161(num_classes: int = 1000, memory_efficient: bool = True, drop_rate: float = 0.0,
                impl: str = "auto", **kwargs) -> DenseNet:
    """DenseNet-161 (28,681,000 parameters with 1000 classes)."""
    return _densenet(48, (6, 12, 36, 24), 96, num_classes, memory_efficient, drop_rate, impl, **kwargs)


def densenet169(num_classes: int = 1000, memory_efficient: bool = True, drop_rate: float = 0.0,
                impl: str = "auto", **kwargs) -> DenseNet:
    """DenseNet-169 (14,149,480 parameters with 1000 classes)."""
    return _densenet(32, (6, 12, 32, 32), 64, num_classes, memory_efficient, drop_rate, impl, **kwargs)


def densenet201(num_classes: int = 1000, memory_efficient: bool = True, drop_rate: float = 0.0,
                impl: str = "auto", **kwargs) -> DenseNet:
    """DenseNet-201 (20,013,928 parameters with 1000 classes)."""
    return _densenet(32, (6, 12, 48, 32), 64, num_classes, memory_efficient, drop_rate, impl, **kwargs)


def densenet_bc_100(num_classes: int = 10, memory_efficient: bool = True, drop_rate: float = 0.0,
                    impl: str = "auto") -> DenseNet:
    """DenseNet-BC (L=100, k=12) for 32x32 inputs (Huang et al. 2017): a 3x3 conv stem of 2k channels,
    three dense blocks of 16 bottleneck layers, compression 0.5 (769,162 parameters with 10 classes)."""
    return DenseNet(12, (16, 16, 16), 24, num_classes=num_classes, memory_efficient=memory_efficient,
                    drop_rate=drop_rate, impl=impl, cifar_stem=True)


def saved_bytes(step, exclude: tuple[torch.Tensor, ...] = ()) -> tuple[int, object]:
    """Bytes that ``step()`` (a forward pass) keeps for backward, and its result.

    Counts unique storages, so a buffer that many saved views share counts once; tensors saved by
    autograd (``saved_tensors_hooks``) and the inputs that ``torch.utils.checkpoint`` keeps to
    recompute from (torchvision's ``memory_efficient=True``). Storages of ``exclude`` (e.g. the
    parameters) are not counted. Device-independent: it measures sizes, not an allocator.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def record(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                kept[s.data_ptr()] = s.nbytes()
        return t

    from unittest import mock

    import torch.utils.checkpoint as cp

    original = cp.checkpoint

    def checkpoint(fn, *args, **kwargs):
        for a in args:
            record(a)
        return original(fn, *args, **kwargs)

    with mock.patch.object(cp, "checkpoint", checkpoint), torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        result = step()
    return sum(kept.values()), result
