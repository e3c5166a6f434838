"""The one benchmark harness: PyTorch eager, torch.compile and each fastblocks backend, side by side.

Run everything (the README's main command):

    pytest bench --benchmark-only                      # auto: GPU with full sizes if present, else CPU quick
    pytest bench --benchmark-only --device cpu --size quick -k hardswish
    pytest bench --benchmark-only --dtype bfloat16 --layout channels_last

Options (bench/conftest.py): --device {auto,cpu,cuda}, --dtype {auto,float32,bfloat16,float16},
--layout {channels_last,contiguous}, --size {auto,quick,full}, --rounds N, --results-dir DIR,
--compile-models (also torch.compile whole models on the quick size set; slow on a CPU).
After the run, bench/results/<device>-<dtype>-<layout>-<date>.{json,md,png} hold the pytest-benchmark JSON (with
extra_info), the Markdown ratio tables and a chart (see bench/report.py; compare two runs with
`python -m bench.report compare OLD.json NEW.json`).

Writing a benchmark (one file per op or model family, bench/test_<name>.py):

    from bench.harness import VARIANTS

    CASES = {"quick": [(4, 40, 28, 28)], "full": [(64, 240, 28, 28)]}

    @pytest.mark.parametrize("variant", VARIANTS)              # eager, compile, fastblocks-<backend>
    @pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
    @pytest.mark.parametrize("case", range(2))                  # index into CASES[size]
    def test_hardswish(fb_bench, variant, pass_, case):
        shape = fb_bench.case(CASES, case)                      # skips when the size set has fewer cases
        x = fb_bench.input(shape, requires_grad=pass_ != "forward")
        fn = fb_bench.pick(variant, "hardswish", eager=F.hardswish,
                           fastblocks=lambda impl: functools.partial(ops.hardswish, impl=impl))
        fb_bench.run(fn, x, op="hardswish", case=shape, pass_=pass_, bytes_moved=2 * x.nbytes)

`pick` (call it first: it records the variant) skips a fastblocks backend that cannot run here (and the Triton interpreter on CPU: it is a
correctness tool, not a fast path). `run` times ``fn(*args)`` (plus ``backward`` of the output for
"forward+backward"; the grads of ``args`` and of ``params`` are reset each round), synchronises CUDA
inside the timed function, compiles outside the timing (reported as extra_info["compile_s"]), and
records peak memory (CUDA), bytes saved for backward (saved_tensors_hooks, any device), bytes moved
per call and the fraction of copy bandwidth, and items/s when ``items`` (e.g. the batch size) is given.
For a whole training step, pass a function that does the step and ``pass_="train"``; add anything
else with ``extra={...}``, or with ``after=lambda: {...}`` for what must be measured after the timing
(e.g. ``saved_bytes`` of a forward alone: a forward whose graph is dropped unused leaves the CPU
allocator in a state that slowed later training steps by up to 1.5x on this machine).
"""
from __future__ import annotations

import functools
import platform
import statistics
import time
from dataclasses import dataclass

import pytest
import torch

import fastblocks
from fastblocks import _ext
from fastblocks._backend import BACKENDS, why_not

FASTBLOCKS_BACKENDS = tuple(b for b in BACKENDS if b != "torch")  # fastblocks' "torch" backend is eager
VARIANTS = ["eager", "compile"] + [f"fastblocks-{b}" for b in FASTBLOCKS_BACKENDS]


@dataclass
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    layout: str
    size: str
    rounds: int | None
    compile_models: bool = False


def _cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and thread count (results files are named after it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} x{torch.get_num_threads()}"


def versions() -> dict:
    """Software versions, and the vector width the C++ CPU kernels were built with (csrc/cpu_simd.h)."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "fastblocks": fastblocks.__version__,
            "cpu_simd_bytes": getattr(_ext._C, "simd_bytes", None)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pass_wrapper(pass_: str):
    """How a benchmark pass calls a module: "eval" runs it under ``torch.no_grad()`` (inference), the
    training passes call it as it is."""
    if pass_ != "eval":
        return lambda module: module

    def inference(module):
        def run(*args):
            with torch.no_grad():
                return module(*args)
        return run
    return inference


def saved_bytes(fn, *args) -> int:
    """Bytes of unique storages autograd saves for backward during one call of ``fn``."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return sum(storages.values())


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: torch.device) -> float:
    """Achievable copy bandwidth in bytes/s (read + write), the roofline for memory-bound ops."""
    n = (256 << 20) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(20 if device.type == "cuda" else 7):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    # the statistic the cases are timed with (FbBench.run): median on a GPU, minimum on a CPU
    return 2 * n / (statistics.median(times) if device.type == "cuda" else min(times))


