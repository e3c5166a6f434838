"""Per-kernel GPU time of the fused ops, eager against each fastblocks backend (torch.profiler):
which kernel bounds a pass, and how much of a benchmark's wall time is the GPU's at all (the rest is
CPU-side dispatch, which small layers feel).

    python -m bench.profile_gpu [--ops dwconv bn_act squeeze_excite] [--rows 8] [--steps 5]

bf16, channels_last, the first full-size case of each op's benchmark, forward + backward.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

from fastblocks.nn import BatchNormAct2d, DWConvBNAct, SqueezeExcite


def _bn_act(impl):
    ref = nn.Sequential(nn.BatchNorm2d(240), nn.SiLU())
    return ref, BatchNormAct2d(240, activation=nn.SiLU, impl=impl), (64, 240, 28, 28)


def _dwconv(impl):
    ref = Conv2dNormActivation(144, 144, 3, 1, groups=144, activation_layer=nn.SiLU)
    return ref, DWConvBNAct.from_module(ref, impl=impl), (64, 144, 56, 56)


def _squeeze_excite(impl):
    ref = SqueezeExcitation(144, 6, nn.SiLU, nn.Sigmoid)
    return ref, SqueezeExcite.from_module(ref, impl=impl), (64, 144, 56, 56)


OPS = {"dwconv": _dwconv, "bn_act": _bn_act, "squeeze_excite": _squeeze_excite}


def profile_one(module: nn.Module, shape, steps: int, rows: int, device: str = "cuda",
                dtype=torch.bfloat16) -> tuple[str, float, float]:
    module = module.to(device, dtype).to(memory_format=torch.channels_last).train()
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def step():
        y = module(x)
        y.backward(torch.ones_like(y))

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_us = (time.perf_counter() - t0) / steps * 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / steps
    table = events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    return table, gpu_us, wall_us


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.profile_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    p.add_argument("--backends", nargs="+", default=["eager", "cuda", "triton"])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (float32)")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.backends.cudnn.benchmark = True
    for op in args.ops:
        for backend in args.backends:
            ref, fused, shape = OPS[op](backend if backend != "eager" else "torch")
            table, gpu_us, wall_us = profile_one(ref if backend == "eager" else fused, shape, args.steps, args.rows,
                                                 args.device, dtype)
            print(f"\n### {op} {shape} forward+backward, {backend}: {wall_us:.1f} us per step, "
                  f"{gpu_us:.1f} us of it in GPU kernels")
            print(table)


if __name__ == "__main__":
    main()
