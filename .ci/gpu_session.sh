#!/usr/bin/env bash
# One call on a GPU machine: make the extension importable (the library .ci/prebuild_gpu_ext.sh built
# here, if carried in and built from these sources; else build it there for sm_90), run the test suite
# on CUDA, then the benchmarks at full size, most important first. Every phase has a time limit inside
# one overall budget and is interrupted with SIGINT when it runs out, so pytest still writes what
# finished. Logs and results go under $OUT.
#
#   OUT=/some/dir GPU_BUDGET_S=540 GPU_PHASES=tests,profile,bench-ops,bench-models,bench-compile-models \
#     bash .ci/gpu_session.sh
#
# Results: $OUT/env.txt, $OUT/<phase>.log, $OUT/<phase>/<device>-<dtype>-<layout>-<date>.{json,md,png},
# and all of it in $OUT/results.tgz (the device tool brings back at most 8 files). The model phase
# leaves out torch.compile of whole models (minutes each); the last phase runs those, with eager
# again, if time is left. GPU_PHASES picks phases, so that a lease can be split over two calls.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
BUDGET=${GPU_BUDGET_S:-540}
PHASES=${GPU_PHASES:-tests,profile,bench-ops,bench-models,bench-compile-models}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET

elapsed() { echo $(( $(date +%s) - start )); }
wanted() { [[ ",$PHASES," == *",$1,"* ]]; }

# phase NAME LIMIT_S CMD...: CMD for at most LIMIT_S seconds and never past the budget, output to
# $OUT/NAME.log (its tail here too).
phase() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) - 15 ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "gpu: skipping $name: the budget is spent"
    return 1
  fi
  echo "gpu: $name (at most ${limit}s) at $(elapsed)s"
  timeout -k 15 -s INT "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  echo "gpu: $name exit $rc at $(elapsed)s"
  return $rc
}

extension_ok() {
  "$PY" -c 'import sys, fastblocks._ext as e; sys.exit(e.why_no_cuda_kernels())'
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name())'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

xdist=()
"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 12)

# A library from .ci/prebuild_gpu_ext.sh (carried in) is used only if built from these very sources.
so=fastblocks/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
if [ "$(cat "$so.csrc-sha256" 2>/dev/null)" = "$(bash .ci/source_hash.sh)" ] && extension_ok; then
  echo "gpu: using the prebuilt $so"
else
  phase build 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTBLOCKS_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
  extension_ok || echo "gpu: the extension did not build; the cuda backend will be skipped"
fi

# Correctness on the GPU first: nothing measured counts if the kernels are wrong. Only the tests that
# touch CUDA (CI runs the CPU ones); the emulator and sm90_compile are what a GPU makes redundant.
wanted tests && phase tests 130 env OMP_NUM_THREADS=2 "$PY" -m pytest tests -q -p no:cacheprovider -rfE "${xdist[@]}" \
  -k cuda --ignore tests/test_cuda_emu.py --deselect tests/test_sm90_compile.py

# Where the GPU time of each fused op goes, kernel by kernel, against its wall time per step.
wanted profile && phase profile 60 "$PY" -m bench.profile_gpu --backends eager cuda triton --rows 10

bench=("$PY" -m pytest --benchmark-only -p no:cacheprovider)
ops=(bench/test_dwconv_bn_act.py bench/test_squeeze_excite.py bench/test_shift.py bench/test_bn_act.py bench/test_hardswish.py)
models=(bench/test_models.py bench/test_densenet.py)
wanted bench-ops && phase bench-ops 260 "${bench[@]}" --results-dir "$OUT/bench-ops" "${ops[@]}" -k "not shiftresnet"
wanted bench-models && phase bench-models 170 "${bench[@]}" --results-dir "$OUT/bench-models" "${models[@]}" bench/test_shift.py \
  -k "(train or inference or largest or shiftresnet) and not (compile or squeezenet)"
# Whole-model compiles, with eager again so that their ratios come from one run.
wanted bench-compile-models && phase bench-compile-models 300 "${bench[@]}" --results-dir "$OUT/bench-compile" \
  "${models[@]}" bench/test_shift.py -k "(compile or eager) and (train or inference or shiftresnet)"
# The backend order `auto` would take from this run (to be merged with the CPU runs by derive_auto).
ls "$OUT"/bench-*/*.json >/dev/null 2>&1 && "$PY" -m bench.derive_auto "$OUT"/bench-*/*.json --dry-run >"$OUT/auto_order.txt" 2>&1
tar -czf /tmp/results.tgz -C "$OUT" . && mv /tmp/results.tgz "$OUT/results.tgz"
echo "gpu: done after $(elapsed)s"