class FbBench:
    def __init__(self, benchmark, config: BenchConfig, progress):
        self.benchmark = benchmark
        self.cfg = config
        self.device = config.device
        self.progress = progress
        self.variant = None

    # -- inputs ----------------------------------------------------------------------------------
    def case(self, cases: dict, index: int):
        options = cases[self.cfg.size]
        if index >= len(options):
            pytest.skip(f"no case {index} in the {self.cfg.size!r} size set")
        return options[index]

    def input(self, shape, requires_grad=False, dtype=None) -> torch.Tensor:
        x = torch.randn(shape, device=self.device, dtype=dtype or self.cfg.dtype)
        if self.cfg.layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(requires_grad)

    def module(self, m: torch.nn.Module) -> torch.nn.Module:
        """Move a module to the configured device, dtype and layout."""
        m = m.to(self.device, self.cfg.dtype)
        return m.to(memory_format=torch.channels_last) if self.cfg.layout == "channels_last" else m

    # -- variants --------------------------------------------------------------------------------
    def pick(self, variant: str, op: str, eager, fastblocks, whole_model: bool = False):
        """The callable for ``variant``: ``eager``, ``torch.compile(eager)`` or ``fastblocks(impl)``.

        With ``whole_model``, the compile variant is skipped on the quick size set unless
        --compile-models is given: inductor needs minutes per model on a 2-core CPU.
        """
        self.variant = variant
        if variant == "eager":
            return eager
        if variant == "compile":
            if whole_model and self.cfg.size == "quick" and not self.cfg.compile_models:
                pytest.skip("compiling a whole model takes minutes on a CPU; use --compile-models or --size full")
            torch._dynamo.reset()
            return torch.compile(eager)
        impl = variant.removeprefix("fastblocks-")
        if impl == "triton" and self.device.type == "cpu":
            pytest.skip("the Triton interpreter is a correctness tool, not benchmarked")
        reason = why_not(op, impl, self.device, self.cfg.dtype)
        if reason:
            pytest.skip(f"{impl}: {reason}")
        return fastblocks(impl)

    def train_step(self, model: torch.nn.Module, shape, num_classes: int = 1000, lr: float = 0.01):
        """An SGD training step of ``model`` on one random batch of ``shape``; returns (step, x, params)."""
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
        x = self.input(shape)
        target = torch.randint(0, num_classes, (shape[0],), device=x.device)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        return step, x, params

    # -- timing ----------------------------------------------------------------------------------
    def run(self, fn, *args, op: str, case, pass_: str = "forward", bytes_moved: int | None = None,
            items: int | None = None, params=(), extra: dict | None = None, after=None):
        device = self.device
        grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + list(params)
        backward = pass_ == "forward+backward"

        def once():
            out = fn(*args)
            if backward:
                first = out[0] if isinstance(out, (tuple, list)) else out
                first.backward(torch.ones_like(first))
                for t in grads:
                    t.grad = None
            return out

        def timed():
            once()
            _sync(device)

        t0 = time.perf_counter()
        timed()  # first call: compilation, autotuning, allocator warm-up
        first_s = time.perf_counter() - t0
        if first_s > 5:
            self.progress(f"  warm-up of {self.benchmark.name} took {first_s:.1f}s")
        timed()

        info = self.benchmark.extra_info
        info.update(op=op, variant=self.variant, case=str(tuple(case) if isinstance(case, (list, tuple)) else case), pass_=pass_,
                    device=device_name(device), dtype=str(self.cfg.dtype).removeprefix("torch."),
                    layout=self.cfg.layout, size=self.cfg.size, **versions())
        if self.variant == "compile":
            info["compile_s"] = round(first_s, 3)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            timed()
            info["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            info["peak_extra_bytes"] = info["peak_mem_bytes"] - base
        info.update(extra or {})

        rounds = self.cfg.rounds or (50 if device.type == "cuda" else 15)
        self.benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2)
        # A GPU's rounds are steady: their median. A shared CPU's are not: bursts of other work slow
        # whole runs of rounds, often most of one variant's, so a median there ranks variants by
        # when they ran; the minimum (timeit's advice) is the time of the work itself.
        info["statistic"] = "median" if device.type == "cuda" else "min"
        seconds = getattr(self.benchmark.stats.stats, info["statistic"])
        if backward:
            info["saved_bytes"] = saved_bytes(fn, *args)
        info.update(after() if after else {})
        if bytes_moved:
            info["bytes_moved"] = int(bytes_moved)
            info["gbps"] = round(bytes_moved / seconds / 1e9, 2)
            info["copy_bw_frac"] = round(bytes_moved / seconds / copy_bandwidth(device), 3)
        if items:
            info["items"] = items
            info["items_per_s"] = round(items / seconds, 1)
