#!/usr/bin/env bash
# Compile one C++ or CUDA source of csrc/ on its own (syntax + codegen, no link), with the flags
# setup.py uses, so a kernel can be checked without rebuilding the whole extension:
#   bash .ci/compile_one.sh csrc/<op>/<op>_cuda.cu
set -euo pipefail
src=$1
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(command -v python)
inc=$($py - <<'PY'
import glob, os, torch
from torch.utils import cpp_extension
dirs = cpp_extension.include_paths(device_type="cuda") if torch.version.cuda else cpp_extension.include_paths()
try:
    import nvidia
    dirs += glob.glob(os.path.join(nvidia.__path__[0], "cu*", "include"))
except ImportError:
    pass
import sysconfig
dirs.append(sysconfig.get_paths()["include"])
print(" ".join("-I" + d for d in dirs))
PY
)
ver=$($py -c 'import torch; print(torch.__version__)')
common="-I$root/csrc $inc -DFASTBLOCKS_WITH_CUDA -DFASTBLOCKS_TORCH_VERSION=\"$ver\" -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -std=c++20 -O3"
out=/tmp/compile_one.$$.o
case "$src" in
  *.cu)
    cuda_home=${CUDA_HOME:-/usr/local/cuda-13.0}
    "$cuda_home/bin/nvcc" -c "$src" -o "$out" $common --expt-relaxed-constexpr --extended-lambda \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -fPIC -gencode=arch=compute_90,code=sm_90 ;;
  *) g++ -c "$src" -o "$out" $common -fPIC -fopenmp -Wall ;;
esac
rm -f "$out"
echo "compiled $src"
