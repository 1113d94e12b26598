#!/usr/bin/env bash
# One prepared run for a lent GPU machine (Python 3.12, torch, triton, nvcc, pybind11,
# scikit-build-core, pytest-xdist there; no network). Builds fastpt with CUDA, runs the GPU tests
# (first those listed in benches/gpu_tests_first.txt, then every CUDA and Triton backend test
# against the references), then `fastpt bench --suite all --device cuda`
# (every op and the bert-base MLM step, each against its baselines in the same run), and writes
# under $OUT (default ./gpu-out) at most 8 files: summary.txt, tests.txt, failures.txt (only if a
# test failed), bench.log, bench-cuda.{csv,json,md,png}. The tests have their own time limit
# (TEST_BUDGET); the bench gets what is left of TOTAL_BUDGET (default 470 s, inside the device's
# 8 minutes) and writes its files after every op, cheapest first, so a run cut short keeps them.
#   device run: bash benches/gpu_check.sh
#   PHASES="tests" / "benches" select a phase; BENCH_ARGS="--ops attention" (any `fastpt bench`
#   arguments) narrows the bench for a rerun.
# Peer baselines (liger-kernel, inf-cl) travel as wheels in .whl/ when present.
set -uo pipefail
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PHASES="${PHASES:-tests benches}"
t0=$(date +%s)
deadline=$(( t0 + ${TOTAL_BUDGET:-470} ))
log() { echo "== [$(( $(date +%s) - t0 )) s] $*" | tee -a "$out/summary.txt"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')  date: $(date -u +%F)"
log "python $(python3 -c 'import sys,torch,triton;print(sys.version.split()[0],"torch",torch.__version__,"triton",triton.__version__)')"
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) FASTPT_CUDA=ON timeout 300 \
  python3 -m pip install --no-build-isolation --no-deps -q -e . > /tmp/build.log 2>&1
rc=$?
log "build rc=$rc"
[ $rc -eq 0 ] || { cp /tmp/build.log "$out/build.log"; tail -40 /tmp/build.log; exit $rc; }
python3 -m fastpt info | tee -a "$out/summary.txt"

if [[ " $PHASES " == *" tests "* ]]; then
  # one tuning config per kernel (FASTPT_TRITON_AUTOTUNE=0): the tests check numbers, not speed;
  # 14 processes share the GPU and compile Triton kernels in parallel; -v names each failure as it
  # happens, so a run cut short by its time limit still says what failed
  tests="tests/ops tests/nn tests/test_dispatch.py"
  [ -f tests/models/test_patch_hf.py ] && tests="$tests tests/models/test_patch_hf.py"
  gpu_pytest() {  # budget, then pytest arguments; output appended to tests.txt
    local budget=$1; shift
    FASTPT_FAILURE_LOG="$out/failures.txt" FASTPT_TRITON_AUTOTUNE=0 timeout "$budget" python3 -m pytest "$@" \
      -v -p no:cacheprovider --timeout 150 -rfE --tb=short >> "$out/tests.txt" 2>&1
  }
  : > "$out/tests.txt"
  # first the tests the last GPU run failed (benches/gpu_tests_first.txt): their tracebacks come early
  first=$(grep -v '^#' benches/gpu_tests_first.txt 2>/dev/null | while read -r id; do [ -f "${id%%::*}" ] && echo "$id"; done)
  if [ -n "$first" ]; then
    # shellcheck disable=SC2086
    gpu_pytest "${FIRST_BUDGET:-60}" $first -n 8
    log "GPU tests that failed last time, rc=$?: $(tail -1 "$out/tests.txt")"
  fi
  # shellcheck disable=SC2086
  gpu_pytest "${TEST_BUDGET:-150}" $tests -k "cuda or triton" -n "${TEST_PROCS:-14}"
  log "GPU tests rc=$?: $(tail -1 "$out/tests.txt")"
  grep -E "(FAILED|ERROR) tests" "$out/tests.txt" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | cut -c1-200 | head -50
fi

if [[ " $PHASES " == *" benches "* ]]; then
  # = `fastpt bench --suite all --device cuda --out $out` (called through the module, so it runs
  # whether or not this checkout's CLI has the subcommand); rows reach the CSV/JSON op by op
  budget=$(( deadline - $(date +%s) ))
  if [ $budget -lt 60 ]; then
    log "bench skipped: only ${budget} s left of TOTAL_BUDGET"
  else
    log "bench: ${budget} s left"
    # shellcheck disable=SC2086
    timeout $budget python3 -c 'import sys; from fastpt.bench import bench_main; sys.exit(bench_main(sys.argv[1:]))' \
      --suite all --device cuda --out "$out" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
    log "bench rc=$? (124: cut by its time limit; the files hold every op finished before)"
    grep -E "^e2e|FAILED|Error" "$out/bench.log" | cut -c1-160 | head -40
    ls "$out" | tee -a "$out/summary.txt"
  fi
fi
log "done"
