#!/usr/bin/env bash
# One prepared run for a lent GPU machine (Python 3.12, torch, triton, nvcc, pybind11,
# scikit-build-core, pytest-xdist there; no network). Builds fastpt with CUDA, then in this order:
#   e2e      `fastpt bench --suite e2e --device cuda` (bert-base MLM and gpt2-small CLM steps against
#            transformers), `python -m fastpt.bench.profile` (where each side's step spends its
#            time: device-busy share, kernel time by class, top operators), then the pairs again
#            with dropout 0 -> bench-cuda-e2e.*, profile-e2e.txt, bench-cuda-e2e-nodropout.*
#   e2e-compile  (not in the default PHASES) the BERT pair (E2E_COMPILE_ARGS, default "--model
#            bert-base"; "" for both pairs) with both sides under torch.compile
#            (`--suite e2e --compile`: fastpt's backbone, transformers' whole model; each row notes
#            its compile warm-up seconds and graph breaks), then the BERT pair's compiled step under
#            the profiler -> bench-cuda-e2e-compile.*, profile-e2e-compile.txt
#   tests    the GPU tests: first those in benches/gpu_tests_first.txt, then every CUDA and Triton
#            backend test against the references -> tests.txt, failures.txt (the tracebacks, empty when none failed)
#   kernels  `fastpt bench --suite kernels --device cuda` (every op against its baselines) -> bench-cuda.*
# writing into GPU_WORK (default /tmp/gpu-check) summary.txt, bench.log and the files above (each bench
# also writes <stem>-tuning.json: which Triton candidates its tuners picked on this GPU), packed into
# $OUT/results.tgz (default ./gpu-out) beside a copy of summary.txt. Each phase has its own time
# limit (E2E_BUDGET 100 s, PROFILE_BUDGET 50, E2E_NODROP_BUDGET 45, FIRST_BUDGET 30, TEST_BUDGET 60;
# E2E_COMPILE_BUDGET 170: Inductor compiles two models cold, PROFILE_COMPILE_BUDGET 50), cut to what is
# left of TOTAL_BUDGET (default 380 s, the build included; a phase with under 15 s left is skipped); the
# kernel bench gets the rest (skipped under 60 s) and writes its files after every op, so a run cut
# short keeps them.
# The plan fits a session's 900 s of device time (/work/.library/device/README.md), which also pays for
# the machine's cold start (60-120 s), the transfers and the idle wait before it goes back:
#   first call, cold:  bash benches/gpu_check.sh, a 400 s limit (TOTAL_BUDGET 380: build ~40 s, e2e
#                      195 s, tests 90 s; the kernel bench with what phases that end early leave)
#   second call, warm: PHASES="kernels" SKIP_BUILD=1 TOTAL_BUDGET=240, a 260 s limit (KERNEL_OPS=...
#                      to pick ops), or PHASES="e2e-compile" SKIP_BUILD=1 TOTAL_BUDGET=240 (compile
#                      170 s + profile 50 s), then give the machine back
# 120 + 400 + 260 = 780 s at most, leaving ~120 s for transfers and waits: no time for a third call.
# The machine stays warm only ~30 s after a call (status: idle_release_s): issue the second call at once,
# prepared beforehand. If it went back, a second call pays another cold start on a bare machine: drop
# SKIP_BUILD=1 there (the build is gone) or skip the call.
# The tests are stopped with SIGINT (pytest-xdist shuts its workers down) and any straggler is
# killed before the next phase, so no test process shares the GPU with a bench.
#   device run: bash benches/gpu_check.sh   (carry .whl for the peer baselines); SKIP_BUILD=1 on the
#   second call to the warm machine
#   PHASES="e2e", "e2e-compile", "tests", "kernels" (any subset, space-separated; default
#   "e2e tests kernels"; they run in the order above) select phases; KERNEL_OPS (default
#   cross_entropy,contrastive,attention,dropout,masking,contrastive_1m: what changed last first, the
#   seconds-long N = 1M InfoNCE last) and BENCH_ARGS (any
#   other `fastpt bench` arguments) shape the kernel bench.
# Peer baselines (liger-kernel, inf-cl) travel as wheels in .whl/ when present.
set -uo pipefail
# The device returns at most 8 files from $OUT: every phase writes into a work folder, packed into
# $OUT/results.tgz (with a copy of summary.txt beside it) every 15 s and at exit, so a run killed at its
# limit still returns what it had written by then. A second call on a warm machine adds to the same folder.
out="${OUT:-$PWD/gpu-out}"
work="${GPU_WORK:-/tmp/gpu-check}"
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
PHASES="${PHASES:-e2e tests kernels}"
t0=$(date +%s)
deadline=$(( t0 + ${TOTAL_BUDGET:-380} ))
log() { echo "== [$(( $(date +%s) - t0 )) s] $*" | tee -a "$work/summary.txt"; }
pack() {  # one at a time (flock): the exit's pack waits for a background one still writing
  # GNU tar exits 1 when a file changed as it read it (a log being appended): the archive is whole all the same
  local cmd='tar czf "$1/results.tgz.part" -C "$2" . 2>/dev/null; [ $? -le 1 ] && mv -f "$1/results.tgz.part" "$1/results.tgz";
             cp -f "$2/summary.txt" "$1/summary.txt" 2>/dev/null; true'
  if command -v flock >/dev/null; then flock "$work.lock" bash -c "$cmd" pack "$out" "$work"
  else bash -c "$cmd" pack "$out" "$work"; fi
}
( while sleep 15; do pack; done ) &
packer=$!
trap 'kill $packer 2>/dev/null; pack' EXIT
left() {  # a phase's budget: its own ($1), or less when TOTAL_BUDGET runs out first (minus $2 s kept for later)
  local rest=$(( deadline - $(date +%s) - ${2:-0} - 20 ))  # 20 s: the kill grace after a time limit
  echo $(( $1 < rest ? $1 : rest ))
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')  date: $(date -u +%F)"
log "python $(python3 -c 'import sys,torch,triton;print(sys.version.split()[0],"torch",torch.__version__,"triton",triton.__version__)')"
if [ "${SKIP_BUILD:-0}" = 1 ]; then  # a second call on a warm machine: the first one built it
  log "build skipped (SKIP_BUILD=1)"
else
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) FASTPT_CUDA=ON timeout 300 \
    python3 -m pip install --no-build-isolation --no-deps -q -e . > /tmp/build.log 2>&1
  rc=$?
  log "build rc=$rc"
  [ $rc -eq 0 ] || { cp /tmp/build.log "$work/build.log"; tail -40 /tmp/build.log; exit $rc; }
