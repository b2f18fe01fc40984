#!/usr/bin/env bash
# One visit to a GPU machine does everything: build kd_kernels._C against the torch found
# there (no package registry needed: --no-build-isolation --no-deps), run the whole test suite
# on the GPU (every backend), run the CUDA kernels once under compute-sanitizer (memcheck and
# racecheck), run the benchmarks, and write results, logs and the report into one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default benchmarks/results/gpu-<date>)
#
# Environment: PYTHON (default python), KD_KERNELS_CUDA_ARCHS (default 9.0), BENCH_ARGS
# (extra pytest args for the benchmarks, e.g. "--bench-quick" or "-k rkd").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export KD_KERNELS_BUILD_CUDA=1
export KD_KERNELS_CUDA_ARCHS=${KD_KERNELS_CUDA_ARCHS:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export KD_KERNELS_PTXAS_VERBOSE=${KD_KERNELS_PTXAS_VERBOSE:-1}  # per-kernel ptxas lines in build.log for the gate
status=0
step() { echo "== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }

step "build"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { echo "build failed" | tee -a "$OUT/summary.txt"; exit 1; }
"$PY" -c "import kd_kernels, json; print(json.dumps(kd_kernels.build_info(), indent=1))" | tee "$OUT/build_info.json"

step "compile gate with this machine's toolchain (Triton + CUDA C++ ptxas log)"
# The build log above has no ptxas -v lines unless KD_KERNELS_PTXAS_VERBOSE=1 was set for it;
# the Triton part needs no GPU and runs on this machine's triton (API differences are reported).
env -u TRITON_INTERPRET "$PY" benchmarks/compile_gate.py --report "$OUT/compile_gate.md" \
  --cuda-log "$OUT/build.log" > "$OUT/compile_gate.log" 2>&1 || status=1
tail -n 15 "$OUT/compile_gate.log" | tee -a "$OUT/summary.txt"

step "tests on the GPU (every backend)"
"$PY" -m pytest tests -q -ra -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
tail -n 25 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool on the CUDA kernels"
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -m pytest -q -x -p no:cacheprovider \
      tests/test_cuda_kernels.py tests/test_rkd_cuda.py -k "not 1000" > "$OUT/sanitizer_$tool.log" 2>&1 || status=1
    tail -n 5 "$OUT/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
  done
fi

step "benchmarks"
"$PY" -m pytest benchmarks --bench-device cuda -q -p no:cacheprovider --benchmark-json "$OUT/bench.json" \
  ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1 || status=1
"$PY" benchmarks/report.py "$OUT/bench.json" --out "$OUT/report" | tee -a "$OUT/summary.txt"
step "done, status $status; results in $OUT"
exit $status
