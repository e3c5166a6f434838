"""``fastblocks.swap``: convert the modules of a torchvision or timm model that fastblocks knows, same tensors.

Known modules, matched by exact type (a subclass may change ``forward``):

- torchvision: ``MBConv``, ``FusedMBConv``, MobileNetV2/V3 ``InvertedResidual``, ``Fire`` (whole
  blocks, same ``state_dict`` keys); a depthwise ``Conv2dNormActivation`` -> :class:`DWConvBNAct`,
  any other with BatchNorm2d and SiLU / ReLU / ReLU6 / hard-swish (the stems and heads) ->
  :class:`ConvNormAct` (fused BatchNorm + activation, the same children),
  ``SqueezeExcitation`` -> :class:`SqueezeExcite` (wherever they appear).
- timm: in ``DepthwiseSeparableConv``, ``InvertedResidual`` and ``ConvBnAct`` the depthwise conv and
  the ``BatchNormAct2d`` after it become one :class:`DWConvBNAct` held by the conv's attribute
  (``conv_dw``), the norm's attribute (``bn1`` / ``bn2``) becomes ``nn.Identity``; timm's
  ``SqueezeExcite`` -> :class:`SqueezeExcite`. The parameters are the same tensors but their keys
  move (``bn2.weight`` -> ``conv_dw.1.weight``): load timm checkpoints before swapping. Any other
  ``BatchNormAct2d`` with SiLU / ReLU / ReLU6 / hard-swish -> fastblocks :class:`BatchNormAct2d`
  (fused, same keys).
- torch: ``nn.Hardswish`` / ``nn.Hardsigmoid`` -> fastblocks :class:`HardSwish` / :class:`HardSigmoid`.

A module whose variant fastblocks does not implement (another norm layer, an odd padding...) is kept
and its children are converted. Everything else is left alone.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from fastblocks.nn.activations import HardSigmoid, HardSwish
from fastblocks.nn.blocks import BatchNormAct2d, ConvNormAct, Fire, FusedMBConv, InvertedResidual, MBConv, adopt
from fastblocks.nn.densenet import DenseBlock, Transition
from fastblocks.nn.dwconv import DWConvBNAct
from fastblocks.nn.squeeze_excite import SqueezeExcite

__all__ = ["swap"]

# A converter returns the replacement, or None when this instance has nothing to convert; a timm
# block is modified in place and returned itself, and its other children are converted after.
Converter = Callable[[nn.Module, str], "nn.Module | None"]

# timm block class name -> (depthwise conv attribute, BatchNormAct2d attribute that follows it)
_TIMM_DEPTHWISE = {"DepthwiseSeparableConv": ("conv_dw", "bn1"), "InvertedResidual": ("conv_dw", "bn2"),
                   "ConvBnAct": ("conv", "bn1")}
_IN_PLACE = "itself, its depthwise conv + BatchNormAct2d fused into a DWConvBNAct"
_FUSABLE_ACTIVATIONS = (nn.SiLU, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Identity)


def swap(model: nn.Module, inplace: bool = False, verbose: bool = False, impl: str = "auto") -> nn.Module:
    """Return ``model`` with every module fastblocks knows replaced by its fastblocks counterpart.

    The replacements hold the same parameter and buffer tensors (so, in place, an optimizer built
    before the swap still trains them), and the model's train/eval mode. ``inplace=False`` converts
    a deep copy. ``impl`` picks the backend of every fused op. ``verbose`` prints what was replaced,
    what was kept and why, and which parameterised modules were left as they were.
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = _Report()
    model = _convert(model, _converters(), impl, report)
    if verbose:
        print(report.summary(model))
    return model


