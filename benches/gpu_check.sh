#!/usr/bin/env bash
# One prepared run for a lent GPU machine (Python 3.12, torch, triton, nvcc,
# pybind11, scikit-build-core there; no network). Builds fastpt with CUDA,
# runs the GPU tests (CUDA and Triton backends against the references) and the
# benches with their baselines in the same run, and writes everything under
# $OUT (default ./gpu-out). Budget: well under 8 minutes.
#   device run: bash benches/gpu_check.sh
# Peer baselines (liger-kernel, inf-cl) travel as wheels in .whl/ when present.
set -uo pipefail
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$out/summary.txt"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  date: $(date -u +%F)"
start=$(date +%s)
FASTPT_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q -e . > "$out/build.log" 2>&1
rc=$?
log "build rc=$rc in $(( $(date +%s) - start )) s"
[ $rc -eq 0 ] || { tail -40 "$out/build.log"; exit $rc; }
python3 -m fastpt info | tee "$out/info.txt"

log "GPU tests"
timeout 240 python3 -m pytest tests -q -p no:cacheprovider -k "cuda or triton" 2>&1 | tee "$out/tests.txt" | tail -15

log "benches"
timeout 180 python3 -m pytest benches -q -p no:cacheprovider --benchmark-only \
  --benchmark-json="$out/bench.json" 2>&1 | tee "$out/bench.txt" | tail -30
log "total $(( $(date +%s) - start )) s"
