"""Drop-in modules (torchvision / timm constructor signatures and state_dict keys)."""
from fastblocks.nn.activations import HardSigmoid, HardSwish

__all__ = ["HardSwish", "HardSigmoid"]
