"""train.compile: the compiled backbone trains to the same losses, alone and under DDP and FSDP2
(slow: Inductor compiles C++ on the CPU, ~30 s on 2 cores; run with FASTPT_SLOW_TESTS=1)."""
import os

import pytest

from fastpt.train import pretrain

from .pretrain_helpers import losses, make_shards, recipe, tiny_model

pytestmark = pytest.mark.skipif(not os.environ.get("FASTPT_SLOW_TESTS"), reason="slow: set FASTPT_SLOW_TESTS=1")


def test_compiled_backbone_matches_eager(tmp_path):
    shards = make_shards(tmp_path / "shards")
    logs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = recipe(shards, tmp_path / name, model=tiny_model(), train={"compile": compile_, "max_steps": 4},
                     output={"save_every": 0, "tensorboard": False, "plot": False, "progress": False})
        logs[name] = []
        pretrain(cfg, log=logs[name].append)
    # on a CPU the run says that compiling measured slower there
    assert [any("train.compile on a CPU measured" in m for m in logs[n]) for n in ("eager", "compiled")] == [False, True]
    want = [float(x) for x in losses(tmp_path / "eager")]
    assert [float(x) for x in losses(tmp_path / "compiled")] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_compiled_backbone_under_ddp_and_fsdp_matches_one_process(tmp_path):
    """train.compile with 2 gloo processes (DDP, then FSDP2): the losses of one compiled process on
    the combined batch (the compiled backbone inside DDP's bucketing / FSDP's per-layer sharding)."""
    from .test_distributed import QUIET, torchrun

    shards = make_shards(tmp_path / "shards", n_docs=80, min_len=40, max_len=50)
    one = recipe(shards, tmp_path / "one", model=tiny_model("clm"), data={"mode": "doc", "add_special": "none"},
                 train={"batch_size": 6, "grad_accum": 2, "max_steps": 4, "schedule": "constant", "compile": True},
                 output={**QUIET, "save_every": 0})
    pretrain(one, log=lambda m: None)
    want = [float(x) for x in losses(tmp_path / "one")]
    for name, extra in (("ddp", {}), ("fsdp", {"fsdp": True})):
        cfg = {**one, "train": {**one["train"], "batch_size": 3, **extra},
               "output": {**one["output"], "dir": str(tmp_path / name)}}
        torchrun(tmp_path, cfg)
        assert [float(x) for x in losses(tmp_path / name)] == pytest.approx(want, rel=1e-6, abs=1e-6), name
