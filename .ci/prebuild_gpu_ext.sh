#!/usr/bin/env bash
# Builds fastblocks._C on this (CPU) machine for the GPU machine of the `device` tool, which has Python
# 3.12 and torch 2.11.0+cu130 and takes minutes of its scarce time to compile the extension itself.
# Writes fastblocks/_C.cpython-312-x86_64-linux-gnu.so (sm_90, debug info stripped so that it fits a
# carry) and, beside it, the SHA-256 of the sources it was built from; .ci/gpu_session.sh uses the
# library only while that hash matches csrc/ and setup.py, and builds on the GPU machine otherwise.
#
#   bash .ci/prebuild_gpu_ext.sh     # ~15 min on 2 cores the first time; the venv is kept in $VENV
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/fastblocks-gpu-venv}
TORCH=${GPU_TORCH:-2.11.0}
py312=${PYTHON312:-$(command -v python3.12 || ls -d "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
[ -x "$py312" ] || { echo "prebuild: no python3.12 found (set PYTHON312)"; exit 1; }

if ! "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH')" 2>/dev/null; then
  "$py312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel ninja
  "$VENV/bin/python" -m pip install -q "torch==$TORCH"
fi

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0} TORCH_CUDA_ARCH_LIST=9.0 FASTBLOCKS_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
"$VENV/bin/python" setup.py build_ext --inplace
so=fastblocks/_C$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
strip --strip-debug "$so"
bash .ci/source_hash.sh >"$so.csrc-sha256"
"$VENV/bin/python" -c 'import sys, fastblocks._ext as e; sys.exit(e.why_no_cuda_kernels())'
ls -la "$so" "$so.csrc-sha256"
echo "prebuild: carry both files in the device call"
