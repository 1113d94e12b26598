"""The pre-training recipe in one process: outputs, gradient accumulation, precision, activation
checkpointing, stop conditions, continued pre-training (init_from), the CLI, errors."""
import copy
import json
import math
import re
import shutil

import pytest
import torch
import yaml

from fastpt import _cpu_malloc
from fastpt.models.model import PretrainModel
from fastpt.train import ConfigError, load_recipe, pretrain, pretrain_main
from fastpt.train.logging import read_metrics

from tests.helpers import FullDisk

from .pretrain_helpers import losses, make_shards, recipe, tiny_model

QUIET = {"tensorboard": False, "plot": False, "progress": False}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "text")


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory):
    """Documents longer than any row: doc-mode rows are full, every row has seq_len - 1 LM targets."""
    return make_shards(tmp_path_factory.mktemp("shards") / "long", n_docs=60, min_len=40, max_len=50)


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Documents of 3 to 40 tokens: doc-mode rows are padded, packed rows hold several documents, so
    micro-batches hold different numbers of LM targets."""
    return make_shards(tmp_path_factory.mktemp("shards") / "short", n_docs=120, min_len=3, max_len=40)


def params(run_dir, step):
    model = PretrainModel.from_pretrained(run_dir / "checkpoints" / f"step-{step:08d}")
    return {k: v for k, v in model.state_dict().items()}


def test_outputs(shards, tmp_path):
    out = tmp_path / "run"
    lines = []
    summary = pretrain(recipe(shards, out, output={"tensorboard": True, "plot": True}), log=lines.append)
    # a CPU run keeps freed memory for reuse while it trains (fastpt._cpu_malloc), then gives malloc back
    assert any(m.startswith("pretrain: cpu: ") for m in lines) and not _cpu_malloc.is_tuned()
    assert (out / "config.yaml").is_file() and (out / "loss.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # MFU against the CPU's derived peak (None where this CPU's peak is unknown)
    assert rows[-1]["tokens"] == 6 * 3 * 17 and all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in rows)
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["mlm_loss"] == pytest.approx(r["loss"], rel=1e-6) for r in rows)
    assert rows[0]["lr"] == 1e-3  # warmup_steps 1: the peak at step 1, then the cosine
    saved = json.loads((out / "summary.json").read_text())
    for key in ("steps", "tokens", "tokens_per_s", "mfu", "final_loss", "checkpoint", "plot", "summary_line"):
        assert key in saved, key
    assert summary["steps"] == 6 and summary["tokens"] == 306 and (summary["mfu"] is None or 0 < summary["mfu"] < 1)
    assert summary["summary_line"].startswith("pretrain: 6 steps, 306 tokens") and "MFU " in summary["summary_line"]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["train"]["max_steps"] == 6 and recorded["model"]["name"] == "tiny-mlm"
    model = PretrainModel.from_pretrained(out / "checkpoints" / "step-00000006")
    assert type(model.objective).__name__ == "MLM"


@pytest.mark.parametrize("docs, mode", [("long_docs", "doc"), ("short_docs", "doc"), ("short_docs", "pack")])
def test_grad_accum_matches_the_big_batch(docs, mode, request, tmp_path):
    """Causal LM: batch 6 equals 2 micro-batches of 3 (same samples), also when the micro-batches hold
    different numbers of targets (padded rows, packed documents whose first token is no target): the
    loss is the token mean over the step (a mean of the two micro-batches' means was up to 1.5e-3 off,
    and the weights 4e-3 after 3 steps)."""
    runs = {}
    for name, b, accum in (("big", 6, 1), ("accum", 3, 2)):
        cfg = recipe(request.getfixturevalue(docs), tmp_path / name, model=tiny_model("clm"),
                     data={"mode": mode, "add_special": "none"},
                     train={"batch_size": b, "grad_accum": accum, "max_steps": 4}, output={**QUIET, "save_every": 0})
        pretrain(cfg, log=lambda m: None)
        runs[name] = ([float(x) for x in losses(tmp_path / name)], params(tmp_path / name, 4))
    assert runs["big"][0] == pytest.approx(runs["accum"][0], rel=1e-6, abs=1e-6)
    for k, v in runs["big"][1].items():
        torch.testing.assert_close(runs["accum"][1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_micro_batches_weigh_by_their_targets():
    """MLM's masks differ per micro-batch seed, so the recipe-level check above cannot use it: here the
    step's arithmetic on fixed prepared batches. Two micro-batches with 12 and 1 masked tokens give the
    gradient of one batch holding both (the per-micro-batch mean put 1/2 of the weight on one token), and
    a micro-batch without targets adds nothing to the logged loss."""
    from fastpt.objectives import MLM
    from fastpt.objectives.base import Objective
    from tests.objectives import tiny_text
    backbone = tiny_text()
    obj = MLM.from_backbone(backbone, mask_token_id=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 97, (4, 11), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:2].view(-1)[torch.randperm(22, generator=g)[:12]] = ids[:2].reshape(-1)[:12]
    labels[2, 4] = ids[2, 4]
    parts = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    assert [int(obj.loss_weight(p)) for p in parts] == [12, 1]
    assert Objective.loss_weight(obj, parts[0]) is None  # the default: every batch weighs the same

    def grads(batches, factors):
        for p in obj.parameters():
            p.grad = None
        for p in backbone.parameters():
            p.grad = None
        for b, f in zip(batches, factors):
            (obj(backbone, b).loss * f).backward()
        return [p.grad.clone() for p in backbone.parameters() if p.grad is not None]

    whole = grads([{"input_ids": ids, "labels": labels}], [1.0])
    counts = torch.stack([obj.loss_weight(p) for p in parts]).float()
    weighted = grads(parts, counts / counts.sum())
    for a, b in zip(weighted, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    plain = grads(parts, [0.5, 0.5])
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(plain, whole)) > 0.05


def test_activation_checkpointing_is_exact(shards, tmp_path):
    for name, ac in (("plain", False), ("ckpt", True)):
        cfg = recipe(shards, tmp_path / name, model=tiny_model(dropout=0.1),
                     train={"activation_checkpointing": ac, "max_steps": 3}, output={**QUIET, "save_every": 0})
        pretrain(cfg, log=lambda m: None)
    assert losses(tmp_path / "plain") == losses(tmp_path / "ckpt")


@pytest.mark.parametrize("objective, mode, precision", [("clm", "pack", "fp32"), ("prefix_lm", "pack", "fp32"),
                                                        ("mlm", "doc", "bf16"), ("mlm", "pack", "fp16")])
def test_objectives_modes_precisions(shards, tmp_path, objective, mode, precision):
    cfg = recipe(shards, tmp_path / "run", model=tiny_model(objective), data={"mode": mode},
                 train={"precision": precision, "max_steps": 3, "grad_accum": 2}, output={**QUIET, "save_every": 0})
    summary = pretrain(cfg, log=lambda m: None)
    assert summary["steps"] == 3 and summary["precision"] == precision
    assert all(float(x) == float(x) for x in losses(tmp_path / "run"))  # finite, not NaN
    if mode == "doc":
        assert summary["tokens"] < 3 * 2 * 3 * 17  # padding does not count


def test_fp16_logs_loss_scale_and_skipped_steps(shards, tmp_path, monkeypatch):
    """fp16 rows carry GradScaler's scale and the window's skipped updates: a scale of 2^40 overflows the
    fp16 gradients, so every step is skipped (scale halved) until it fits; a resumed run counts the same."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0 ** 40))
    lines = []
    cfg = recipe(shards, tmp_path / "run", train={"precision": "fp16", "max_steps": 4},
                 output={**QUIET, "save_every": 0, "log_every": 2})
    pretrain(cfg, log=lines.append)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["skipped_steps"] for r in rows] == [2, 2]  # counted per window, not cumulative
    assert [r["loss_scale"] for r in rows] == [2.0 ** 38, 2.0 ** 36]
    assert not math.isfinite(rows[0]["grad_norm"])
    assert any("skipped 2" in m for m in lines)
    # resumed inside the second window (from step 3's checkpoint): the window's count rides in the checkpoint
    two = recipe(shards, tmp_path / "two", train={"precision": "fp16", "max_steps": 4},
                 output={**QUIET, "save_every": 1, "log_every": 2})
    pretrain(two, log=lambda m: None)
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-00000004")
    pretrain(two, resume=True, log=lambda m: None)
    resumed = read_metrics(tmp_path / "two" / "metrics.csv")
    assert [(r["step"], r["skipped_steps"], r["loss_scale"]) for r in resumed] == \
        [(r["step"], r["skipped_steps"], r["loss_scale"]) for r in rows]
    plain = recipe(shards, tmp_path / "fp32", train={"max_steps": 2}, output={**QUIET, "save_every": 0})
    pretrain(plain, log=lambda m: None)
    assert "skipped_steps" not in read_metrics(tmp_path / "fp32" / "metrics.csv")[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_gradients_stop_the_run_before_any_checkpoint_holds_them(shards, tmp_path, monkeypatch,
                                                                            precision):
    """Without fp16's GradScaler nothing looked at the gradient norm: an inf gradient was applied (NaN weights),
    checkpoints written before the next logged row held them, a last step's went into the final checkpoint of
    a run reported as a success, and --resume picked the broken one. The steps are counted on the device and
    read before every checkpoint write and logged row: the run stops naming the step and the last good
    checkpoint, which --resume continues from."""
    from fastpt.train.recipe import PretrainRecipe

    real = PretrainRecipe._micro_step
    bad_steps = {2}

    def micro_step(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.step + 1 in bad_steps:  # the step being made
            next(p for p in self.params if p.grad is not None).grad.view(-1)[0] = math.inf

    monkeypatch.setattr(PretrainRecipe, "_micro_step", micro_step)
    cfg = recipe(shards, tmp_path / "run", train={"precision": precision, "max_steps": 4},
                 output={**QUIET, "save_every": 1, "log_every": 4})
    with pytest.raises(FloatingPointError, match=rf"not finite .* 1 step\(s\) up to step 2, and precision "
                                                 rf"{precision} .* last checkpoint is step 1: --resume"):
        pretrain(cfg, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000001"]
    bad_steps.clear()
    assert pretrain(cfg, resume=True, log=lambda m: None)["steps"] == 4
    for p in PretrainModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step-00000004").parameters():
        assert torch.isfinite(p).all()
    bad_steps.add(3)  # the last step of a run saving only at its end: no final checkpoint, an error
    last = recipe(shards, tmp_path / "last", train={"precision": precision, "max_steps": 3},
                  output={**QUIET, "save_every": 0, "log_every": 100})
    with pytest.raises(FloatingPointError, match="up to step 3, .* had not saved one yet"):
        pretrain(last, log=lambda m: None)
    assert not list((tmp_path / "last" / "checkpoints").glob("step-*"))


def test_resume_applies_the_recipes_optimizer_hyperparameters(shards, tmp_path):
    """torch's optimizer load_state_dict restores the saved groups' weight_decay, betas and eps: a resume with
    other values kept the first run's forever while config.yaml recorded the new ones. The recipe's apply
    from the resumed step on, and the change is logged."""
    from fastpt.train.recipe import PretrainRecipe

    cfg = recipe(shards, tmp_path / "run", train={"max_steps": 2}, output={**QUIET, "save_every": 2})
    pretrain(cfg, log=lambda m: None)
    changed = recipe(shards, tmp_path / "run", train={"max_steps": 3, "weight_decay": 0.3, "betas": [0.8, 0.9],
                                                      "eps": 1e-6}, output={**QUIET, "save_every": 2})
    lines = []
    run = PretrainRecipe(load_recipe(changed), resume=True, log=lines.append)
    run.setup()
    try:
        groups = [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in run.optimizer.param_groups]
    finally:
        run.cleanup()
    assert groups == [(0.3, (0.8, 0.9), 1e-6), (0.0, (0.8, 0.9), 1e-6)]
    assert any("train.betas, train.eps, train.weight_decay differ from what step-00000002 trained with" in m
               for m in lines), lines


def test_stop_on_tokens_and_time(shards, tmp_path):
    cfg = recipe(shards, tmp_path / "tok", train={"max_steps": None, "max_tokens": 200}, output=QUIET)
    assert pretrain(cfg, log=lambda m: None)["steps"] == 4  # 51 tokens a step: 4 steps pass 200
    cfg = recipe(shards, tmp_path / "time", train={"max_steps": None, "max_time_s": 1e-6, "schedule": "constant"},
                 output=QUIET)
    assert pretrain(cfg, log=lambda m: None)["steps"] == 0  # the clock ran out before the first step


def test_rerun_needs_resume(shards, tmp_path):
    cfg = recipe(shards, tmp_path / "run", output=QUIET)
    pretrain(cfg, log=lambda m: None)
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        pretrain(cfg, log=lambda m: None)
    lines = []
    summary = pretrain(cfg, resume=True, log=lines.append)  # nothing left to do: max_steps reached
    assert summary["steps"] == 6 and summary["steps_this_run"] == 0
    assert any("resumed from" in m for m in lines)
    fresh = []
    pretrain(recipe(shards, tmp_path / "fresh", output=QUIET), resume=True, log=fresh.append)
    assert any("no checkpoint" in m for m in fresh)


def test_resume_continues_the_same_trajectory(shards, tmp_path):
    """In-process: a run stopped at step 3 by max_steps and resumed with a longer max_steps matches one run
    with the longer max_steps (constant schedule, so the horizon does not change the lr)."""
    base = dict(model=tiny_model(dropout=0.1), output={**QUIET, "save_every": 3})
    pretrain(recipe(shards, tmp_path / "one", train={"max_steps": 6, "schedule": "constant"}, **base),
             log=lambda m: None)
    pretrain(recipe(shards, tmp_path / "two", train={"max_steps": 3, "schedule": "constant"}, **base),
             log=lambda m: None)
    pretrain(recipe(shards, tmp_path / "two", train={"max_steps": 6, "schedule": "constant"}, **base),
             resume=True, log=lambda m: None)
    assert losses(tmp_path / "one") == losses(tmp_path / "two")


@pytest.mark.parametrize("mode", ["pack", "doc"])
def test_prefetched_batches_train_and_resume_as_without(shards, tmp_path, mode):
    """data.prefetch makes batches ahead on a thread: the run is the one without it, and a checkpoint holds
    the position after the batches trained on, not after those made ahead (a resumed run with prefetch
    matches an uninterrupted one without)."""
    base = dict(model=tiny_model(dropout=0.1), output={**QUIET, "save_every": 3})
    pretrain(recipe(shards, tmp_path / "plain", data={"mode": mode, "prefetch": 0},
                    train={"max_steps": 6, "schedule": "constant", "grad_accum": 2}, **base), log=lambda m: None)
    for steps, resume in ((3, False), (6, True)):
        pretrain(recipe(shards, tmp_path / "ahead", data={"mode": mode, "prefetch": 3},
                        train={"max_steps": steps, "schedule": "constant", "grad_accum": 2}, **base),
                 resume=resume, log=lambda m: None)
    assert losses(tmp_path / "plain") == losses(tmp_path / "ahead")
    state = json.loads((tmp_path / "ahead" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["data"]["consumed"] == 3 * 2 * 3  # 3 steps of 2 micro-batches of 3 rows


def test_prefetcher_hands_on_errors_and_stops():
    from fastpt.train.data import Prefetcher

    class Stream:
        def __init__(self):
            self.n = 0

        def batches(self, size):
            while True:
                self.n += 1
                if self.n == 3:
                    raise ValueError("shard 7 is corrupt")
                yield {"x": torch.full((size,), self.n)}

        def state_dict(self):
            return {"consumed": self.n}

    p = Prefetcher(Stream(), 2, 4)
    assert next(p)["x"].tolist() == [1, 1] and p.state_dict() == {"consumed": 1}
    assert next(p)["x"].tolist() == [2, 2] and p.state_dict() == {"consumed": 2}
    with pytest.raises(ValueError, match="shard 7 is corrupt"):
        next(p)
    with pytest.raises(ValueError, match="shard 7 is corrupt"):  # again, not a wait on the finished thread
        next(p)
    p.close()
    assert not p._thread.is_alive()


def test_resume_mid_logging_window(shards, tmp_path):
    """log_every 4, save_every 3: the checkpoint at step 6 falls inside the window of steps 5-8. Its
    sums are saved with the checkpoint, so the resumed run's step-8 row averages steps 5-8 as the
    uninterrupted run's does (it averaged 7-8 only), and the summary's first loss is step 4's row."""
    import shutil

    cfg = recipe(shards, tmp_path / "full", model=tiny_model(dropout=0.1), train={"max_steps": 12},
                 output={**QUIET, "save_every": 3, "log_every": 4, "keep_last": 10})
    first = pretrain(cfg, log=lambda m: None)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for step in (9, 12):  # as if killed after step 6's checkpoint
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / f"step-{step:08d}")
    (tmp_path / "cut" / "summary.json").unlink()
    lines = []
    again = pretrain({**cfg, "output": {**cfg["output"], "dir": str(tmp_path / "cut")}}, resume=True, log=lines.append)
    assert any("resumed from" in m and "step 6" in m for m in lines)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 3
    assert again["first_loss"] == first["first_loss"] and again["steps_this_run"] == 6


def test_checkpoints_carry_the_shards_tokenizer(tmp_path, monkeypatch):
    """Every checkpoint holds the shards' tokenizer.json (verified with the rest): fastpt eval and convert
    find it there from any directory (eval looked for the recipe's data.path relative to the current one,
    and could pick another run's tokenizer)."""
    import shutil

    from fastpt.data.tokenizer import train_tokenizer
    from fastpt.train import checkpoint as ckpt
    from fastpt.train.evaluate import find_tokenizer

    shards = make_shards(tmp_path / "shards")
    train_tokenizer(iter(["river stone cloud"] * 20), "wordpiece", 40).save(str(shards / "tokenizer.json"))
    pretrain(recipe(shards, tmp_path / "run", train={"max_steps": 3}, output=QUIET), log=lambda m: None)
    step = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert "tokenizer.json" in ckpt.verify_checkpoint(step)["files"]
    shutil.rmtree(shards)
    monkeypatch.chdir(tmp_path / "run")
    assert find_tokenizer(step) is not None


def test_init_from_fastpt_run(shards, tmp_path):
    pretrain(recipe(shards, tmp_path / "a", output=QUIET), log=lambda m: None)
    cfg = recipe(shards, tmp_path / "b", train={"max_steps": 1, "lr": 1e-12, "warmup_steps": 0}, output=QUIET)
    cfg["init_from"] = str(tmp_path / "a")
    cfg["model"] = None
    lines = []
    pretrain(cfg, log=lines.append)
    assert any("init_from fastpt model" in m for m in lines)
    a, b = params(tmp_path / "a", 6), params(tmp_path / "b", 1)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-9, msg=k)


def test_init_from_a_fastpt_run_takes_the_recipes_objective(shards, tmp_path):
    """init_from an MLM run with a CLM recipe trains CLM on the loaded backbone (it trained the checkpoint's
    MLM, bidirectional, and only logged that the recipe's model was not used); the loaded backbone weights
    are the checkpoint's; a recipe whose backbone is another architecture is refused by name."""
    pretrain(recipe(shards, tmp_path / "a", model=tiny_model("mlm"), output=QUIET), log=lambda m: None)
    cfg = recipe(shards, tmp_path / "b", model=tiny_model("clm"), train={"max_steps": 1, "lr": 1e-12,
                                                                         "warmup_steps": 0}, output=QUIET)
    cfg["init_from"] = str(tmp_path / "a")
    lines = []
    pretrain(cfg, log=lines.append)
    assert any("its mlm objective is replaced by the recipe's clm" in m and "not used: ['mlm']" in m for m in lines)
    model = PretrainModel.from_pretrained(tmp_path / "b" / "checkpoints" / "step-00000001")
    assert type(model.objective).__name__ == "CausalLM" and model.backbone.causal
    a, b = params(tmp_path / "a", 6), params(tmp_path / "b", 1)
    for k in a:
        if k.startswith("backbone."):
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-9, msg=k)
    wide = tiny_model("clm")
    wide["backbone"]["hidden_size"] = 48
    cfg = recipe(shards, tmp_path / "c", model=wide, output=QUIET)
    cfg["init_from"] = str(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"backbone differs from init_from .*backbone.hidden_size 48 vs 32"):
        pretrain(cfg, log=lambda m: None)


def test_init_from_keeps_the_loaded_heads_options(shards, tmp_path):
    """An MLM run with an untied head continued under an NSP recipe (whose MLM part ties by default): the NSP
    objective takes the loaded head untied, with its matrix, and the word embedding stays the checkpoint's
    (loading the untied head into a tied one would have written the decoder over the embedding)."""
    pretrain(recipe(shards, tmp_path / "a", model=tiny_model("mlm", tie_word_embeddings=False), output=QUIET),
             log=lambda m: None)
    model = tiny_model("nsp", cls_token_id=2, sep_token_id=3, mask_token_id=4)
    cfg = recipe(shards, tmp_path / "b", model=model, train={"max_steps": 1, "lr": 1e-12, "warmup_steps": 0},
                 output=QUIET)
    cfg["init_from"] = str(tmp_path / "a")
    pretrain(cfg, log=lambda m: None)
    a, b = params(tmp_path / "a", 6), params(tmp_path / "b", 1)
    emb = "backbone.embeddings.word_embeddings.weight"
    torch.testing.assert_close(b[emb], a[emb], rtol=0, atol=1e-9)
    torch.testing.assert_close(b["objective.mlm.head.weight"], a["objective.head.weight"], rtol=0, atol=1e-9)
    assert not torch.equal(b["objective.mlm.head.weight"], b[emb])


def test_resume_refuses_a_changed_model(shards, tmp_path):
    """--resume rebuilt the checkpoint's model whatever the recipe's model: said (hidden size, objective) and
    wrote the ignored model into config.yaml; now a changed model is refused by key, other changes (lr,
    max_steps) still resume."""
    cfg = recipe(shards, tmp_path / "run", model=tiny_model("mlm"), train={"max_steps": 2},
                 output={**QUIET, "save_every": 2})
    pretrain(cfg, log=lambda m: None)
    for key, value, shown in (("hidden_size", 48, "backbone.hidden_size 48 vs 32"),
                              ("mask_prob", 0.3, "objective.mask_prob 0.3 vs 0.15")):
        bad = copy.deepcopy(cfg)
        bad["model"]["backbone" if key == "hidden_size" else "objective"][key] = value
        bad["train"]["max_steps"] = 4
        with pytest.raises(ConfigError, match=rf"recipe's model differs .*{re.escape(shown)}"):
            pretrain(bad, resume=True, log=lambda m: None)
    ok = copy.deepcopy(cfg)
    ok["train"].update(max_steps=3, lr=5e-4)
    lines = []
    assert pretrain(ok, resume=True, log=lines.append)["steps"] == 3
    assert any("the recipe differs from" in m and "in train.lr, train.max_steps;" in m for m in lines)


def test_init_from_a_damaged_checkpoint_directory_is_refused(shards, tmp_path):
    """init_from naming one checkpoint (not the run directory) verifies it as --resume does: a flipped byte
    was trained on silently."""
    pretrain(recipe(shards, tmp_path / "a", output=QUIET), log=lambda m: None)
    step = tmp_path / "a" / "checkpoints" / "step-00000006"
    weights = step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    cfg = recipe(shards, tmp_path / "b", train={"max_steps": 1}, output=QUIET)
    cfg["init_from"], cfg["model"] = str(step), None
    with pytest.raises(ConfigError, match=r"init_from: .*model.safetensors"):
        pretrain(cfg, log=lambda m: None)


def test_init_from_hugging_face_dir(shards, tmp_path):
    from fastpt.assemble import build, to_hf

    model = build(tiny_model("mlm"), special_ids={"mask": 4, "pad": 0, "cls": 2, "sep": 3})
    to_hf(model, tmp_path / "hf")
    cfg = recipe(shards, tmp_path / "run", model={"backbone": tiny_model()["backbone"],
                                                  "objective": {"name": "mlm", "mask_token_id": 4}},
                 train={"max_steps": 2, "lr": 1e-12, "warmup_steps": 0}, output=QUIET)
    cfg["init_from"] = str(tmp_path / "hf")
    lines = []
    pretrain(cfg, log=lines.append)
    assert any("Hugging Face checkpoint" in m for m in lines)
    b = params(tmp_path / "run", 2)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-9, msg=k)


def test_init_from_a_fastpt_convert_directory_and_a_checkpoint_without_mlm_head(shards, tmp_path):
    """init_from naming a `fastpt convert --from-hf` output was refused with a pointer to the Python function
    (fastpt.from_hf), which loads it; the recipe now loads it the same way. A checkpoint without the MLM head
    (a BertModel) got a random one silently: the log says it is newly initialized."""
    from fastpt.assemble import build
    from fastpt.models.hf import convert_main, to_hf

    model = build(tiny_model("mlm"), special_ids={"mask": 4, "pad": 0, "cls": 2, "sep": 3})
    to_hf(model.backbone, None, tmp_path / "hf", hf_config={"mask_token_id": 4, "cls_token_id": 2,
                                                            "sep_token_id": 3})  # a BertModel: no MLM head
    assert convert_main(["--from-hf", str(tmp_path / "hf"), str(tmp_path / "conv")]) == 0
    for name in ("hf", "conv"):
        cfg = recipe(shards, tmp_path / f"run-{name}", train={"max_steps": 1, "lr": 1e-12, "warmup_steps": 0},
                     output=QUIET)
        cfg["init_from"], cfg["model"] = str(tmp_path / name), None
        lines = []
        pretrain(cfg, log=lines.append)
        assert any(("fastpt convert --from-hf directory" if name == "conv" else "Hugging Face checkpoint") in m
                   for m in lines), lines
        assert any(m.startswith("pretrain: warning: init_from: from_hf:") and "['mlm'] head(s): newly initialized"
                   in m for m in lines), lines
        b = params(tmp_path / f"run-{name}", 1)
        for k, v in model.backbone.state_dict().items():
            torch.testing.assert_close(b[f"backbone.{k}"], v, rtol=0, atol=1e-9, msg=k)


def test_init_from_refuses_shards_of_another_tokenizer(shards, tmp_path):
    """Continued pre-training on shards whose special ids are not the model's (another tokenizer) would
    mask with a word and mask real separators, silently: an error naming both."""
    from fastpt.assemble import build, to_hf

    to_hf(build(tiny_model("mlm"), special_ids={"mask": 90, "pad": 0, "cls": 2, "sep": 3}), tmp_path / "hf")
    cfg = recipe(shards, tmp_path / "run", model={"backbone": tiny_model()["backbone"],
                                                  "objective": {"name": "mlm", "mask_token_id": 90}}, output=QUIET)
    cfg["init_from"] = str(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"special token ids differ from the model's \(mask 4 vs 90"):
        pretrain(cfg, log=lambda m: None)


def test_max_tokens_in_doc_mode_sizes_the_schedule_by_real_tokens(shards, tmp_path):
    """doc mode pads rows: a schedule sized by seq_len-token rows ended long before the run (which counts
    real tokens) and the rest trained at the floor lr. Sized by the documents' mean length, the decay spans
    the run."""
    cfg = recipe(shards, tmp_path / "doc", data={"mode": "doc", "seq_len": 64},
                 train={"max_steps": None, "max_tokens": 1500, "warmup_steps": 0}, output=QUIET)
    summary = pretrain(cfg, log=lambda m: None)
    rows = read_metrics(tmp_path / "doc" / "metrics.csv")
    assert rows[-1]["step"] == summary["steps"] > 8
    assert all(a["lr"] > b["lr"] for a, b in zip(rows, rows[1:-2]))  # still decaying at the end, not at its floor


def test_schedule_decays_to_the_first_limit_reached(shards, tmp_path):
    """max_steps 1000 with max_tokens reached after 6 steps: the run stops at 6 and the schedule decays over
    those 6 (it kept the peak lr, sized by max_steps alone), reaching min_lr_ratio at the end."""
    cfg = recipe(shards, tmp_path / "both", train={"max_steps": 1000, "max_tokens": 6 * 3 * 17, "warmup_steps": 0,
                                                   "schedule": "linear", "min_lr_ratio": 0.0, "lr": 1e-3},
                 output=QUIET)
    assert pretrain(cfg, log=lambda m: None)["steps"] == 6
    lrs = [r["lr"] for r in read_metrics(tmp_path / "both" / "metrics.csv")]
    assert lrs == pytest.approx([1e-3 * (1 - s / 6) for s in range(6)])


def test_span_corruption_takes_its_sentinels_from_the_shards(tmp_path):
    """T5 span corruption writes sentinels counting down from the tokenizer's <extra_id_0> (the shards'
    special_ids "sentinel"); shards of a tokenizer without sentinels are refused (the fallback, vocab_size
    - 1, would be an ordinary token of the text)."""
    import numpy as np

    from fastpt.assemble import load_config
    from fastpt.data.shards import write_shards

    from .pretrain_helpers import SPECIALS, VOCAB

    model = load_config("t5-small")
    model["backbone"].update(hidden_size=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                             intermediate_size=16)
    model["backbone"].pop("max_positions", None)
    rng = np.random.default_rng(0)
    docs = [rng.integers(6, VOCAB - 1, size=int(rng.integers(5, 40))) for _ in range(100)]
    for name, extra in (("plain", {}), ("t5", {"eos": 5, "sentinel": VOCAB - 1})):
        write_shards(tmp_path / name, docs, vocab_size=VOCAB, special_tokens={**SPECIALS, **extra})
    cfg = recipe(tmp_path / "plain", tmp_path / "run", model=model, train={"max_steps": 2}, output=QUIET)
    with pytest.raises(ConfigError, match=r"no T5 sentinel tokens .* --sentinels"):
        pretrain(cfg, log=lambda m: None)
    cfg = recipe(tmp_path / "t5", tmp_path / "run", model=model, train={"max_steps": 2}, output=QUIET)
    assert pretrain(cfg, log=lambda m: None)["steps"] == 2
    trained = PretrainModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step-00000002")
    assert (trained.objective.sentinel_start_id, trained.objective.eos_id) == (VOCAB - 1, 5)


def test_text_objectives_prepare_on_the_host_then_move(shards, tmp_path):
    """Text batches were moved to the device and prepared there: T5 / UL2 span corruption has no GPU kernel, so
    the reference served (~100 small ops and three host reads per row on a GPU: 254 ms a 64 x 512 batch); MLM's
    id check, PrefixLM's lengths and NSP / SOP's boundaries were read back from the GPU every micro-batch. The
    recipe now prepares text batches on the host and moves the prepared batch; a "meta" device stands in for
    the GPU here: nothing can be computed on it, so the batch must arrive prepared, equal to the host's."""
    import numpy as np

    from fastpt.assemble import load_config
    from fastpt.data.shards import write_shards
    from fastpt.train.recipe import PretrainRecipe

    from .pretrain_helpers import SPECIALS, VOCAB

    rng = np.random.default_rng(0)
    docs = [rng.integers(6, VOCAB - 1, size=int(rng.integers(5, 40))) for _ in range(60)]
    write_shards(tmp_path / "t5", docs, vocab_size=VOCAB, special_tokens={**SPECIALS, "eos": 5, "sentinel": VOCAB - 1})
    runs = {name: (tmp_path / "t5", load_config(name)) for name in ("t5-small", "ul2-small")}
    for _, model in runs.values():
        model["backbone"].update(hidden_size=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                 intermediate_size=16)
        model["backbone"].pop("max_positions", None)
    runs.update({name: (shards, tiny_model(name)) for name in ("mlm", "clm", "prefix_lm", "sop")})
    for name, (data, model) in runs.items():
        cfg = recipe(data, tmp_path / name, model=model, train={"max_steps": 1}, output=QUIET)
        run = PretrainRecipe(load_recipe(cfg), log=lambda m: None)
        run.setup()
        try:
            raw = next(run.data.batches(4))
            on_host = run.model.prepare(run.to_device(raw), seed=3)
            run.device = torch.device("meta")
            moved = run.prepared(raw, 3)
        finally:
            run.cleanup()
        assert set(moved) == set(on_host), name
        for k, v in on_host.items():
            if isinstance(v, torch.Tensor):
                assert moved[k].device.type == "meta" and moved[k].shape == v.shape and moved[k].dtype == v.dtype, k


def test_errors_are_clear(shards, tmp_path):
    from fastpt.assemble import build

    small = tiny_model()
    small["backbone"]["vocab_size"] = 50
    build(small, special_ids={"mask": 4}).save_pretrained(tmp_path / "small")
    cfg = recipe(shards, tmp_path / "v", output=QUIET)
    cfg["init_from"] = str(tmp_path / "small")
    with pytest.raises(ConfigError, match="vocabulary of 97 ids, the model has 50"):
        pretrain(cfg, log=lambda m: None)
    with pytest.raises(ConfigError, match="model: a vit backbone does not train on text shards"):
        mae = {"backbone": {"builder": "vit", "image_size": 8, "patch_size": 4, "in_channels": 1, "hidden_size": 32,
                            "num_layers": 1, "num_heads": 2}, "objective": {"name": "mae", "decoder_hidden_size": 32,
                                                                         "decoder_layers": 1, "decoder_heads": 2}}
        pretrain(recipe(shards, tmp_path / "m", model=mae, output=QUIET), log=lambda m: None)
    with pytest.raises(ConfigError, match=r"model: backbone.num_layerz: unknown argument"):
        bad = tiny_model()
        bad["backbone"]["num_layerz"] = 2
        pretrain(recipe(shards, tmp_path / "b", model=bad, output=QUIET), log=lambda m: None)


def test_cli(shards, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(shards, tmp_path / "run", output=QUIET)))
    assert pretrain_main(["--config", str(path), "--set", "train.max_steps=2", "--set", "train.lr=5e-4"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == [1, 2]
    assert "pretrain: 2 steps" in capsys.readouterr().out
    assert pretrain_main(["--config", str(path), "--print-config", "--set", "train.seed=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["seed"] == 3
    assert pretrain_main(["--config", str(path), "--set", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key (did you mean 'lr'?)" in capsys.readouterr().err


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_packed_documents_encode_as_alone_with_a_position_offset(shards, tmp_path, position):
    """RoBERTa's learned positions start at position_offset 2: the packed batches' collated position ids
    (0 at each document) reached the embedding as given, so packed training looked up rows 0, 1, 2... where
    the same document alone (doc mode, inference, the HF model) reads 2, 3, 4..."""
    from fastpt.train.recipe import PretrainRecipe

    model = tiny_model()
    model["backbone"].update(position_offset=2 if position == "learned" else 0, pad_token_id=1,
                             position=position)
    run = PretrainRecipe(load_recipe(recipe(shards, tmp_path / "run", model=model, train={"max_steps": 1},
                                            output={**QUIET, "save_every": 0})), log=lambda m: None)
    run.setup()
    try:
        batch = run.to_device(next(run.data.batches(3)))
        backbone = run.model.backbone.eval()
        kwargs = {k: batch[k] for k in ("cu_seqlens", "max_seqlen", "position_ids") if k in batch}
        with torch.no_grad():
            packed = backbone(batch["input_ids"], **kwargs).last_hidden_state.reshape(-1, 32)
            cu = batch["cu_seqlens"].tolist()
            assert len(cu) > 4  # several documents, most not starting a row
            for a, b in zip(cu[:-1], cu[1:]):
                alone = backbone(batch["input_ids"].reshape(-1)[None, a:b]).last_hidden_state[0]
                torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
    finally:
        run.cleanup()


@pytest.mark.parametrize("mode", ["pack", "doc"])
def test_sentence_pairs_come_from_one_document_without_separators(tmp_path, mode):
    """SOP / NSP write [CLS] A [SEP] B [SEP] themselves: with data.add_special auto the recipe read the
    documents wrapped in [CLS] / [SEP] (nested separators in every pair, which also gave away SOP's
    order), and packed rows gave segments straddling two documents. Every document here is one repeated
    token: a pair in order holds one id besides its 3 special tokens."""
    from fastpt.train.recipe import PretrainRecipe
    from fastpt.data.shards import write_shards

    docs = [[5 + i % 90] * (4 + (7 * i) % 23) for i in range(120)]
    shards = tmp_path / "same"
    write_shards(shards, docs, vocab_size=97, special_tokens={"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    cfg = recipe(shards, tmp_path / "run", model=tiny_model("sop"), data={"mode": mode},
                 train={"max_steps": 2}, output={**QUIET, "save_every": 0})
    run = PretrainRecipe(load_recipe(cfg), log=lambda m: None)
    run.setup()
    raw = next(run.data.batches(8))
    batch = run.model.prepare(run.to_device(raw), seed=1)
    ids, mask, label = batch["input_ids"], batch["attention_mask"].bool(), batch["sentence_order_label"]
    for row, m in zip(ids, mask):
        tokens = row[m].tolist()
        assert tokens.count(2) == 1 and tokens.count(3) == 2, tokens  # only the pair's own separators
        assert len(set(t for t in tokens if t not in (2, 3))) == 1, tokens  # one document
    run.cleanup()  # releases output.dir for the run below
    assert pretrain(cfg, log=lambda m: None)["steps"] == 2
    with pytest.raises(ConfigError, match="data.add_special: the sop objective writes its own"):
        pretrain(recipe(shards, tmp_path / "bad", model=tiny_model("sop"), data={"add_special": "cls_sep"},
                        train={"max_steps": 1}, output=QUIET), log=lambda m: None)


def test_a_second_run_into_the_same_output_dir_is_refused(shards, tmp_path):
    """Nothing stopped a second pretrain (a requeued job while the first still ran) in the same output.dir: both
    wrote the same checkpoints and metrics.csv. The directory is locked for the run; the refusal names the
    holder's pid, and the lock goes with its process (a killed run's lock file is taken over)."""
    import subprocess
    import sys

    from fastpt.train.recipe import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastpt._lock import lock_dir; "
                               f"lock_dir({str(out)!r}, {LOCK_FILE!r}, 'x'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"output.dir: .* in use by another fastpt pretrain run \(pid {holder.pid}"):
            pretrain(recipe(shards, out, output=QUIET), log=lambda m: None)
    finally:
        holder.kill()
        holder.wait()
    assert pretrain(recipe(shards, out, output=QUIET), log=lambda m: None)["steps"] == 6
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_the_shards_vocabulary_replacing_the_configs_is_logged(shards, tmp_path):
    """The model is built for the shards' vocabulary whatever backbone.vocab_size says (the zoo's 30522 for
    a trained tokenizer); a config's own size was replaced without a word."""
    model = tiny_model()
    model["backbone"]["vocab_size"] = 128
    lines = []
    pretrain(recipe(shards, tmp_path / "run", model=model, train={"max_steps": 1}, output=QUIET), log=lines.append)
    assert any("model.backbone.vocab_size 128 -> 97, the shards' tokenizer's" in m for m in lines)


def test_resume_of_a_self_distill_run_whose_teacher_path_is_gone(shards, tmp_path):
    """The resume's model check built the recipe's model, which read self_distill's teacher_path again
    (FileNotFoundError once the teacher directory was removed; the checkpoint holds the teacher)."""
    import glob
    import shutil

    pretrain(recipe(shards, tmp_path / "t", train={"max_steps": 1}, output=QUIET), log=lambda m: None)
    teacher = tmp_path / "teacher"
    shutil.copytree(sorted(glob.glob(str(tmp_path / "t" / "checkpoints" / "step-*")))[-1], teacher)
    cfg = recipe(shards, tmp_path / "d", model=tiny_model("self_distill", teacher_path=str(teacher)),
                 train={"max_steps": 1}, output=QUIET)
    pretrain(cfg, log=lambda m: None)
    shutil.rmtree(teacher)
    cfg["train"]["max_steps"] = 2
    assert pretrain(cfg, resume=True, log=lambda m: None)["steps"] == 2


def test_a_filesystem_without_flock_runs_without_the_lock(shards, tmp_path, monkeypatch):
    """Lustre without -o flock (ENOSYS) or some FUSE mounts (EOPNOTSUPP): any flock failure read as 'held by
    another run (pid ?)', refusing every run; only EWOULDBLOCK means held, others warn and run unlocked."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="cannot lock .*running without"):
        assert pretrain(recipe(shards, tmp_path / "run", train={"max_steps": 1}, output=QUIET),
                        log=lambda m: None)["steps"] == 1


def test_span_objectives_need_a_sentinel_per_span(tmp_path):
    """Each noise span of a row takes its own sentinel, counting down from <extra_id_0>; shards of a tokenizer
    with fewer sentinels than a row's spans (--sentinels 10 and t5-small's seq_len 568: 28 spans) had
    ordinary tokens written as sentinels, silently. The recipe counts the tokenizer's sentinels and the most
    spans a row of data.seq_len gets (T5's rule, per denoiser), and refuses naming both and the fixes."""
    import numpy as np

    from fastpt.assemble import load_config
    from fastpt.data.shards import write_shards
    from fastpt.data.tokenizer import special_token_ids, train_tokenizer

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    tok = train_tokenizer(iter([" ".join(words[i:] + words[:i]) for i in range(10)] * 5), "wordpiece", 80,
                          num_sentinels=3)
    tok.save(str(tmp_path / "tok.json"))
    vocab, special = tok.get_vocab_size(), special_token_ids(tok)
    assert tok.id_to_token(vocab - 3) == "<extra_id_2>" and special["sentinel"] == vocab - 1
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, vocab - 3, size=int(rng.integers(30, 90))) for _ in range(40)]
    write_shards(tmp_path / "shards", docs, vocab_size=vocab, special_tokens=special,
                 tokenizer_file=tmp_path / "tok.json")
    models = {}
    for name in ("t5-small", "ul2-small"):
        models[name] = load_config(name)
        models[name]["backbone"].update(hidden_size=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                        intermediate_size=16, vocab_size=vocab)
        models[name]["backbone"].pop("max_positions", None)
    # T5 (15% noise, mean span 3): 80 tokens -> 12 noise in 4 spans; 70 (10.5 -> 10 noise) is the longest with 3
    for model, seq_len, message in (
            ("t5-small", 80, r"up to 4 noise spans under T5SpanCorruption, .* has 3 sentinels \(<extra_id_0> .. "
                             r"<extra_id_2>\).*--sentinels 4 \(or more\), or lower data.seq_len to 70$"),
            ("ul2-small", 64, r"up to 11 noise spans under UL2 \(X denoiser, mean span 3, noise 0.5\), .* has 3 "
                              r"sentinels .*--sentinels 11 \(or more\), or lower data.seq_len to 21$")):
        cfg = recipe(tmp_path / "shards", tmp_path / f"run{seq_len}", model=models[model], data={"seq_len": seq_len},
                     train={"max_steps": 1}, output=QUIET)
        with pytest.raises(ConfigError, match=message):
            pretrain(cfg, log=lambda m: None)
    cfg = recipe(tmp_path / "shards", tmp_path / "run", model=models["t5-small"], data={"seq_len": 70},
                 train={"max_steps": 1}, output=QUIET)
    assert pretrain(cfg, log=lambda m: None)["steps"] == 1


def test_whole_word_masking_on_shards_uses_the_tokenizers_word_starts(shards, tmp_path):
    """Shards carry token ids only: whole_word_masking crashed with a KeyError (no word_ids) at the first
    step. The recipe hands the MLM the shards' tokenizer's word starts; shards without a tokenizer file
    are refused before training, naming the option."""
    from fastpt.data.shards import write_shards
    from fastpt.data.tokenizer import special_token_ids, train_tokenizer

    words = ["token", "izat", "ion", "pre", "train", "ing", "model", "data", "word", "piece"]
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(words[int(i)] + words[int(j)] for i, j in torch.randint(0, 10, (30, 2), generator=gen))
            for _ in range(40)]
    tok = train_tokenizer(docs, "wordpiece", 120, min_frequency=1)
    tok.save(str(tmp_path / "tokenizer.json"))
    ids = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    write_shards(tmp_path / "wp", ids, vocab_size=tok.get_vocab_size(), special_tokens=special_token_ids(tok),
                 tokenizer_file=tmp_path / "tokenizer.json")
    model = tiny_model(whole_word_masking=True)
    summary = pretrain(recipe(tmp_path / "wp", tmp_path / "run", model=model, train={"max_steps": 2},
                              output={**QUIET, "save_every": 0}), log=lambda m: None)
    assert summary["steps"] == 2
    with pytest.raises(ConfigError, match="model.objective.whole_word_masking: the shards .* hold no tokenizer file"):
        pretrain(recipe(shards, tmp_path / "none", model=model, output=QUIET), log=lambda m: None)


def test_a_read_only_output_dir_is_a_config_error(shards, tmp_path, monkeypatch, capsys):
    """pretrain into an existing output.dir on a read-only filesystem (or without write permission): creating
    the lock file raised OSError (EROFS / EACCES), which ended in a traceback; it is a ConfigError naming
    output.dir, one line from the CLI."""
    import errno

    import fastpt.train.recipe as recipe_mod

    def read_only(directory, name, what):
        raise OSError(errno.EROFS, "Read-only file system", str(directory / name))

    monkeypatch.setattr(recipe_mod, "lock_dir", read_only)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(ConfigError, match=rf"output.dir: {re.escape(str(out))} is not writable \(Read-only file "
                                          r"system: cannot create .*\.fastpt-pretrain\.lock\)"):
        pretrain(recipe(shards, out, output=QUIET), log=lambda m: None)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(shards, out, output=QUIET)))
    assert pretrain_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpt pretrain: error: output.dir:") and "Traceback" not in err


ROW = {"step": 1, "tokens": 51, "loss": 4.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0, "mfu": 0.001,
       "elapsed_s": 0.1}


def _metrics_file(out, steps):
    from fastpt.train.logging import RunLogger

    lg = RunLogger(out, tensorboard=False, plot=False, progress=False, log=lambda m: None)
    for s in steps:
        lg.log({**ROW, "step": s, "tokens": 51 * s})
    return (out / "metrics.csv").read_text()


@pytest.mark.parametrize("torn", ["5,255,4.569,1.4492753623188407e-", "1", "3,153,4.5,0.001,1.0,1000.0,0.001,0.1\r",
                                  "5,255,4.5,0.001,x.0,1000.0,0.001,0.1\r\n"])
def test_resume_drops_a_metrics_row_torn_by_a_full_disk(tmp_path, torn):
    """A full disk tears the metrics.csv append that does not fit: a torn float ('1.449e-') made --resume fail
    with ValueError before training, a torn step ('1' of '12,...') was read as a phantom row of step 1 and
    kept. A last line without its line end, or one that does not parse, is dropped with a warning; the rest is
    still cut at the resumed step. Any other bad line is an error naming the file and the line."""
    from fastpt.train.logging import RunLogger

    out = tmp_path / "run"
    text = _metrics_file(out, [1, 2, 3, 4])
    (out / "metrics.csv").write_text(text + torn, newline="")
    lines = []
    lg = RunLogger(out, start_step=3, tensorboard=False, plot=False, progress=False, log=lines.append)
    assert [r["step"] for r in lg.rows] == [1, 2, 3] and all(r["loss"] == 4.5 for r in lg.rows)
    assert lines == [f"pretrain: warning: {out / 'metrics.csv'}: dropped the torn last row {torn.rstrip()!r} "
                     "(a write cut short, e.g. by a full disk)"]
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]  # rewritten whole
    (out / "metrics.csv").write_text(text.replace("\n2,102,", "\n2,1x2,", 1) + torn, newline="")
    with pytest.raises(ValueError, match=r"metrics\.csv: line 3: invalid literal"):
        RunLogger(out, start_step=3, tensorboard=False, plot=False, progress=False, log=lines.append)


def _full_disk_in_logging(monkeypatch, when):
    """``open`` in fastpt.train.logging: a file ``when(path, mode)`` picks gets 10 bytes of room."""
    import builtins

    import fastpt.train.logging as logging_mod

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(f, 10) if when(str(path), mode) else f

    monkeypatch.setattr(logging_mod, "open", fake_open, raising=False)


def test_a_full_disk_mid_run_cuts_the_torn_row_and_ends_in_one_line(shards, tmp_path, monkeypatch, capsys):
    """A metrics.csv append the disk had no room for raised a bare OSError ("[Errno 28] No space left on
    device", no file named: a traceback) and left the torn row for the resume to trip on. The row is cut
    off again and the run ends with MetricsWriteError naming the file: one line, status 2."""
    appends = []

    def third_append(path, mode):
        if path.endswith("metrics.csv") and mode == "a":
            appends.append(path)
            return len(appends) >= 2  # step 1 rewrites the file (new columns), step 2 appends, step 3 fails
        return False

    _full_disk_in_logging(monkeypatch, third_append)
    out = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(shards, out, output=QUIET)))
    assert pretrain_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastpt pretrain: error: [Errno 28] {out / 'metrics.csv'}: cannot append the row of "
                          "step 3 (No space left on device)") and "Traceback" not in err, err
    text = (out / "metrics.csv").read_text()
    assert text.endswith("\n") and [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2]


