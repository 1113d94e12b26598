"""Exact resumption: a run killed with SIGKILL mid-run (after checkpoints) and resumed with --resume writes
the same loss trajectory, bit for bit, as an uninterrupted run; the newest checkpoint, damaged on
purpose, is detected and the previous one is used."""
import os
import signal
import subprocess
import sys
import time

import yaml

from .pretrain_helpers import env, losses, make_shards, recipe, run_cli, tiny_model

CLI = "import sys; from fastpt.train import pretrain_main; sys.exit(pretrain_main(sys.argv[1:]))"


def start(config, out):
    return subprocess.Popen([sys.executable, "-c", CLI, "--config", str(config), "--set", f"output.dir={out}"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill9_then_resume_is_bit_identical(tmp_path):
    shards = make_shards(tmp_path / "shards")
    cfg = recipe(shards, tmp_path / "unused", model=tiny_model(dropout=0.1),  # dropout: the RNG state must resume too
                 train={"max_steps": 80, "grad_accum": 2, "warmup_steps": 5, "lr": 2e-3},
                 output={"save_every": 10, "keep_last": 3, "log_every": 1, "tensorboard": False, "plot": False,
                         "progress": False})
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = start(config, ref_dir)
    victim = start(config, run_dir)
    target = run_dir / "checkpoints" / "step-00000020" / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not target.exists():
        assert victim.poll() is None, f"the run ended before its checkpoint: {victim.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # killed mid-run, not after the end

    # damage the newest complete checkpoint: --resume must notice and take the one before
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    done = run_cli(["--config", str(config), "--resume", "--set", f"output.dir={run_dir}"], timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint {newest.name} is unusable" in done.stdout and "truncated" in done.stdout
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    got, want = losses(run_dir), losses(ref_dir)
    assert len(want) == 80 and got == want  # every step's loss, as text: bit-identical
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_sigint_writes_a_checkpoint_and_resume_continues_bit_identically(tmp_path):
    """Ctrl-C (SIGINT) ends the run after the step in progress with its final checkpoint (exit status 130);
    --resume continues from that step and writes the trajectory of an uninterrupted run, bit for bit."""
    shards = make_shards(tmp_path / "shards")
    cfg = recipe(shards, tmp_path / "unused", model=tiny_model(dropout=0.1),
                 train={"max_steps": 100000, "schedule": "constant", "warmup_steps": 0},
                 output={"save_every": 0, "log_every": 1, "tensorboard": False, "plot": False, "progress": False})
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    victim = start(config, run_dir)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.csv").exists() or len(losses(run_dir)) < 3:
        assert victim.poll() is None, victim.stderr.read()
        assert time.monotonic() < deadline, "no progress within 120 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGINT)
    assert victim.wait(timeout=120) == 130
    err = victim.stderr.read()
    assert "stopped by SIGINT at step" in err and "--resume" in err, err
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    assert len(steps) == 1 and steps[0] == len(losses(run_dir)) >= 3
    n = steps[0] + 3
    done = run_cli(["--config", str(config), "--resume", "--set", f"output.dir={run_dir}",
                    "--set", f"train.max_steps={n}"], timeout=300)
    assert done.returncode == 0, done.stderr
    ref = run_cli(["--config", str(config), "--set", f"output.dir={tmp_path / 'ref'}", "--set", f"train.max_steps={n}"],
                  timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert losses(run_dir) == losses(tmp_path / "ref") and len(losses(run_dir)) == n