fi
python3 -m fastpt info | tee -a "$work/summary.txt"

bench() {  # budget, then `fastpt bench` arguments (through the module: runs whether or not the CLI has it)
  local budget=$1; shift
  [ "$budget" -ge 15 ] || { log "skipped (${budget} s left of TOTAL_BUDGET): fastpt bench $*"; return 125; }
  timeout --signal=INT --kill-after=15 "$budget" python3 -c \
    'import sys; from fastpt.bench import bench_main; sys.exit(bench_main(sys.argv[1:]))' --device cuda --out "$work" "$@"
}
quiesce() {  # wait until no other process computes on the GPU (a bench must not share it)
  for _ in $(seq 30); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && return 0
    sleep 1
  done
  log "GPU still has compute processes: $(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader | tr '\n' ' ')"
}

new_lines() { tail -n +$(( $1 + 1 )) "$work/bench.log" 2>/dev/null; }  # bench.log past its first $1 lines
profile() {  # budget, report file, then profile arguments; skipped with under 15 s (no stale report summarised)
  local budget=$1 report=$2; shift 2
  rm -f "$report"
  if [ "$budget" -lt 15 ]; then log "skipped (${budget} s left of TOTAL_BUDGET): profile $*"; return 125; fi
  timeout --signal=INT --kill-after=15 "$budget" python3 -m fastpt.bench.profile --device cuda --out "$report" "$@" \
    >> "$work/bench.log" 2>&1
}

if [[ " $PHASES " == *" e2e "* ]]; then
  seen=$(cat "$work/bench.log" 2>/dev/null | wc -l)  # a second call adds to bench.log: summarise this call's rows
  bench "$(left "${E2E_BUDGET:-100}")" --suite e2e --name bench-cuda-e2e >> "$work/bench.log" 2>&1
  log "e2e bench rc=$?: $(new_lines "$seen" | grep -E '^e2e' | tr -s ' ' | cut -c1-90 | paste -sd'|')"
  profile "$(left "${PROFILE_BUDGET:-50}")" "$work/profile-e2e.txt"
  log "e2e profile rc=$?: $(grep -E '^(## |wall )' "$work/profile-e2e.txt" 2>/dev/null | cut -c1-110 | paste -sd'|')"
  # the same pairs without dropout: attention then runs torch's SDPA on both sides (fastpt's dispatch
  # takes it for plain / causal rows without dropout), which isolates what the dropout attention costs
  seen=$(cat "$work/bench.log" 2>/dev/null | wc -l)
  bench "$(left "${E2E_NODROP_BUDGET:-45}")" --suite e2e --dropout 0 --name bench-cuda-e2e-nodropout >> "$work/bench.log" 2>&1
  log "e2e bench without dropout rc=$?: $(new_lines "$seen" | grep -E '^e2e' | tr -s ' ' | cut -c1-90 | paste -sd'|')"
fi