def _convert(module: nn.Module, converters: dict[type, Converter], impl: str, report: _Report) -> nn.Module:
    convert = converters.get(type(module))
    new = None
    if convert is not None:
        try:
            new = convert(module, impl)
        except (TypeError, ValueError) as e:  # a variant fastblocks does not implement: keep it
            report.kept[(_name(type(module)), str(e))] += 1
    if new is not None:
        in_place = new is module
        report.replaced[(_name(type(module)), _IN_PLACE if in_place else _name(type(new)))] += 1
        if not in_place:
            return new.train(module.training)
    for name, child in module.named_children():
        new_child = _convert(child, converters, impl, report)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class _Report:
    def __init__(self):
        self.replaced: Counter[tuple[str, str]] = Counter()
        self.kept: Counter[tuple[str, str]] = Counter()

    def summary(self, model: nn.Module) -> str:
        lines = [f"fastblocks.swap({type(model).__name__}):"]
        lines += [f"  replaced {n:4d} {src} -> {dst}" for (src, dst), n in sorted(self.replaced.items())]
        lines += [f"  kept     {n:4d} {src}: {why}" for (src, why), n in sorted(self.kept.items())]
        left = Counter(_name(type(m)) for m in _foreign_modules(model) if any(True for _ in m.parameters(False)))
        if left:
            lines.append("  left as they were (no fastblocks counterpart): "
                         + ", ".join(f"{n} {name}" for name, n in left.most_common()))
        if len(lines) == 1:
            lines.append("  nothing to replace")
        return "\n".join(lines)


