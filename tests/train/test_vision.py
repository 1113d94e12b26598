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