if [[ " $PHASES " == *" e2e-compile "* ]]; then
  # eager and compiled are separate invocations (--compile runs the compiled case only), each with its
  # own files; only this run's lines of bench.log go to the summary
  seen=$(cat "$work/bench.log" 2>/dev/null | wc -l)
  # shellcheck disable=SC2086
  bench "$(left "${E2E_COMPILE_BUDGET:-170}")" --suite e2e --compile ${E2E_COMPILE_ARGS---model bert-base} \
    --name bench-cuda-e2e-compile >> "$work/bench.log" 2>&1
  log "e2e bench compiled rc=$?: $(new_lines "$seen" | grep -E '^e2e' | tr -s ' ' | cut -c1-150 | paste -sd'|')"
  # where the compiled BERT step spends its time (Inductor's on-disk cache is warm from the bench)
  profile "$(left "${PROFILE_COMPILE_BUDGET:-50}")" "$work/profile-e2e-compile.txt" --compile --models bert
  log "e2e profile compiled rc=$?: $(grep -E '^(## |wall )' "$work/profile-e2e-compile.txt" 2>/dev/null | cut -c1-110 | paste -sd'|')"
fi

if [[ " $PHASES " == *" tests "* ]]; then
  # one tuning config per kernel (FASTPT_TRITON_AUTOTUNE=0): the tests check numbers, not speed;
  # 14 processes share the GPU and compile Triton kernels in parallel; -v names each failure as it
  # happens, so a run cut short by its time limit still says what failed
  tests="tests/ops tests/nn tests/test_dispatch.py"
  [ -f tests/models/test_patch_hf.py ] && tests="$tests tests/models/test_patch_hf.py"
  gpu_pytest() {  # budget, then pytest arguments; output appended to tests.txt
    # its own process group (setsid): SIGINT at the time limit lets pytest-xdist stop its workers,
    # and whatever is left of the group is killed before the next phase
    local budget=$1; shift
    [ "$budget" -ge 15 ] || { log "skipped (${budget} s left of TOTAL_BUDGET): pytest $*"; return 125; }
    FASTPT_FAILURE_LOG="$work/failures.txt" FASTPT_TRITON_AUTOTUNE=0 setsid timeout --signal=INT --kill-after=20 \
      "$budget" python3 -m pytest "$@" -v -p no:cacheprovider --timeout 150 -rfE --tb=short >> "$work/tests.txt" 2>&1 &
    local pid=$!
    wait $pid
    local rc=$?
    kill -KILL -- -$pid 2>/dev/null
    return $rc
  }
  : > "$work/tests.txt"; : > "$work/failures.txt"  # this call's results only (a warm machine keeps GPU_WORK)
  # first benches/gpu_tests_first.txt (node ids or files: what failed last time, what changed blind
  # since), so their tracebacks come early
  first=$(grep -v '^#' benches/gpu_tests_first.txt 2>/dev/null | while read -r id; do [ -f "${id%%::*}" ] && echo "$id"; done)
  if [ -n "$first" ]; then
    # shellcheck disable=SC2086
    gpu_pytest "$(left "${FIRST_BUDGET:-30}")" $first -k "cuda or triton" -n 8
    first_rc=$?
    log "GPU tests that failed last time, rc=$first_rc: $(tail -1 "$work/tests.txt")"
  fi
  # the first ones are not run twice, when they all ran (rc 0: passed, 1: some failed; 124: cut by the limit)
  deselect=""
  case "${first_rc:-none}" in 0|1) deselect=$(for id in $first; do echo "--deselect $id"; done);; esac
  # shellcheck disable=SC2086
  gpu_pytest "$(left "${TEST_BUDGET:-60}")" $tests $deselect -k "cuda or triton" -n "${TEST_PROCS:-14}"
  log "GPU tests rc=$?: $(tail -1 "$work/tests.txt")"
  grep -E "(FAILED|ERROR) tests" "$work/tests.txt" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | cut -c1-200 | head -50
fi

if [[ " $PHASES " == *" kernels "* ]]; then
  quiesce
  budget=$(( deadline - $(date +%s) - 20 ))
  if [ $budget -lt 60 ]; then
    log "kernel bench skipped: only ${budget} s left of TOTAL_BUDGET"
  else
    log "kernel bench: ${budget} s left"
    # shellcheck disable=SC2086
    bench $budget --suite kernels --ops "${KERNEL_OPS:-cross_entropy,contrastive,attention,dropout,masking,contrastive_1m}" \
      ${BENCH_ARGS:-} >> "$work/bench.log" 2>&1
    log "kernel bench rc=$? (124: cut by its time limit; the files hold every op finished before)"
    grep -E "FAILED|Error" "$work/bench.log" | cut -c1-160 | head -40
  fi
fi
ls "$work" | tee -a "$work/summary.txt"
log "done"