def test_end_of_run_write_failures_are_warnings(shards, tmp_path, monkeypatch):
    """A full disk after the final checkpoint: loss.png (savefig, sometimes left 0 bytes), TensorBoard's close
    and summary.json raised a traceback and no summary line. Each is a warning naming the file, the plot and
    summary.json are written through a temporary name (nothing half written is left), and the run's result
    stands."""
    from matplotlib.figure import Figure

    def savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)
    _full_disk_in_logging(monkeypatch, lambda path, mode: "summary.json" in path and "w" in mode)
    out = tmp_path / "run"
    lines = []
    summary = pretrain(recipe(shards, out, train={"max_steps": 2}, output={**QUIET, "plot": True}), log=lines.append)
    assert summary["steps"] == 2 and summary["plot"] is None
    assert f"pretrain: warning: {out / 'loss.png'}: not written (No space left on device); the run's result " \
           "stands" in lines
    assert f"pretrain: warning: {out / 'summary.json'}: not written (No space left on device); the run's result " \
           "stands" in lines
    assert lines[-1].startswith("pretrain: 2 steps") and f"metrics {out / 'metrics.csv'}" in lines[-1]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv"]


def test_tensorboard_write_failures_are_a_warning_and_logging_goes_on(tmp_path):
    """TensorBoard events are a second copy of metrics.csv's rows: a failed write (the writer thread's ENOSPC,
    raised at the next add_scalar, or at close) ended the run in a traceback. It is one warning naming the
    events directory; the rows go on to metrics.csv and the summary names no TensorBoard directory."""
    from fastpt.train.logging import RunLogger

    class FailingWriter:
        def __init__(self, fail_after):
            self.calls, self.fail_after, self.closed = 0, fail_after, 0

        def add_scalar(self, *args):
            self.calls += 1
            if self.calls > self.fail_after:
                raise OSError(28, "No space left on device")

        def close(self):
            self.closed += 1
            raise OSError(28, "No space left on device")

    for fail_after in (10, 10**6):  # mid-run (the second row's scalars), at close only
        out = tmp_path / f"run{fail_after}"
        lines = []
        lg = RunLogger(out, tensorboard=False, plot=False, progress=False, log=lines.append)
        lg.tb = writer = FailingWriter(fail_after)
        for s in (1, 2, 3):
            lg.log({**ROW, "step": s})
        summary = {"steps": 3, "tokens": 153, "train_time_s": 1.0}
        assert lg.finish(summary).startswith("pretrain: 3 steps") and summary["tensorboard"] is None
        then = f"logging goes on to {out / 'metrics.csv'} only" if fail_after == 10 else "the run's result stands"
        assert [m for m in lines if "warning" in m] == [
            f"pretrain: warning: {out / 'tensorboard'}: TensorBoard events cannot be written (No space left on "
            f"device); {then}"]
        assert writer.closed == 1 and [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]


def test_a_failed_run_leaves_no_tensorboard_writer_behind(shards, tmp_path, monkeypatch):
    """Only finish() closed the SummaryWriter: each pretrain call that ended on an exception left its
    writer thread running (a sweep or notebook retrying piled them up)."""
    import threading

    pytest.importorskip("torch.utils.tensorboard")
    from fastpt.train import recipe as recipe_mod

    real = recipe_mod.PretrainRecipe._micro_step
    def failing(self, *a, **k):
        if self.step == 2:
            raise RuntimeError("injected failure")
        return real(self, *a, **k)
    monkeypatch.setattr(recipe_mod.PretrainRecipe, "_micro_step", failing)
    writers = lambda: sum(t.name == "_AsyncWriterThread" or "AsyncWriter" in type(t).__name__  # noqa: E731
                          for t in threading.enumerate())
    before = writers()
    for i in range(2):
        cfg = recipe(shards, tmp_path / f"run{i}", output={**QUIET, "tensorboard": True, "save_every": 0})
        with pytest.raises(RuntimeError, match="injected"):
            pretrain(cfg, log=lambda m: None)
    assert writers() == before
