"""Builds fastblocks' CUDA kernels (csrc/*/*.cu) for the CPU emulator and loads them.

The sources are copied with three rewrites, then compiled as C++ with cuda_emu.h force-included:
  - kernel<<<grid, block, smem, stream>>>(args);  ->  cuda_emu::launch([&] { kernel(args); }, grid, block, smem, stream);
  - extern __shared__ T name[];                    ->  T* name = <the emulator's dynamic shared memory>;
  - the op library fastblocks_ext becomes fastblocks_cuda_emu, and the CUDA registrations are made
    for CPU tensors (the CPU kernels' registrations are dropped), so that the emulated CUDA kernels
    are torch.ops.fastblocks_cuda_emu.<op> on CPU tensors, beside the real CPU ones.

    python -m tests.cuda_emu.build     # builds (incrementally, under build/cuda_emu) and lists the ops
"""
from __future__ import annotations

import fcntl
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = "fastblocks_cuda_emu"

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<> ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_KERNEL_NAME = re.compile(r"[\w:]+(<.*>)?", re.S)


def _closing(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == open_ch) - (text[i] == close_ch)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {open_ch!r} at offset {start}")


def rewrite_launches(text: str, path: str) -> str:
    """Every `kernel<<<config>>>(args);` statement as a cuda_emu::launch call."""
    out, pos = [], 0
    while (open_ := text.find("<<<", pos)) != -1:
        stmt_start = max(text.rfind(c, 0, open_) for c in ";{}") + 1
        stmt = text[stmt_start:open_]
        kernel = stmt.strip()
        if not _KERNEL_NAME.fullmatch(kernel):
            raise ValueError(f"{path}: cannot parse the kernel of the launch {kernel!r}<<<...")
        close = text.index(">>>", open_)
        config = text[open_ + 3:close]
        args_open = text.index("(", close)
        args_close = _closing(text, args_open, "(", ")")
        if text[close + 3:args_open].strip() or not text[args_close + 1:].lstrip().startswith(";"):
            raise ValueError(f"{path}: unexpected text around the launch of {kernel}")
        out.append(text[pos:stmt_start] + stmt[: len(stmt) - len(stmt.lstrip())])  # keep the indentation
        out.append(f"::cuda_emu::launch([&] {{ {kernel}({text[args_open + 1:args_close]}); }}, {config})")
        pos = args_close + 1
    return "".join(out) + text[pos:]


def rewrite(text: str, path: str) -> str:
    text = text.replace("fastblocks_ext", LIBRARY)
    if path.endswith(".cpp"):  # a CPU kernel file: keep its schemas and helpers, not its kernels
        text = text.replace(f"TORCH_LIBRARY_IMPL({LIBRARY}, CPU, m)",
                            "[[maybe_unused]] static void cpu_kernels_not_emulated(torch::Library& m)")
    text = text.replace(f"TORCH_LIBRARY_IMPL({LIBRARY}, CUDA, m)", f"TORCH_LIBRARY_IMPL({LIBRARY}, CPU, m)")
    text = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::cuda_emu::dynamic_shared());", text)
    return rewrite_launches(text, path) if "<<<" in text else text


def cuda_ops() -> set[str]:
    """The ops the .cu files register for CUDA tensors."""
    ops = set()
    for f in glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")):
        with open(f) as fh:
            block = fh.read().partition("TORCH_LIBRARY_IMPL(fastblocks_ext, CUDA, m)")[2]
        ops |= set(re.findall(r'm\.impl\("(\w+)"', block))
    return ops


def _sources() -> list[str]:
    csrc = os.path.join(ROOT, "csrc")
    files = sorted(glob.glob(os.path.join(csrc, "*.*")) + glob.glob(os.path.join(csrc, "*", "*.*")))
    return [f for f in files if os.path.basename(f) != "fastblocks.cpp"]  # the Python module: not needed


def load(verbose: bool = False) -> str:
    """Builds (when the sources changed) and loads the emulated kernels; returns the library name.
    With CUDA_EMU_ASAN=1 the kernels are built with AddressSanitizer, which catches their reads and
    writes outside the tensors; the process needs the ASan runtime preloaded (tests/cuda_emu/asan.sh)."""
    import torch
    from torch.utils import cpp_extension

    if hasattr(torch.ops, LIBRARY) and hasattr(getattr(torch.ops, LIBRARY), "shift_forward"):
        return LIBRARY
    asan = os.environ.get("CUDA_EMU_ASAN") == "1"
    out_dir = os.path.join(ROOT, "build", "cuda_emu_asan" if asan else "cuda_emu")  # ninja rebuilds what changed
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sources.lock"), "w") as lock:  # pytest-xdist workers build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        compiled = [_write_rewritten(f, os.path.join(out_dir, "src")) for f in _sources()]
        cpp_extension.load(
            name=LIBRARY, sources=[f for f in compiled if f.endswith(".cpp")] + [os.path.join(HERE, "cuda_emu.cpp")],
            build_directory=out_dir, is_python_module=False, verbose=verbose,
            extra_include_paths=[os.path.join(HERE, "include"), HERE, os.path.join(out_dir, "src")],
            # -O1: fibers make the emulated kernels slow anyway; no strict aliasing for the kernels'
            # reinterpret_cast vector loads; hidden symbols, or fastblocks._C's calls to its own
            # non-inline functions (same names) would bind to this library's copies once it is loaded.
            extra_cflags=["-O1", "-fno-strict-aliasing", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                          "-fopenmp", "-include", os.path.join(HERE, "cuda_emu.h"),
                          "-Wno-unknown-pragmas"] + (["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []),
            extra_ldflags=["-fopenmp"] + (["-fsanitize=address"] if asan else []))
    return LIBRARY


def _write_rewritten(path: str, src_dir: str) -> str:
    """Writes the rewritten copy of csrc file `path` under src_dir (.cu as _emu.cpp); returns its path.
    An unchanged copy is not rewritten, so that ninja does not rebuild it."""
    rel = os.path.relpath(path, os.path.join(ROOT, "csrc"))
    dst = os.path.join(src_dir, rel[:-3] + "_emu.cpp" if rel.endswith(".cu") else rel)
    with open(path) as fh:
        text = rewrite(fh.read(), rel)
    if os.path.exists(dst) and open(dst).read() == text:
        return dst
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(dst + ".tmp", dst)
    return dst


if __name__ == "__main__":
    import torch

    lib = load(verbose=True)
    ops = sorted(cuda_ops())
    missing = [op for op in ops if not hasattr(getattr(torch.ops, lib), op)]
    print(f"torch.ops.{lib}: {len(ops)} emulated CUDA ops" + (f", missing {missing}" if missing else ""))
