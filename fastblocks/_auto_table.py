"""Backend order for ``impl="auto"``, per (op, device type); the first backend that can run wins.

Source: no GPU benchmark run yet. Until ``python bench/derive_auto.py bench/results/<gpu run>.json``
rewrites this file from measured results, the order is the design prior: the compiled kernels,
then Triton, then PyTorch. On CPU the Triton interpreter is never chosen automatically.
"""

SOURCE = "design prior (no GPU results yet)"

DEFAULT_AUTO_ORDER = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}

# (op, device type) -> backend order; entries override DEFAULT_AUTO_ORDER.
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {}
