"""Data parallelism on 2 CPU processes (gloo, launched by torchrun): DDP and FSDP2 give the loss of one
process on the combined batch, with gradient accumulation (no all-reduce on micro-steps); a failing rank
ends the job with its error, and a signal to any rank stops every rank at the same step."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml

from fastpt.models.model import PretrainModel
from fastpt.train import pretrain
from fastpt.train.logging import read_metrics

from .pretrain_helpers import env, losses, make_shards, recipe, tiny_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
RUNNER = "import sys\nfrom fastpt.train import pretrain_main\nsys.exit(pretrain_main(sys.argv[1:]))\n"
QUIET = {"tensorboard": False, "plot": False, "progress": False, "log_every": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Documents of 3 to 40 tokens in padded rows: micro-batches and ranks hold different numbers of LM
    targets, and the loss is still the token mean over the combined batch (averaging each rank's mean
    was 1.2e-3 off in the loss and 6.6e-3 in the weights after 4 steps)."""
    root = tmp_path_factory.mktemp("ddp")
    shards = make_shards(root / "shards", n_docs=80, min_len=3, max_len=40)
    one = recipe(shards, root / "one", model=tiny_model("clm"), data={"mode": "doc", "add_special": "none"},
                 train={"batch_size": 6, "grad_accum": 2, "max_steps": 4, "schedule": "constant"},
                 output={**QUIET, "save_every": 0})
    pretrain(one, log=lambda m: None)
    return root, one


def torchrun(root, cfg, *args):
    (root / "runner.py").write_text(RUNNER)
    config = root / f"{cfg['output']['dir'].rsplit('/', 1)[-1]}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "runner.py"), "--config", str(config), *args]
    # its own process group: on a timeout (or an interrupted pytest) the workers go with torchrun
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def final_params(run_dir, step=4):
    return PretrainModel.from_pretrained(run_dir / "checkpoints" / f"step-{step:08d}").state_dict()


def compare(root, name):
    want, got = [float(x) for x in losses(root / "one")], [float(x) for x in losses(root / name)]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    # the objective's metrics too are means over every rank (they were rank 0's own)
    metric = lambda run: [r["lm_loss"] for r in read_metrics(root / run / "metrics.csv")]  # noqa: E731
    assert metric(name) == pytest.approx(metric("one"), rel=1e-6, abs=1e-6)
    ref = final_params(root / "one")
    for k, v in final_params(root / name).items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ddp_matches_one_process(setup):
    root, one = setup
    cfg = {**one, "train": {**one["train"], "batch_size": 3}, "output": {**one["output"], "dir": str(root / "ddp")}}
    done = torchrun(root, cfg)
    assert "2 x cpu" in done.stdout
    compare(root, "ddp")


def test_fsdp_matches_one_process_and_resumes(setup):
    root, one = setup
    cfg = {**one, "train": {**one["train"], "batch_size": 3, "fsdp": True, "max_steps": 2},
           "output": {**one["output"], "dir": str(root / "fsdp"), "save_every": 2}}
    torchrun(root, cfg)  # steps 1-2, checkpoint (gathered full state dicts)
    done = torchrun(root, cfg, "--resume", "--set", "train.max_steps=4")  # steps 3-4 from the checkpoint
    assert "resumed from" in done.stdout
    compare(root, "fsdp")


def test_fsdp_checkpoints_do_not_move_the_dropout_stream(tmp_path):
    """FSDP writes a checkpoint through a CPU copy of the model, whose build draws initial weights from the
    global generator: the run's dropout masks then depended on when it saved (and a resume, which restores
    the generator as saved, diverged). One process is enough to show it."""
    shards = make_shards(tmp_path / "shards")
    runs = []
    for every in (0, 2):
        cfg = recipe(shards, tmp_path / f"every{every}", model=tiny_model(dropout=0.1),
                     train={"fsdp": True, "max_steps": 5}, output={**QUIET, "save_every": every})
        pretrain(cfg, log=lambda m: None)
        runs.append(losses(tmp_path / f"every{every}"))
    assert runs[0] == runs[1]


