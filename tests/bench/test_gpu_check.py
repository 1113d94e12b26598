"""benches/gpu_check.sh runs its phases in order and stops cleanly, here without a GPU: a stand-in
nvidia-smi on PATH, no build (SKIP_BUILD=1), and every `--device cuda` step failing fast with its
usage error. What it guards: the script only ever runs for real on a lent GPU, in minutes that
must not go to a shell mistake."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benches" / "gpu_check.sh"


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("setsid") is None,
                    reason="needs coreutils timeout and util-linux setsid")
def test_phases_run_in_order_without_a_gpu(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *query-compute-apps*) exit 0;; *) echo "stand-in GPU, 0, 1 MiB, 1 MHz";; esac\n')
    smi.chmod(0o755)
    py = fake / "python3"  # the script calls python3: this interpreter, with fastpt importable
    py.symlink_to(sys.executable)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(out), GPU_WORK=str(work), SKIP_BUILD="1",
               PHASES="kernels e2e-compile e2e", E2E_BUDGET="60", PROFILE_BUDGET="60", E2E_NODROP_BUDGET="60",
               E2E_COMPILE_BUDGET="60", PROFILE_COMPILE_BUDGET="60", TOTAL_BUDGET="400")
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    steps = ["device: stand-in GPU", "build skipped", "e2e bench rc=2", "e2e profile rc=2",
             "e2e bench without dropout rc=2", "e2e bench compiled rc=2", "e2e profile compiled rc=2",
             "kernel bench:", "kernel bench rc=2",
             "done"]
    at = [summary.find(s) for s in steps]
    assert -1 not in at and at == sorted(at), summary
    # the device returns at most 8 files from $OUT: everything travels packed in results.tgz
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "summary.txt"]
    with tarfile.open(out / "results.tgz") as tar:
        assert {"./bench.log", "./summary.txt"} <= set(tar.getnames())
        assert tar.extractfile("./summary.txt").read().decode() == summary
    log = (work / "bench.log").read_text()
    assert "no CUDA device" in log  # each cuda step said why it could not run
    # the four `fastpt bench` calls (e2e, without dropout, compiled, kernels) got past their arguments
    assert log.count("fastpt bench: --device cuda, but no CUDA device") == 4 and "usage: fastpt bench" not in log


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("setsid") is None,
                    reason="needs coreutils timeout and util-linux setsid")
def test_phases_fit_what_is_left_of_the_total_budget(tmp_path):
    """Every phase's limit is cut to what is left of TOTAL_BUDGET (only the kernel bench read it: a slow
    build ran the fixed-budget phases past the device's limit), and a phase with under 15 s is skipped."""
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *query-compute-apps*) exit 0;; *) echo "stand-in GPU";; esac\n')
    smi.chmod(0o755)
    (fake / "python3").symlink_to(sys.executable)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(out), GPU_WORK=str(tmp_path / "work"),
               SKIP_BUILD="1", PHASES="tests kernels", TOTAL_BUDGET="30")
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "left of TOTAL_BUDGET): pytest tests/ops" in summary and "kernel bench skipped" in summary, summary


DEVICE_TIME_S, COLD_START_S, BUILD_S, GRACE_S = 900, 120, 40, 20  # /work/.library/device/README.md; a build took 9-39 s


def test_the_planned_calls_and_default_budgets_fit_a_sessions_device_time():
    """The header planned a 500 s cold call and a 300 s warm one: with a 60-120 s cold start that is more than a
    session's 900 s of device time. The planned limits, their TOTAL_BUDGETs and the phases' default budgets
    must fit inside each other."""
    import re

    text = SCRIPT.read_text()
    header = text[:text.index("set -uo pipefail")]
    defaults = {name: int(v) for name, v in re.findall(r"\$\{([A-Z0-9_]+BUDGET):-(\d+)\}", text)}
    limits = [int(v) for v in re.findall(r"a\s+(?:#\s*)?(\d+) s limit", header)]
    assert len(limits) == 2, header
    first, second = limits
    assert COLD_START_S + first + second <= DEVICE_TIME_S - 60, limits  # a minute for transfers and idle waits
    assert defaults["TOTAL_BUDGET"] + GRACE_S <= first
    phases = sum(defaults[k] for k in ("E2E_BUDGET", "PROFILE_BUDGET", "E2E_NODROP_BUDGET", "FIRST_BUDGET",
                                       "TEST_BUDGET"))
    assert BUILD_S + phases + GRACE_S <= defaults["TOTAL_BUDGET"]  # the default phases, not cut, on a cold call
    warm = {int(v) for v in re.findall(r"SKIP_BUILD=1 TOTAL_BUDGET=(\d+)", header)}
    assert len(warm) == 1, header
    warm_total = warm.pop()
    assert warm_total + GRACE_S <= second
    assert defaults["E2E_COMPILE_BUDGET"] + defaults["PROFILE_COMPILE_BUDGET"] + GRACE_S <= warm_total
    # the numbers the header quotes are the script's
    for name in ("E2E_BUDGET", "PROFILE_BUDGET", "E2E_NODROP_BUDGET", "FIRST_BUDGET", "TEST_BUDGET",
                 "E2E_COMPILE_BUDGET", "PROFILE_COMPILE_BUDGET"):
        assert re.search(rf"{name} {defaults[name]}\b", header), name
    assert f"TOTAL_BUDGET (default {defaults['TOTAL_BUDGET']} s" in header
