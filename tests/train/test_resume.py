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


def test_resume_keeps_the_precision_auto_resolved_to(tmp_path, monkeypatch):
    """precision: auto resolves per device (and per fastpt version); the resolved precision was not saved,
    so a run begun in fp32 went on in bf16 when --resume found a CPU with native bf16 products. It is now
    recorded in trainer_state.json and kept; a checkpoint without it (an older fastpt: auto meant fp32 on every
    CPU before 2026-11-26 11:00, today's choice since) gets today's choice with a note saying so; a precision
    the recipe names wins, with a note."""
    import json

    from fastpt.data.shards import sha256_file
    from fastpt.train import pretrain
    from fastpt.train import recipe as recipe_mod

    shards = make_shards(tmp_path / "shards", n_docs=40)
    out = tmp_path / "run"
    quiet = {"save_every": 2, "keep_last": 1, "tensorboard": False, "plot": False, "progress": False}

    def run(max_steps, precision="auto", bf16_cpu=True):
        monkeypatch.setattr(recipe_mod._peaks, "native_bf16", lambda device: bf16_cpu)
        lines = []
        cfg = recipe(shards, out, train={"max_steps": max_steps, "precision": precision}, output=quiet)
        summary = pretrain(cfg, resume=max_steps > 2, log=lines.append)
        return summary["precision"], "\n".join(lines)

    def state_file():
        return sorted((out / "checkpoints").glob("step-*"))[-1] / "trainer_state.json"

    assert run(2, bf16_cpu=False)[0] == "fp32"  # a CPU without native bf16: auto is fp32
    assert json.loads(state_file().read_text())["precision"] == "fp32"
    precision, log = run(4)  # resumed where auto now means bf16
    assert precision == "fp32" and "precision auto keeps fp32" in log and "auto would choose bf16" in log, log

    # an older fastpt's checkpoint: no recorded precision (checkpoint.json re-signed as if written so)
    spath = state_file()
    state = json.loads(spath.read_text())
    del state["precision"]
    spath.write_text(json.dumps(state))
    mpath = spath.parent / "checkpoint.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"][spath.name] = {"bytes": spath.stat().st_size, "sha256": sha256_file(spath)}
    mpath.write_text(json.dumps(manifest))
    precision, log = run(6)  # it cannot tell: today's auto, said (older fastpt's auto: fp32 on every CPU)
    assert precision == "bf16" and "does not record the precision it trained in" in log, log
    assert "continuing in bf16" in log and "before 2026-11-26 11:00 trained in fp32" in log, log

    precision, log = run(8, precision="fp32")  # named in the recipe: the user asked for the switch
    assert precision == "fp32" and "trained in bf16; continuing in fp32 as train.precision asks" in log, log
    assert json.loads(state_file().read_text())["precision"] == "fp32"
