"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU, and report the
resources of each compiled kernel, Triton's and the CUDA extension's.

The Triton interpreter checks what the kernels compute, in float32 / float64 only; it never runs
Triton's compiler, so a kernel that does not lower (a bf16 / fp16 load or store, a layout or
constexpr the compiler rejects) or that spills registers would only show on a GPU. This runs the
ops' real Triton host code on CPU tensors with a compile-only driver: each launch compiles for
sm_90 (Triton -> PTX -> ptxas -> cubin, the toolchain Triton ships) and launches nothing, so every
variant the host code would pick (dtype, layout, block sizes, constexprs) is compiled exactly as
on the GPU. ``cuobjdump -res-usage`` then gives registers, spill (local) bytes and shared memory
per kernel; for the CUDA extension it reads the sm_90 code in ``fastblocks._C``.

    python -m tests.sm90_compile [--json FILE]   # TRITON_INTERPRET must not be set

Exit status 1 if a kernel fails to compile. tests/test_sm90_compile.py runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

ARCH = 90
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ACTIVATIONS = ("silu", "hardswish", "relu", "relu6", "none")


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resource_usage(binary_path: str) -> dict[str, dict[str, int]]:
    """{mangled function name: {"REG", "STACK", "SHARED", "LOCAL"}} of a cubin or a shared library."""
    out = subprocess.run([_cuobjdump(), "-res-usage", binary_path], capture_output=True, text=True, check=True).stdout
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\n\s+(.*)", out):
        usage[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", fields)}
    return usage


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: an sm_90 target, device 0, stream 0, no launches."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", ARCH, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _install_compile_only(compiled: list) -> None:
    """Every ``kernel[grid](...)`` compiles (cached per variant, as on a GPU) and returns unlaunched."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import fastblocks._backend

    driver.set_active(_CompileOnlyDriver())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    fastblocks._backend.triton_unavailable = lambda device, dtype: None  # CPU tensors, any dtype
    fastblocks._backend._why_not_cache.clear()


def _cases():
    """(description, thunk) for every Triton code path: forward, backward, train and eval."""
    import fastblocks.nn as fnn
    from fastblocks import ops

    def step(module, x, train=True):
        module.train(train)
        x = x.detach().requires_grad_(train)
        y = module(x)
        if train:
            y.backward(torch.ones_like(y))

    def image(dtype, layout, shape=(2, 64, 28, 28)):
        return torch.randn(shape, dtype=dtype).contiguous(memory_format=layout)

    layouts = (torch.contiguous_format, torch.channels_last)
    for dtype in DTYPES:
        for layout in layouts:
            tag = f"{str(dtype)[6:]} {'NHWC' if layout is torch.channels_last else 'NCHW'}"
            # the GPU benchmark configuration (k3 SiLU) at both strides, every dtype and layout
            for stride in (1, 2):
                m, x = fnn.DWConvBNAct(64, 3, stride, impl="triton").to(dtype), image(dtype, layout)
                yield f"dwconv_bn_act k3 s{stride} silu {tag}", lambda m=m, x=x: (step(m, x), step(m, x, False))
            yield f"bn_act {tag}", lambda x=image(dtype, layout): _bn_act_step(ops, x)
            yield f"bn_act channel slice {tag}", lambda x=image(dtype, layout)[:, 8:40]: _bn_act_step(ops, x)
            yield f"bn_act backward into a gradient buffer {tag}", lambda x=image(dtype, layout): (
                _bn_act_backward_into(x))
            se = fnn.SqueezeExcite(64, 16, impl="triton").to(dtype)
            yield f"squeeze_excite {tag}", lambda x=image(dtype, layout): step(se, x)
            for stride in (1, 2):
                yield f"shift k3 s{stride} {tag}", lambda s=stride, x=image(dtype, layout): step(
                    fnn.Shift(64, 3, 1, s, impl="triton"), x)
            yield f"hardswish / hardsigmoid / gate {tag}", lambda x=image(dtype, layout): _activation_steps(ops, x)
    # every activation and kernel size, in the H100 benchmark dtype and layout
    for k in (3, 5, 7):
        for act in ACTIVATIONS:
            m = fnn.DWConvBNAct(64, k, activation=None if act == "none" else act, impl="triton")
            m, x = m.to(torch.bfloat16), image(torch.bfloat16, torch.channels_last)
            yield f"dwconv_bn_act k{k} {act} bf16 NHWC", lambda m=m, x=x: (step(m, x), step(m, x, False))
    for act in ACTIVATIONS:
        yield f"bn_act {act} bf16 NHWC", lambda act=act, x=image(torch.bfloat16, torch.channels_last): _bn_act_step(
            ops, x, act)
    se = fnn.SqueezeExcite(64, 16, torch.nn.SiLU, torch.nn.Hardsigmoid, impl="triton").to(torch.bfloat16)
    yield "squeeze_excite silu / hardsigmoid bf16 NHWC", lambda: step(se, image(torch.bfloat16, torch.channels_last))
    # small planes pick other block sizes
    x = image(torch.bfloat16, torch.contiguous_format, (2, 64, 7, 7))
    m = fnn.DWConvBNAct(64, 5, impl="triton").to(torch.bfloat16)
    yield "dwconv_bn_act k5 s1 on 7x7 bf16 NCHW", lambda: step(m, x)
    yield "shift k5 dilation 2 on 7x7 bf16 NCHW", lambda: step(fnn.Shift(64, 5, 2, impl="triton"), x)


def _bn_act_step(ops, x, activation="relu"):
    C = x.shape[1]
    w = torch.ones(C, dtype=torch.float32, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float32, requires_grad=True)
    xg = x.detach().requires_grad_()
    y = ops.bn_act(xg, w, b, activation=activation, impl="triton")[0]
    y.backward(torch.ones_like(y))
    ops.bn_act(x, w, b, torch.zeros(C), torch.ones(C), training=False, activation=activation, impl="triton")


def _bn_act_backward_into(image):
    """DenseNet's backward: dx of the channel slice image[:, 8:40] added into a buffer laid out like image."""
    from fastblocks.ops.bn_act import bn_act_backward
    x, grad_x = image[:, 8:40], torch.zeros_like(image)[:, 8:40]
    p = torch.ones(x.shape[1])
    bn_act_backward(torch.ones_like(x), x, p, p, p, p, True, "relu", "triton", grad_x=grad_x)


def _activation_steps(ops, x):
    for fn in (ops.hardswish, ops.hardsigmoid):
        xg = x.detach().requires_grad_()
        fn(xg, impl="triton").sum().backward()
    xg, g = x.detach().requires_grad_(), x.mean((2, 3)).detach().requires_grad_()
    ops.hardsigmoid_gate(xg, g, impl="triton").sum().backward()


def _kernel_row(name: str, kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        (usage,) = resource_usage(f.name).values()
    fn = kernel.src.fn
    arg = fn.arg_names
    return {"kernel": f"{fn.__module__.split('.')[-1]}.{name}", "hash": kernel.hash,
            "pointers": sorted({str(v)[1:] for v in kernel.src.signature.values() if str(v).startswith("*")}),
            "constants": {arg[k[0]] if isinstance(k, tuple) else k: str(v) for k, v in kernel.src.constants.items()},
            "num_warps": kernel.metadata.num_warps, **usage}


def _compile_share(worker: int, workers: int) -> tuple[list[dict], list[str]]:
    """Compile the cases ``worker``, ``worker + workers``, ... (one process each: compiling is serial)."""
    compiled, failures = [], []
    _install_compile_only(compiled)
    for i, (description, thunk) in enumerate(_cases()):
        if i % workers != worker:
            continue
        try:
            thunk()
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            failures.append(f"{description}: {type(e).__name__}: {e}")
    unique = {id(k): (name, k) for name, k in compiled}
    return [_kernel_row(name, k) for name, k in unique.values()], failures


def _defined_kernels() -> set[str]:
    """Every ``@triton.jit`` kernel (``*_kernel``) of fastblocks.ops, as ``module.name``."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fastblocks.ops

    names = set()
    for info in pkgutil.iter_modules(fastblocks.ops.__path__):
        module = importlib.import_module(f"fastblocks.ops.{info.name}")
        names |= {f"{info.name}.{k}" for k, v in vars(module).items()
                  if isinstance(v, JITFunction) and k.endswith("_kernel")}
    return names


def compile_all(workers: int) -> tuple[list[dict], list[str]]:
    """(one row per compiled Triton kernel variant, failures): a case that raised, or a kernel that
    was not compiled for every dtype."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        shares = list(pool.map(_compile_share, range(workers), [workers] * workers))
    rows = list({r["hash"]: r for share_rows, _ in shares for r in share_rows}.values())  # workers overlap
    failures = [f for _, share_failures in shares for f in share_failures]
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        missing = _defined_kernels() - {r["kernel"] for r in rows if dtype in r["pointers"]}
        if missing:
            failures.append(f"not compiled for {dtype}: {', '.join(sorted(missing))}")
    return rows, failures


def extension_usage() -> list[dict]:
    """Resources of the sm_90 kernels in fastblocks._C (empty when it was built without CUDA)."""
    import fastblocks._ext as ext

    if not ext.cuda_kernels_built():
        return []
    usage = resource_usage(ext._C.__file__)
    names = subprocess.run(["c++filt"], input="\n".join(usage), capture_output=True, text=True).stdout.split("\n")
    return [{"kernel": _short(demangled), **u} for demangled, u in zip(names, usage.values())]


def _short(demangled: str) -> str:
    """``dz_kernel<bf16, 7, 4>(...)`` out of a demangled kernel signature."""
    name = demangled.removeprefix("void ")
    for long, short in (("fastblocks::", ""), ("(anonymous namespace)::", ""), ("c10::BFloat16", "bf16"),
                        ("c10::Half", "half")):
        name = name.replace(long, short)
    return name


def summary(rows: list[dict], key) -> list[str]:
    by = collections.defaultdict(list)
    for r in rows:
        by[key(r)].append(r)
    lines = []
    for name, rs in sorted(by.items()):
        regs = sorted(r["REG"] for r in rs)
        local = max(r["LOCAL"] + r["STACK"] for r in rs)
        lines.append(f"{name:40s} {len(rs):4d} variants  registers {regs[0]:3d}-{regs[-1]:3d}  "
                     f"max local + stack bytes {local}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every kernel variant and its resources here")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="compiling processes (default: one per core)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sm90_compile: unset TRITON_INTERPRET (the interpreter never compiles)", file=sys.stderr)
        return 2
    rows, failures = compile_all(args.workers)
    cuda_rows = extension_usage()
    print(f"Triton kernels compiled for sm_{ARCH}: {len(rows)} variants")
    print("\n".join(summary(rows, lambda r: r["kernel"])))
    if cuda_rows:
        print(f"CUDA kernels in fastblocks._C (sm_{ARCH}): {len(cuda_rows)}")
        print("\n".join(summary(cuda_rows, lambda r: re.match(r"[\w:]+", r["kernel"])[0])))
    for f in failures:
        print("FAILED", f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": ARCH, "triton": rows, "cuda": cuda_rows, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
