#!/usr/bin/env bash
# One prepared run for a lent GPU machine (Python 3.12, torch, triton, nvcc, pybind11,
# scikit-build-core, pytest-xdist there; no network). Builds fastpt with CUDA, runs the GPU tests
# (CUDA and Triton backends against the references), then the benches with their baselines in the
# same run, and writes everything under $OUT (default ./gpu-out). Each phase has its own time
# limit, so a slow phase cannot eat the others; the whole run stays under ~7 minutes.
#   device run: bash benches/gpu_check.sh
#   PHASES="tests" / "benches" / BENCHES="attention contrastive" select parts for a rerun.
# Peer baselines (liger-kernel, inf-cl) travel as wheels in .whl/ when present.
set -uo pipefail
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PHASES="${PHASES:-tests benches}"
BENCHES="${BENCHES:-cross_entropy contrastive attention}"
t0=$(date +%s)
log() { echo "== [$(( $(date +%s) - t0 )) s] $*" | tee -a "$out/summary.txt"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')  date: $(date -u +%F)"
log "python $(python3 -c 'import sys,torch,triton;print(sys.version.split()[0],"torch",torch.__version__,"triton",triton.__version__)')"
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) FASTPT_CUDA=ON timeout 300 \
  python3 -m pip install --no-build-isolation --no-deps -q -e . > "$out/build.log" 2>&1
rc=$?
log "build rc=$rc"
[ $rc -eq 0 ] || { tail -40 "$out/build.log"; exit $rc; }
python3 -m fastpt info | tee -a "$out/summary.txt"

if [[ " $PHASES " == *" tests "* ]]; then
  # one tuning config per kernel (FASTPT_TRITON_AUTOTUNE=0): the tests check numbers, not speed;
  # 14 processes share the GPU and compile Triton kernels in parallel; -v names each failure as it
  # happens, so a run cut short by its time limit still says what failed
  tests="tests/ops tests/nn tests/test_dispatch.py"
  [ -f tests/models/test_patch_hf.py ] && tests="$tests tests/models/test_patch_hf.py"
  FASTPT_FAILURE_LOG="$out/failures.txt" FASTPT_TRITON_AUTOTUNE=0 timeout "${TEST_BUDGET:-240}" python3 -m pytest $tests -k "cuda or triton" \
    -n "${TEST_PROCS:-14}" -v -p no:cacheprovider --timeout 150 -rfE --tb=short > "$out/tests.txt" 2>&1
  log "GPU tests rc=$?: $(tail -1 "$out/tests.txt")"
  grep -E "(FAILED|ERROR) tests" "$out/tests.txt" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | cut -c1-200 | head -50
fi

if [[ " $PHASES " == *" benches "* ]]; then
  for b in $BENCHES; do
    case $b in attention) budget=200;; *) budget=75;; esac
    timeout $budget python3 -m pytest "benches/bench_$b.py" -k cuda -q -s -p no:cacheprovider --benchmark-only \
      --benchmark-columns=min,median,rounds --benchmark-json="$out/bench_$b.json" > /tmp/bench_$b.txt 2>&1
    log "bench $b rc=$?"
    cat /tmp/bench_$b.txt >> "$out/bench.txt"  # at most 8 files come back: one text log for all benches
    grep -E "^cuda/|contender|test_info_nce_cuda|Error|error:" /tmp/bench_$b.txt | cut -c1-150 | head -60
  done
fi
log "done"
