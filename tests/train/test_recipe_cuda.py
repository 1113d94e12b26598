"""fastpt pretrain on a GPU (skipped without one): each text objective's batches are prepared on the host and
moved pinned (``prepare_on_host``), the vision ones augmented on the device; the losses follow the CPU run's
(the same batches and seeds, fp32: only the kernels differ), and the run saves and resumes there."""
import numpy as np
import pytest
import torch

from fastpt.assemble import load_config
from fastpt.data.shards import write_shards
from fastpt.train import pretrain

from .pretrain_helpers import SPECIALS, VOCAB, losses, make_shards, recipe, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QUIET = {"tensorboard": False, "plot": False, "progress": False, "log_every": 1, "save_every": 0}


def _t5(name: str) -> dict:
    model = load_config(name)
    model["backbone"].update(hidden_size=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                             intermediate_size=16)
    model["backbone"].pop("max_positions", None)
    return model


@pytest.mark.parametrize("objective", ["mlm", "clm", "prefix_lm", "sop", "t5-small", "ul2-small"])
def test_text_objectives_train_on_the_gpu_as_on_the_cpu(tmp_path, objective):
    if objective.startswith(("t5", "ul2")):
        rng = np.random.default_rng(0)
        docs = [rng.integers(6, VOCAB - 1, size=int(rng.integers(5, 40))) for _ in range(120)]
        shards = tmp_path / "shards"
        write_shards(shards, docs, vocab_size=VOCAB, special_tokens={**SPECIALS, "eos": 5, "sentinel": VOCAB - 1})
        model = _t5(objective)
    else:
        shards, model = make_shards(tmp_path / "shards"), tiny_model(objective)
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = recipe(shards, tmp_path / device, model=model, train={"max_steps": 4, "device": device}, output=QUIET)
        summary = pretrain(cfg, log=lambda m: None)
        assert summary["steps"] == 4 and summary["device"].startswith(device)
        runs[device] = [float(x) for x in losses(tmp_path / device)]
    assert runs["cuda"] == pytest.approx(runs["cpu"], rel=2e-3, abs=2e-4)


def test_resume_on_the_gpu_continues_the_trajectory(tmp_path):
    shards = make_shards(tmp_path / "shards")
    whole = recipe(shards, tmp_path / "whole", train={"max_steps": 4, "device": "cuda"}, output=QUIET)
    pretrain(whole, log=lambda m: None)
    part = recipe(shards, tmp_path / "part", train={"max_steps": 2, "device": "cuda"}, output={**QUIET, "save_every": 2})
    pretrain(part, log=lambda m: None)
    part["train"]["max_steps"] = 4
    pretrain(part, resume=True, log=lambda m: None)
    # CUDA's atomics (embedding gradients) may round differently run to run: equal to float32 noise
    assert [float(x) for x in losses(tmp_path / "part")] == pytest.approx([float(x) for x in losses(tmp_path / "whole")],
                                                                        rel=1e-5, abs=1e-6)
