"""Objectives that couple the samples of a batch across ranks, on 2 gloo processes (DDP, as the recipe wraps
them) against one process on the combined batch: SimCLR, MoCo v3 and CLIP all-gather their negatives, DINO
all-reduces its center."""
import os

import pytest
import torch
import torch.distributed as dist

from fastpt.assemble import build
from fastpt.train import distributed as fdist
from tests.helpers import free_port, spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD, B = 2, 8
VIT = {"builder": "vit", "image_size": 8, "patch_size": 4, "in_channels": 1, "hidden_size": 16, "num_layers": 1,
       "num_heads": 2, "intermediate_size": 32, "dropout": 0.0}
TEXT = {"vocab_size": 50, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
        "max_positions": 16, "dropout": 0.0, "attention_dropout": 0.0}
CONFIGS = {
    "simclr": {"backbone": VIT, "objective": {"name": "simclr", "proj_dim": 8, "proj_hidden_dim": 16}},
    "moco_v3": {"backbone": VIT, "objective": {"name": "moco_v3", "proj_dim": 8, "proj_hidden_dim": 16,
                                               "pred_hidden_dim": 16}},
    "clip": {"backbone": {"builder": "two_tower", "text": TEXT,
                          "vision": {k: v for k, v in VIT.items() if k != "builder"}},
             "objective": {"name": "clip", "embed_dim": 8, "text_pooling": "mean"}},
    "dino": {"backbone": VIT,
             "objective": {"name": "dino", "out_dim": 24, "head_hidden_dim": 16, "bottleneck_dim": 8,
                           "num_local_crops": 2, "center_momentum": 0.5}},
}
METRICS = {"simclr": ["accuracy"], "moco_v3": ["accuracy"],
           "clip": ["image_to_text_accuracy", "text_to_image_accuracy"]}


def _model(name):
    torch.manual_seed(0)
    return build(CONFIGS[name]).train()


def _batch(name, model):
    """The combined batch, prepared once: every rank takes its rows of the same views."""
    g = torch.Generator().manual_seed(0)
    px = torch.randn(B, 1, 8, 8, generator=g) + 2 * torch.randn(B, 1, 1, 1, generator=g)  # told apart by brightness
    if name == "clip":
        ids = torch.randint(5, 50, (B, 6), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px}
    out = model.prepare({"pixel_values": px}, seed=3)
    return {k: out[k] for k in ("views", "global_crops", "local_crops") if k in out}


def _rows(batch, lo, hi):
    """Images lo..hi of a batch: each key's tensor is made of blocks of B rows (views, crops), or has B rows."""
    out = {}
    for k, v in batch.items():
        out[k] = torch.cat([block[lo:hi] for block in v.split(B)])
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_process():
    res = {}
    for name in ("simclr", "moco_v3", "clip"):
        model = _model(name)
        out = model(**_batch(name, model))
        out.loss.backward()
        res[name] = {"grads": _grads(model), "metrics": {k: float(out.metrics[k]) for k in METRICS[name]},
                     "loss": float(out.loss)}
    model = _model("dino")
    out = model(**_batch("dino", model))
    out.loss.backward()
    model.on_step_end(0)
    res["dino"] = {"grads": _grads(model), "loss": float(out.loss), "center": model.objective.center.clone()}
    return res


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    d = fdist.init("cpu", timeout_s=60)
    res, per = {}, B // WORLD
    try:
        for name in ("simclr", "moco_v3", "clip"):
            model = _model(name)
            batch = _rows(_batch(name, model), rank * per, (rank + 1) * per)
            wrapped = fdist.wrap(model, d)  # DDP (and global BatchNorm), as the recipe does
            out = wrapped(**batch)
            out.loss.backward()
            metrics = torch.tensor([float(out.metrics[k]) for k in METRICS[name]])
            fdist.all_reduce(metrics, d, "mean")  # the recipe's mean over ranks
            res[name] = {"grads": _grads(model), "metrics": dict(zip(METRICS[name], metrics.tolist())),
                         "loss": float(out.loss)}
        # DINO: 2 micro-batches of 2 images per rank, accumulated, against one batch of 8 in one process
        model = _model("dino")
        full = _batch("dino", model)
        wrapped = fdist.wrap(model, d)
        losses = []
        for micro in range(2):
            lo = rank * per + micro * per // 2
            with fdist.sync_gradients(wrapped, micro == 1):
                out = wrapped(**_rows(full, lo, lo + per // 2))
                (out.loss / 2).backward()
            losses.append(out.loss.detach())
        loss = torch.stack(losses).mean()
        fdist.all_reduce(loss, d, "mean")
        model.on_step_end(0)
        res["dino"] = {"grads": _grads(model), "loss": float(loss), "center": model.objective.center.clone()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        fdist.cleanup(d)



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    spawn_ranks(_worker, (free_port(), str(out)), WORLD)
    return _one_process(), [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", ["simclr", "moco_v3", "clip"])
def test_gathered_objectives_train_with_the_gradient_of_one_process(runs, name):
    """Each rank's backward of a gathered loss gives its share of the global gradient and DDP averages the
    shares: 2 ranks trained with half the gradient of one process on the combined batch (grad_norm halved,
    clip_grad doubled in effect), until the objectives scaled it by the world size."""
    one, ranks = runs
    want = one[name]["grads"]
    for r in ranks:
        got = r[name]["grads"]
        assert set(got) == set(want)
        ratio = torch.cat([g.flatten() for g in got.values()]).norm() / torch.cat([g.flatten() for g in
                                                                                 want.values()]).norm()
        assert float(ratio) == pytest.approx(1.0, rel=1e-4)  # it was 0.5
        scale = max(float(g.abs().max()) for g in want.values())  # fp32 rounding: BatchNorm over 4 rows
        for k, g in got.items():
            torch.testing.assert_close(g, want[k], rtol=1e-3, atol=1e-4 * scale, msg=k)
        assert r[name]["loss"] == pytest.approx(one[name]["loss"], rel=1e-5)  # the value is unchanged


@pytest.mark.parametrize("name", ["simclr", "moco_v3", "clip"])
def test_gathered_accuracy_is_found_among_every_ranks_candidates(runs, name):
    """The loss takes every rank's negatives, the accuracy searched this rank's rows only: on 2 ranks a top-1
    among half the candidates, higher than one process's. It is found among the gathered keys now."""
    one, ranks = runs
    assert ranks[0][name]["metrics"] == pytest.approx(one[name]["metrics"], abs=1e-6)


def test_dino_two_ranks_with_accumulation_match_one_process(runs):
    """DINO's center moves once per optimizer step with the mean teacher output over every micro-batch and
    rank: 2 ranks x 2 accumulated micro-batches of 2 images give one process's step on 8 (loss, gradients,
    center). It moved once per micro-batch, each micro-batch centred by the one before."""
    one, ranks = runs
    for r in ranks:
        assert r["dino"]["loss"] == pytest.approx(one["dino"]["loss"], rel=1e-5)
        for k, g in r["dino"]["grads"].items():
            torch.testing.assert_close(g, one["dino"]["grads"][k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(r["dino"]["center"], one["dino"]["center"], rtol=1e-5, atol=1e-6)
