#!/usr/bin/env bash
# Creates .venv with torch, the test extras and fastblocks (compiling fastblocks._C: C++ always, CUDA
# whenever nvcc is found). Idempotent: a second run only rebuilds fastblocks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel ninja
if ! .venv/bin/python -c 'import torch, torchvision' 2>/dev/null; then
  echo "setup: installing torch==2.14.1 torchvision==0.29.1 (about a minute)"
  $pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "setup: torch ready after ${SECONDS}s"
echo "setup: building and installing fastblocks (compiling the C++/CUDA extension takes a few minutes)"
$pip install -q --no-build-isolation -e '.[test]'
echo "setup: fastblocks installed after ${SECONDS}s"
.venv/bin/python -c 'import fastblocks, fastblocks._ext as e; print("setup: fastblocks", fastblocks.__version__, "| extension:", "loaded, CUDA kernels built" if e.cuda_kernels_built() else ("loaded, CPU kernels only" if e._C else e.LOAD_ERROR))'
