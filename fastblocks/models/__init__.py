"""Model builders with torchvision's names and arguments. One import line per file."""
from fastblocks.models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet_bc_100  # noqa: F401,E501
from fastblocks.models.efficientnet import (  # noqa: F401,E501
    EFFICIENTNET_SCALES,
    EfficientNet,
    compound_scaling,
    efficientnet,
    efficientnet_b0,
    efficientnet_b1,
    efficientnet_b2,
    efficientnet_b3,
    efficientnet_b4,
    efficientnet_b5,
    efficientnet_b6,
    efficientnet_b7,
    efficientnet_v2_l,
    efficientnet_v2_m,
    efficientnet_v2_s,
)
from fastblocks.models.mobilenet import MobileNetV2, MobileNetV3, mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small  # noqa: F401,E501
from fastblocks.models.shiftnet import CSCBlock, ShiftResNet, shiftresnet20, shiftresnet56, shiftresnet110  # noqa: F401
from fastblocks.models.squeezenet import SqueezeNet, squeezenet1_0, squeezenet1_1  # noqa: F401
