"""Builds fastblocks._C: C++ CPU kernels always, CUDA kernels whenever they can be compiled.

Environment:
  FASTBLOCKS_NO_EXT=1      pure-Python install (torch and Triton backends only)
  FASTBLOCKS_NO_CUDA=1     build the C++ CPU kernels only (fast local iteration)
  FASTBLOCKS_FORCE_CUDA=1  fail instead of silently skipping the CUDA kernels
  TORCH_CUDA_ARCH_LIST     CUDA architectures; default "8.0;9.0" when no GPU is visible
  CUDA_HOME                the CUDA toolkit; guessed from nvcc on PATH or /usr/local/cuda-<torch's CUDA>
  FASTBLOCKS_SIMD_BYTES    vector width of the C++ CPU kernels (16, 32 or 64); default: the building
                           CPU's registers (64 with AVX-512F, 32 with AVX2; see csrc/cpu_simd.h)
"""
import glob
import os
import platform
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _guess_cuda_home():
    """Point CUDA_HOME at a toolkit that matches torch before cpp_extension reads it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import torch

    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    if torch.version.cuda:
        candidates.append(f"/usr/local/cuda-{torch.version.cuda}")
        candidates += sorted(glob.glob(f"/usr/local/cuda-{torch.version.cuda.split('.')[0]}*"), reverse=True)
    candidates.append("/usr/local/cuda")
    # A usable toolkit has nvcc and the runtime library to link against (/usr/local has only nvcc here).
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart.so")):
            os.environ["CUDA_HOME"] = home
            return


def _simd_bytes():
    """The C++ CPU kernels' vector width: the widest registers of the CPU that builds them (x86-64)."""
    if os.environ.get("FASTBLOCKS_SIMD_BYTES"):
        width = int(os.environ["FASTBLOCKS_SIMD_BYTES"])
        if width not in (16, 32, 64):
            raise ValueError(f"FASTBLOCKS_SIMD_BYTES must be 16, 32 or 64, got {width}")
        return width
    if platform.machine() not in ("x86_64", "AMD64"):
        return 64
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return 64
    return 64 if "avx512f" in flags else 32 if "avx2" in flags else 16


def _nvidia_wheel_includes():
    """Headers that ATen/cuda needs (cusparse.h, ...) ship in the nvidia-* wheels, not in every toolkit."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += glob.glob(os.path.join(base, "cu*", "include")) + glob.glob(os.path.join(base, "*", "include"))
    return sorted(d for d in set(dirs) if os.path.isdir(d))


def _extensions():
    if _flag("FASTBLOCKS_NO_EXT"):
        print("fastblocks: FASTBLOCKS_NO_EXT=1, installing without the compiled extension")
        return [], {}
    _guess_cuda_home()
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/*/*.cu"))
    can_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    use_cuda = can_cuda and not _flag("FASTBLOCKS_NO_CUDA")
    if _flag("FASTBLOCKS_FORCE_CUDA") and not can_cuda:
        raise RuntimeError(
            "FASTBLOCKS_FORCE_CUDA=1 but CUDA cannot be compiled: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    simd_bytes = _simd_bytes()
    print(f"fastblocks: C++ CPU kernels with {simd_bytes}-byte vectors")
    define_macros = [("FASTBLOCKS_TORCH_VERSION", f'"{torch.__version__}"'), ("FB_SIMD_BYTES", str(simd_bytes))]
    extra = {"cxx": ["-O3", "-fopenmp"]}
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        define_macros.append(("FASTBLOCKS_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "--extended-lambda", "-lineinfo"]
        ext_cls, sources = cpp_extension.CUDAExtension, cpp_sources + cu_sources
        print(f"fastblocks: building C++ and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    else:
        why = "FASTBLOCKS_NO_CUDA=1" if can_cuda else "no nvcc / CPU-only torch"
        print(f"fastblocks: building C++ CPU kernels only ({why})")
        ext_cls, sources = cpp_extension.CppExtension, cpp_sources
    ext = ext_cls(
        name="fastblocks._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + (_nvidia_wheel_includes() if use_cuda else []),
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
