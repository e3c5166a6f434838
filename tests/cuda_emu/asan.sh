#!/usr/bin/env bash
# The CUDA emulator's tests (tests/test_cuda_emu.py) with the emulated kernels built under
# AddressSanitizer: a kernel that reads or writes outside a tensor aborts with a report naming the
# kernel and the allocation. ~2 min to build (build/cuda_emu_asan), ~3 min to run on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
asan=$(gcc -print-file-name=libasan.so)
[ -e "$asan" ] || { echo "asan.sh: gcc has no AddressSanitizer runtime (libasan.so)" >&2; exit 1; }
export CUDA_EMU_ASAN=1 ASAN_OPTIONS=detect_leaks=0
# libstdc++ preloaded too: ASan's C++-exception interceptor needs it loaded before Python starts.
export LD_PRELOAD="$asan $(gcc -print-file-name=libstdc++.so)"
# --capture=no: pytest's captured stderr would be lost when ASan aborts the process. Under xdist
# (-n) a worker's report is lost too and pytest names only the test it crashed in: rerun that
# test without -n to read the report.
exec "${PYTHON:-.venv/bin/python}" -m pytest tests/test_cuda_emu.py -q -p no:cacheprovider --capture=no "$@"
