"""Vision objectives train on Fashion-MNIST through the same recipe (skipped without the Debian files)."""
import pytest

from fastpt.data.images import find_fashion_mnist
from fastpt.train import ConfigError, pretrain

from .pretrain_helpers import losses

try:
    find_fashion_mnist()
    HAVE_FMNIST = True
except FileNotFoundError:
    HAVE_FMNIST = False
pytestmark = pytest.mark.skipif(not HAVE_FMNIST, reason="fashion-mnist not installed (apt-get install "
                                                         "dataset-fashion-mnist)")


def vit(image_size=28, patch_size=7):
    return {"builder": "vit", "image_size": image_size, "patch_size": patch_size, "in_channels": 1, "hidden_size": 32,
            "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


OBJECTIVES = {
    "mae": {"name": "mae", "decoder_hidden_size": 32, "decoder_layers": 1, "decoder_heads": 2},
    "simclr": {"name": "simclr", "proj_dim": 16, "proj_hidden_dim": 32},
}


def run(tmp_path, objective, *, backbone=None, data=None, steps=3):
    cfg = {"model": {"backbone": backbone or vit(), "objective": OBJECTIVES[objective]},
           "data": {"images": "fashion-mnist", **(data or {})},
           "train": {"batch_size": 8, "max_steps": steps, "lr": 1e-3},
           "output": {"dir": str(tmp_path / objective), "save_every": 0, "log_every": 1, "tensorboard": False,
                      "plot": False, "progress": False}}
    return pretrain(cfg, log=lambda m: None)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_vision_objective_trains(tmp_path, objective):
    summary = run(tmp_path, objective)
    assert summary["steps"] == 3 and summary["unit"] == "patches"
    assert summary["tokens"] == 3 * 8 * 16  # 16 patches of 7x7 per 28x28 image
    assert all(float(x) == float(x) for x in losses(tmp_path / objective))


def test_resize_and_size_mismatch(tmp_path):
    summary = run(tmp_path, "mae", backbone=vit(image_size=16, patch_size=4), data={"image_size": 16}, steps=1)
    assert summary["tokens"] == 8 * 16
    with pytest.raises(ConfigError, match=r"the images are 1x28x28 .* the model expects 1x16x16"):
        run(tmp_path / "bad", "mae", backbone=vit(image_size=16, patch_size=4), steps=1)


def test_momentum_horizon_follows_max_tokens(tmp_path):
    """DINO's teacher momentum anneals over the run's length: from max_steps, or (it stayed None, the
    momentum constant) from max_tokens over the patches of a step: 8 images x 16 patches."""
    from fastpt.models.model import PretrainModel

    cfg = {"model": {"backbone": vit(), "objective": {"name": "dino", "out_dim": 32, "head_hidden_dim": 32,
                                                      "bottleneck_dim": 16}},
           "data": {"images": "fashion-mnist"},
           "train": {"batch_size": 8, "max_steps": None, "max_tokens": 3 * 8 * 16, "lr": 1e-3},
           "output": {"dir": str(tmp_path / "dino"), "save_every": 0, "log_every": 1, "tensorboard": False,
                      "plot": False, "progress": False}}
    assert pretrain(cfg, log=lambda m: None)["steps"] == 3
    model = PretrainModel.from_pretrained(tmp_path / "dino" / "checkpoints" / "step-00000003")
    assert model.config["objective"]["total_steps"] == 3


def _dino_run(out, steps, **extra):
    return {"model": {"backbone": vit(image_size=8, patch_size=4),
                      "objective": {"name": "dino", "out_dim": 32, "head_hidden_dim": 16, "bottleneck_dim": 8,
                                    "num_local_crops": 0}},
            "data": {"images": "fashion-mnist", "image_size": 8},
            "train": {"batch_size": 4, "max_steps": steps, "lr": 1e-3, "precision": "fp32", "device": "cpu"},
            "output": {"dir": str(out), "save_every": 3, "keep_last": 10, "log_every": 1, "tensorboard": False,
                       "plot": False, "progress": False}, **extra}


def test_momentum_horizon_follows_an_extended_or_continued_run(tmp_path):
    """The horizon filled from max_steps was frozen into the checkpoint: --resume with a larger max_steps (or
    init_from) kept it, so past the old length the momentum was 1 and the teacher never moved again. It is
    this run's length now, unless the recipe's model pins objective.total_steps."""
    import torch

    from fastpt.models.model import PretrainModel

    ckpt = lambda run, s: PretrainModel.from_pretrained(tmp_path / run / "checkpoints" / f"step-{s:08d}")  # noqa: E731
    pretrain(_dino_run(tmp_path / "run", 3), log=lambda m: None)
    lines = []
    pretrain(_dino_run(tmp_path / "run", 3), resume=True, overrides=["train.max_steps=6"], log=lines.append)
    assert any("objective.total_steps" in m and "3 -> 6" in m for m in lines)
    obj = ckpt("run", 6).objective
    assert obj.total_steps == 6 and obj.momentum(4) < 1.0
    t3, t6 = ckpt("run", 3).objective.teacher_backbone.state_dict(), obj.teacher_backbone.state_dict()
    assert any(not torch.equal(t3[k], t6[k]) for k in t3)  # the teacher moved after step 3
    cont = _dino_run(tmp_path / "cont", 4, init_from=str(tmp_path / "run"))
    cont["model"] = None
    pretrain(cont, log=lambda m: None)
    assert ckpt("cont", 4).objective.total_steps == 4
    pinned = _dino_run(tmp_path / "pinned", 3)
    pinned["model"]["objective"]["total_steps"] = 3
    pretrain(pinned, log=lambda m: None)
    pretrain(pinned, resume=True, overrides=["train.max_steps=6"], log=lambda m: None)
    assert ckpt("pinned", 6).objective.total_steps == 3


def test_dino_resume_is_exact(tmp_path):
    """A DINO run (grad_accum 2) resumed at step 3 of 6 ends with the tensors of the uninterrupted run (teacher,
    center and schedules included): the horizon is unchanged and no center update is pending at a checkpoint."""
    import shutil

    import torch

    from fastpt.models.model import PretrainModel

    run = tmp_path / "run"
    cfg = _dino_run(run, 6)
    cfg["train"]["grad_accum"] = 2  # the center's sums over micro-batches
    pretrain(cfg, log=lambda m: None)
    step6 = run / "checkpoints" / "step-00000006"
    want = PretrainModel.from_pretrained(step6).state_dict()
    shutil.rmtree(step6)
    pretrain(cfg, resume=True, log=lambda m: None)
    got = PretrainModel.from_pretrained(step6).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