def test_fsdp_checkpoints_do_not_read_the_teacher_again(tmp_path, monkeypatch):
    """FSDP's checkpoint copy of the model was built as a fresh model: self_distill read its teacher_path again
    at every save (its weights overwritten right after), and a teacher file gone since the start (scratch
    storage) failed the run at its first save, with no checkpoint, where the same run without FSDP saved."""
    from safetensors.torch import save_file

    import fastpt.objectives.distill as distill
    from fastpt.assemble import build
    from fastpt.train.recipe import PretrainRecipe, load_recipe, model_config

    shards = make_shards(tmp_path / "shards")
    teacher = tmp_path / "teacher.safetensors"
    m = build({"backbone": tiny_model("mlm")["backbone"], "objective": {"name": "mlm"}}, vocab_size=97,
              special_ids={"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    save_file({k: v.contiguous() for k, v in m.backbone.state_dict().items()}, str(teacher))
    reads = []
    real = distill.SelfDistillation.load_teacher
    monkeypatch.setattr(distill.SelfDistillation, "load_teacher", lambda self, src: (reads.append(src), real(self, src))[1])
    cfg = recipe(shards, tmp_path / "run", model=tiny_model("self_distill", teacher_path=str(teacher)),
                 train={"fsdp": True, "max_steps": 4}, output={**QUIET, "save_every": 2})
    run = PretrainRecipe(load_recipe(cfg, resolve_model=model_config), log=lambda m: None)
    try:
        run.setup()
        teacher.unlink()
        run.train()
        run.finish()
    finally:
        run.cleanup()
    assert len(reads) == 1  # at the build only
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000002",
                                                                                          "step-00000004"]


def test_fsdp_shards_a_layer_shared_across_depths_once(tmp_path):
    """ALBERT's share_layers puts one module at every depth: fully_shard on each entry raised torch's
    "already applied" AssertionError for the albert-base zoo model. One process is enough to show it;
    the FSDP run then trains as the plain one."""
    shards = make_shards(tmp_path / "shards")
    model = tiny_model()
    model["backbone"]["share_layers"] = True
    runs = []
    for fsdp in (False, True):
        cfg = recipe(shards, tmp_path / f"fsdp{fsdp}", model=model, train={"fsdp": fsdp, "max_steps": 3},
                     output={**QUIET, "save_every": 0})
        pretrain(cfg, log=lambda m: None)
        runs.append([float(x) for x in losses(tmp_path / f"fsdp{fsdp}")])
    assert runs[1] == pytest.approx(runs[0], rel=1e-5, abs=1e-6)


def test_fsdp_mesh_is_the_recipes_device(monkeypatch):
    """fully_shard without a mesh builds one on torch's default accelerator: CUDA on any GPU host, also for
    train.device: cpu (the parameters then moved to cuda:0). The mesh comes from the recipe's device."""
    from torch.distributed import device_mesh

    from fastpt.train import distributed as fdist

    asked = []
    real = device_mesh.init_device_mesh
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda kind, *a, **k: asked.append(kind) or real(kind, *a, **k))
    d = fdist.Dist(device=torch.device("cpu"))
    try:
        fdist.wrap(torch.nn.Sequential(torch.nn.Linear(3, 3)), d, fsdp=True)
    finally:
        fdist.cleanup(d)
    assert asked == ["cpu"]


def test_fsdp_trains_clip(tmp_path):
    """CLIP's logit_scale was a 0-dim parameter, which fully_shard refuses: train.fsdp crashed inside torch.
    One process is enough to show it; the FSDP model trains as the plain one (the clamp of on_step_end
    included) and its gathered state dict saves and loads."""
    from fastpt.assemble import build
    from fastpt.train import distributed as fdist

    text = {"vocab_size": 50, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_positions": 16,
            "dropout": 0.0, "attention_dropout": 0.0}
    vision = {"image_size": 8, "patch_size": 4, "in_channels": 1, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    config = {"backbone": {"builder": "two_tower", "text": text, "vision": vision},
              "objective": {"name": "clip", "embed_dim": 8, "init_logit_scale": 4.6}}  # near the ln 100 clamp
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (6, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(6, 1, 8, 8, generator=g)}
    runs = []
    for fsdp in (False, True):
        torch.manual_seed(0)
        model = build(config).train()
        d = fdist.Dist(device=torch.device("cpu"))
        try:
            wrapped = fdist.wrap(model, d, fsdp=fsdp)
            opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, foreach=True)
            losses = []
            for step in range(3):
                loss = wrapped(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                model.on_step_end(step)
                losses.append(float(loss.detach()))
            state = fdist.full_state_dicts(wrapped, opt)[0] if fsdp else model.state_dict()
        finally:
            fdist.cleanup(d)
        runs.append(losses)
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)
    shadow = build(config)
    shadow.load_state_dict(state)
    again = PretrainModel.from_pretrained(shadow.save_pretrained(tmp_path / "clip"))
    assert again.objective.logit_scale.shape == (1,)
    assert float(again.objective.logit_scale) == pytest.approx(float(state["objective.logit_scale"]))


# A runner whose rank FASTPT_TEST_RANK, in the step that FASTPT_TEST_STEP steps have preceded, raises
# (FASTPT_TEST_FAIL) or sends itself a signal (FASTPT_TEST_SIGNAL); each worker writes its exit status to rc<rank>.
EVENT_RUNNER = """import os, signal, sys
from fastpt.train import recipe as R
rank, at = int(os.environ["FASTPT_TEST_RANK"]), int(os.environ["FASTPT_TEST_STEP"])
orig = R.PretrainRecipe._micro_step
def event(self, *a, **k):
    if self.dist.rank == rank and self.step == at and a[1] == 0:
        if os.environ.get("FASTPT_TEST_FAIL"):
            raise RuntimeError("simulated failure on one rank")
        os.kill(os.getpid(), int(os.environ["FASTPT_TEST_SIGNAL"]))
    return orig(self, *a, **k)
R.PretrainRecipe._micro_step = event
from fastpt.train import pretrain_main
rc = pretrain_main(sys.argv[1:])
open(os.path.join(os.environ["FASTPT_TEST_OUT"], "rc" + os.environ["RANK"]), "w").write(str(rc))
sys.exit(rc)
"""


