"""Train DenseNet-BC-100 (k=12) on synthetic CIFAR-shaped data with fastblocks' memory-efficient
DenseNet, and optionally the same network as plain PyTorch (torchvision's DenseNet layers) for comparison.

    python examples/train_densenet.py --steps 300 --batch-size 64 --device cuda
    python examples/train_densenet.py --steps 5 --batch-size 8 --device cpu --compare

Prints images/s and peak memory: CUDA's max_memory_allocated on a GPU; on CPU, where there is no
allocator to ask, the bytes one forward keeps for backward (the activation memory).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fastblocks.models import densenet_bc_100
from fastblocks.models.densenet import saved_bytes

try:
    from tqdm import tqdm
except ImportError:  # a simple progress line instead
    tqdm = None


def torchvision_bc_100(num_classes: int) -> torch.nn.Module:
    """The same DenseNet-BC-100 from torchvision's layers (plain autograd): its stem swapped for a 3x3 conv."""
    from torchvision.models import DenseNet

    model = DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, num_classes=num_classes)
    model.features.conv0 = torch.nn.Conv2d(3, 24, kernel_size=3, padding=1, bias=False)
    for name in ("norm0", "relu0", "pool0"):
        delattr(model.features, name)
    return model


def progress(iterable, total: int, desc: str):
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc)
        return
    for i, item in enumerate(iterable):
        if i % max(1, total // 10) == 0 or i == total - 1:
            print(f"{desc}: step {i + 1}/{total}", flush=True)
        yield item


def train(name: str, model: torch.nn.Module, args, device: torch.device) -> None:
    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    generator = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randn(8, args.batch_size, 3, 32, 32, generator=generator)  # a few batches, cycled
    labels = torch.randint(0, 10, (8, args.batch_size), generator=generator)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int) -> float:
        x = data[i % 8].to(device).contiguous(memory_format=memory_format)
        with autocast:
            loss = F.cross_entropy(model(x), labels[i % 8].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    for i in range(min(3, args.steps)):  # warm-up (kernel compilation, allocator)
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, loss = time.perf_counter(), float("nan")
    for i in progress(range(args.steps), args.steps, name):
        loss = step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        memory = f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    else:
        x = data[0].to(device)
        kept, _ = saved_bytes(lambda: model(x), tuple(model.parameters()))
        memory = f"peak memory n/a on CPU; kept for backward {kept / 2**20:.1f} MiB per step"
    print(f"{name}: {args.steps * args.batch_size / seconds:.1f} img/s, {memory}, final loss {loss:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", default="auto", choices=["auto", "torch", "triton", "cpp", "cuda"])
    parser.add_argument("--compare", action="store_true", help="also train the plain torchvision-style network")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    train(f"fastblocks densenet_bc_100 (impl={args.impl})", densenet_bc_100(num_classes=10, impl=args.impl), args,
          device)
    if args.compare:
        torch.manual_seed(0)
        train("torchvision-style plain", torchvision_bc_100(num_classes=10), args, device)


if __name__ == "__main__":
    main()
