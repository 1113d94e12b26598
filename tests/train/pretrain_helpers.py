"""Shared pieces of the pre-training recipe tests: tiny shard directories, tiny models, recipes."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fastpt.data.shards import write_shards

VOCAB = 97
SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
REPO = Path(__file__).resolve().parents[2]


def make_shards(path, *, n_docs: int = 300, min_len: int = 5, max_len: int = 60, seed: int = 0,
                shard_tokens: int = 2000) -> Path:
    """A text shard directory of random documents (ids 5..96), several shards."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(5, VOCAB, size=int(rng.integers(min_len, max_len + 1))) for _ in range(n_docs)]
    write_shards(path, docs, vocab_size=VOCAB, special_tokens=SPECIALS, shard_tokens=shard_tokens)
    return Path(path)


def tiny_model(objective: str = "mlm", dropout: float = 0.0, **objective_kwargs) -> dict:
    """An inline model config: 2 layers, 32 wide (attention dropout 0: the Triton interpreter is slow)."""
    return {"name": f"tiny-{objective}",
            "backbone": {"builder": "text_encoder", "vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2,
                         "num_heads": 2, "intermediate_size": 48, "max_positions": 64, "dropout": dropout,
                         "attention_dropout": 0.0, "causal": objective in ("clm", "prefix_lm")},
            "objective": {"name": objective, **objective_kwargs}}


def recipe(shards, out, *, model=None, **sections) -> dict:
    """A recipe dict for ``pretrain``; ``sections`` = {"train": {...}, "data": {...}, "output": {...}} merged in."""
    cfg = {"model": model or tiny_model(),
           "data": {"path": str(shards), "seq_len": 17},
           "train": {"batch_size": 3, "max_steps": 6, "lr": 1e-3, "warmup_steps": 1, "seed": 0,
                     "precision": "fp32"},  # not "auto": the same math on every CI machine
           "output": {"dir": str(out), "save_every": 3, "log_every": 1, "progress": False}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = copy.deepcopy(value)
    return cfg


def env() -> dict:
    """Environment of a subprocess run: the repo importable, one thread per process as under torchrun."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "python") + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"  # two runs side by side on a small machine: no thread oversubscription
    return e


def losses(run_dir) -> list[str]:
    """The loss column of a run's metrics.csv, as written (exact text)."""
    lines = (Path(run_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    i = header.index("loss")
    return [line.split(",")[i] for line in lines[1:]]


def run_cli(args, **kw) -> subprocess.CompletedProcess:
    """``fastpt pretrain`` in a subprocess (through ``fastpt.train.pretrain_main``)."""
    code = "import sys; from fastpt.train import pretrain_main; sys.exit(pretrain_main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env(), capture_output=True, text=True, **kw)
