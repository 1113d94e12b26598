"""train.compile: the compiled backbone trains to the same losses (slow: Inductor compiles C++ on the CPU,
~30 s on 2 cores; run with FASTPT_SLOW_TESTS=1)."""
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
