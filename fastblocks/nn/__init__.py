"""Drop-in modules (torchvision / timm constructor signatures and state_dict keys). One import line per file."""
from fastblocks.nn.activations import HardSigmoid, HardSwish  # noqa: F401
from fastblocks.nn.blocks import BatchNormAct2d, ConvNormAct, Fire, FusedMBConv, InvertedResidual, MBConv  # noqa: F401
from fastblocks.nn.densenet import DenseBlock, DenseLayer, Transition  # noqa: F401
from fastblocks.nn.dwconv import DWConvBNAct  # noqa: F401
from fastblocks.nn.shift import Shift  # noqa: F401
from fastblocks.nn.squeeze_excite import SqueezeExcite  # noqa: F401
