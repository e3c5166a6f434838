"""Drop-in modules (torchvision / timm constructor signatures and state_dict keys). One import line per file."""
from fastblocks.nn.activations import HardSigmoid, HardSwish  # noqa: F401