def _name(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def _foreign_modules(module: nn.Module):
    """The modules that are neither fastblocks modules nor inside one."""
    if type(module).__module__.startswith("fastblocks."):
        return
    yield module
    for child in module.children():
        yield from _foreign_modules(child)


# --- converters ------------------------------------------------------------------------------

def _whole(cls) -> Converter:
    return lambda m, impl: cls.from_module(m, impl=impl)


def _fire(m, impl):
    return Fire.from_module(m)


def _hardswish(m, impl):
    return HardSwish(impl=impl)


def _hardsigmoid(m, impl):
    return HardSigmoid(impl=impl)


def _squeeze_excite(m, impl):
    new = SqueezeExcite.from_module(m, impl=impl)
    new.fc1, new.fc2 = (m.conv_reduce, m.conv_expand) if hasattr(m, "conv_reduce") else (m.fc1, m.fc2)  # m's tensors
    return new


def _is_depthwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


def _fused_depthwise(conv_bn_act: nn.Sequential, impl: str) -> DWConvBNAct:
    """DWConvBNAct holding the very tensors of ``conv_bn_act`` (from_module copies them)."""
    return adopt(DWConvBNAct.from_module(conv_bn_act, impl=impl), conv_bn_act)


def _tv_conv_norm_act(m, impl):
    """torchvision Conv2dNormActivation: a DWConvBNAct when depthwise, a ConvNormAct when its BatchNorm and
    activation fuse, else left (its activation may still convert)."""
    if _is_depthwise(m[0]):
        return _fused_depthwise(m, impl)
    new = ConvNormAct.from_module(m, impl)
    return new if new.fused_activation() is not None else None


def _timm_bn_act(m, impl):
    """timm BatchNormAct2d (one not fused into a depthwise conv): fastblocks BatchNormAct2d when it has an
    activation, else left (nothing to fuse)."""
    if type(m.act) is nn.Identity:
        return None
    return BatchNormAct2d.from_module(m, impl)


def _timm_depthwise_block(m, impl):
    """Fuse a timm block's depthwise conv and its BatchNormAct2d into one DWConvBNAct, in place."""
    conv_name, bn_name = _TIMM_DEPTHWISE[type(m).__name__]
    conv, bn = getattr(m, conv_name), getattr(m, bn_name)
    if not _is_depthwise(conv):
        return None
    if type(bn.act) not in _FUSABLE_ACTIVATIONS or not isinstance(bn.drop, nn.Identity):
        raise TypeError(f"{bn_name} has {type(bn.act).__name__} activation / {type(bn.drop).__name__} drop, "
                        "not fusable")
    with torch.device("meta"):
        plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    adopt(plain, bn)
    setattr(m, conv_name, _fused_depthwise(nn.Sequential(conv, plain, bn.act).train(bn.training), impl))
    setattr(m, bn_name, nn.Identity().train(bn.training))
    return m


_CONVERTERS: dict[type, Converter] | None = None


def _check_bn_relu_norms(m: nn.Module, timm_norm: type | None) -> list[nn.BatchNorm2d]:
    """The BatchNorms of a dense block / transition, checked to be what fastblocks' BN + ReLU computes."""
    norms = [n for n in m.modules() if isinstance(n, nn.modules.batchnorm._NormBase)]
    for n in norms:
        if type(n) is timm_norm and timm_norm is not None:
            if type(n.act) is not nn.ReLU or not isinstance(n.drop, nn.Identity):
                raise TypeError(f"BatchNormAct2d with {type(n.act).__name__}: fastblocks fuses BatchNorm + ReLU only")
        elif type(n) is not nn.BatchNorm2d:
            raise TypeError(f"{type(n).__name__} is not converted (nn.BatchNorm2d + ReLU only)")
        if not (n.affine and n.track_running_stats):
            raise TypeError("BatchNorm without affine parameters or running statistics is not converted")
    return norms


def _dense(timm_norm: type | None) -> Converter:
    """torchvision / timm dense block or transition -> fastblocks DenseBlock / Transition (same keys)."""
    def convert(m, impl):
        norms = _check_bn_relu_norms(m, timm_norm)
        with torch.device("meta"):
            if "Transition" in type(m).__name__:
                if type(m.pool) is not nn.AvgPool2d:
                    raise TypeError(f"{type(m.pool).__name__} pooling is not converted (2x2 average pooling only)")
                new = Transition(m.conv.in_channels, m.conv.out_channels, impl=impl)
            else:
                layers = list(m.children())
                growth_rate = layers[0].conv2.out_channels
                new = DenseBlock(len(layers), layers[0].conv1.in_channels, layers[0].conv1.out_channels // growth_rate,
                                 growth_rate, layers[0].drop_rate, impl=impl)
        adopt(new, m)
        for old_norm, new_norm in zip(norms, (n for n in new.modules() if isinstance(n, nn.BatchNorm2d))):
            new_norm.eps, new_norm.momentum = old_norm.eps, old_norm.momentum
        return new
    return convert


def _converters() -> dict[type, Converter]:
    """Exact module type -> converter, for the libraries that are installed (looked up once)."""
    global _CONVERTERS
    if _CONVERTERS is not None:
        return _CONVERTERS
    table: dict[type, Converter] = {nn.Hardswish: _hardswish, nn.Hardsigmoid: _hardsigmoid}
    try:
        from torchvision.models import densenet, efficientnet, mobilenetv2, mobilenetv3, squeezenet
        from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation
    except ImportError:
        pass
    else:
        table.update({
            efficientnet.MBConv: _whole(MBConv),
            efficientnet.FusedMBConv: _whole(FusedMBConv),
            mobilenetv2.InvertedResidual: _whole(InvertedResidual),
            mobilenetv3.InvertedResidual: _whole(InvertedResidual),
            squeezenet.Fire: _fire,
            Conv2dNormActivation: _tv_conv_norm_act,
            SqueezeExcitation: _squeeze_excite,
            densenet._DenseBlock: _dense(None),
            densenet._Transition: _dense(None),
        })
    try:
        from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
        from timm.models import _efficientnet_blocks as timm_blocks
        from timm.models import densenet as timm_densenet
    except ImportError:
        pass
    else:
        table.update({getattr(timm_blocks, name): _timm_depthwise_block for name in _TIMM_DEPTHWISE})
        table[timm_blocks.SqueezeExcite] = _squeeze_excite
        table[TimmBatchNormAct2d] = _timm_bn_act
        table[timm_densenet.DenseBlock] = _dense(TimmBatchNormAct2d)
        table[timm_densenet.DenseTransition] = _dense(TimmBatchNormAct2d)
    _CONVERTERS = table
    return table