def launch_event(root, cfg, timeout, **event):
    """torchrun of EVENT_RUNNER on 2 processes: (exit status, stdout + stderr, every worker's exit status);
    a run still going after ``timeout`` seconds is killed and fails the test."""
    (root / "event_runner.py").write_text(EVENT_RUNNER)
    config = root / "event.yaml"
    config.write_text(yaml.safe_dump(cfg))
    e = {**env(), **{f"FASTPT_TEST_{k.upper()}": str(v) for k, v in event.items()}, "FASTPT_TEST_OUT": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "event_runner.py"), "--config", str(config)]
    proc = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own: end them by pid, then torchrun
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in workers:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the 2-rank run was still going after {timeout} s (hung): {out[-3000:]}")
    ranks = {r: int((root / f"rc{r}").read_text()) for r in range(2) if (root / f"rc{r}").exists()}
    return proc.returncode, out, ranks


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    """A rank that raised waited in cleanup's gloo barrier (pretrain's finally) while the other waited in the
    step's next all-reduce: both hung for the group's 30-minute timeout and the error was never printed. The
    failing rank now prints it (tagged with its rank and step) and leaves the group without the barrier; the
    other's all-reduce fails on the closed connection, and torchrun ends the job within seconds."""
    shards = make_shards(tmp_path / "shards", n_docs=60, min_len=3, max_len=40)
    cfg = recipe(shards, tmp_path / "run", train={"max_steps": 50}, output={**QUIET, "save_every": 0})
    rc, out, _ = launch_event(tmp_path, cfg, timeout=60, rank=1, step=2, fail=1)
    assert rc != 0, out[-3000:]
    assert "fastpt pretrain: rank 1 of 2 failed at step 2" in out and "simulated failure on one rank" in out, out[-3000:]


@pytest.mark.parametrize("objective,mode,sig,extra", [
    ("mlm", "pack", signal.SIGTERM, 1),  # agreed in the target-count all-reduce before the micro-steps
    ("sop", "doc", signal.SIGINT, 0),  # in the token-count all-reduce of padded rows, after them
    ("sop", "pack", signal.SIGTERM, 0),  # no all-reduce to ride on: one of its own, at the step's end
])
def test_a_signal_to_one_rank_stops_every_rank_within_two_steps(tmp_path, objective, mode, sig, extra):
    """The ranks agreed to stop only at the next logging step (the loss all-reduce carried the request):
    under torchrun, whose SIGTERM is followed by SIGKILL 30 s later, a run whose log_every steps took
    longer lost its final checkpoint. And when only some ranks got the signal, rank 0 ended with exit
    status 0 and summary.json's stopped_by null. The request now rides on an all-reduce of every step, read
    one step later: every rank stops two steps after the one in progress at most (one step sooner where
    the all-reduce comes after the micro-steps) with the signal and its exit status."""
    shards = make_shards(tmp_path / "shards", n_docs=60, min_len=3, max_len=40)
    at, log_every = 3, 1000  # the logging step the old agreement waited for is past max_steps
    cfg = recipe(shards, tmp_path / "run", model=tiny_model(objective), data={"mode": mode},
                 train={"max_steps": 30}, output={**QUIET, "log_every": log_every, "save_every": 0})
    rc, out, ranks = launch_event(tmp_path, cfg, timeout=120, rank=1, step=at, signal=int(sig))
    assert ranks == {0: 128 + sig, 1: 128 + sig}, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    stop = at + 2 + extra  # the step in progress (at + 1), then one or two more
    assert summary["stopped_by"] == sig.name and summary["steps"] == stop, (summary, out[-3000:])
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == [f"step-{stop:08d}"]


def test_image_ranks_see_what_one_process_sees_in_every_epoch(tmp_path):
    """2 ranks over 11 images: each rank's epoch was padded to 6 images by wrapping around, so from the
    first epoch boundary on the ranks' combined batches held other images than one process's combined
    batch (from step 2 of 2 x 2 here, the one that crosses it). Rank r's k-th image is now one process's
    image k * 2 + r of one stream of epochs."""
    from fastpt.train.data import ImageStream

    for i in range(11):
        (tmp_path / f"img{i:02d}.pgm").write_bytes(b"P5\n4 4\n255\n" + bytes([i * 20] * 16))

    def ids(stream, batch, steps):
        it = stream.batches(batch)
        return [[round(int(x[0, 0, 0]) / 20) for x in next(it)["pixel_values"]] for _ in range(steps)]

    steps = 17  # 3 epochs of 11 images in steps of 2 x 2
    one = ids(ImageStream(str(tmp_path), seed=0), 4, steps)
    ranks = [ids(ImageStream(str(tmp_path), seed=0, rank=r, world_size=2), 2, steps) for r in range(2)]
    for s in range(steps):
        assert sorted(ranks[0][s] + ranks[1][s]) == sorted(one[s]), s
        assert ranks[0][s] == one[s][0::2] and ranks[1][s] == one[s][1::2], s  # rank r: positions r, r + 2
