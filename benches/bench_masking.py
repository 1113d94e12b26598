"""Masking throughput on the CPU, every figure paired with its baseline from the same run.

MLM (tokens/s, batches of 256 x 512 and 4096 x 128 tokens, BERT vocabulary size):
  * transformers' DataCollatorForLanguageModeling on pre-tokenised examples (the baseline), with
    ``input_ids`` only and with a ``special_tokens_mask`` as ``run_mlm.py`` prepares them;
  * fastpt.data.MLMCollator on the same examples;
  * a plain vectorised torch version of Hugging Face's algorithm on the padded id tensor
    (``torch.isin`` for specials, ``torch.bernoulli`` x3, ``torch.randint``): a second baseline;
  * fastpt.ops.mlm_mask on the same tensor, backends cpu (C++) and reference (PyTorch).
MAE (patches/s, B=256 L=196 and B=64 L=1024, mask ratio 0.75):
  * the plain torch MAE masking (``torch.rand`` + argsort + argsort + gather) vs
    fastpt.ops.random_masking (cpu and reference); skipped if that op is not importable.

The inputs and the torch baselines live in ``fastpt.bench.kernels`` (shared with ``fastpt bench``).

Run (``FASTPT_BENCH_THREADS=n`` sets torch's and the kernels' thread count)::

    python -m pytest benches/bench_masking.py --benchmark-only --benchmark-json=benches/results/masking-cpu.json
    FASTPT_BENCH_THREADS=1 python -m pytest benches/bench_masking.py --benchmark-only \
        --benchmark-json=benches/results/masking-cpu-1thread.json
    python benches/report_masking.py benches/results/masking-cpu.json benches/results/masking-cpu-1thread.json \
        > benches/results/masking-cpu.md
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import fastpt
from fastpt.bench.harness import machine as _machine
from fastpt.bench.kernels import mlm_inputs, torch_mae, torch_mlm
from fastpt.bench.kernels import bert_tokenizer as tokenizer
from fastpt.data import MLMCollator

transformers = pytest.importorskip("transformers")
from transformers import DataCollatorForLanguageModeling  # noqa: E402

try:
    from fastpt.ops import random_masking
except ImportError:  # being written alongside this bench
    random_masking = None

MLM_SHAPES = [(256, 512), (4096, 128)]
MAE_SHAPES = [(256, 196), (64, 1024)]

# On a shared machine, FASTPT_BENCH_THREADS=1 keeps torch's and fastpt's thread pools from waiting
# on a core another process holds; the report names the thread count either way.
if os.environ.get("FASTPT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTPT_BENCH_THREADS"]))


def machine() -> dict:
    """What the report names: CPU model and SIMD, cores, threads torch uses, versions, load when measured."""
    return _machine(transformers=transformers.__version__)


def _record(benchmark, group, impl, tokens, shape):
    benchmark.group = group
    benchmark.extra_info.update(machine(), impl=impl, tokens=tokens, shape=list(shape))


# ------------------------------------------------------------------ MLM

@pytest.mark.parametrize("shape", MLM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", [
    "hf_collator", "hf_collator+stm", "fastpt_collator", "fastpt_collator+stm",
    "torch_vectorised", "mlm_mask[cpu]", "mlm_mask[reference]",
])
def test_mlm(benchmark, impl, shape):
    tok = tokenizer()
    data = mlm_inputs(*shape)
    n = shape[0] * shape[1]
    _record(benchmark, f"mlm {shape[0]}x{shape[1]}", impl, n, shape)
    if impl.startswith("hf_collator"):
        fn = functools.partial(DataCollatorForLanguageModeling(tok, seed=0),
                               data["ids_stm" if impl.endswith("stm") else "ids"])
    elif impl.startswith("fastpt_collator"):
        fn = functools.partial(MLMCollator(tok, seed=0), data["ids_stm" if impl.endswith("stm") else "ids"])
    elif impl == "torch_vectorised":
        special = torch.tensor(tok.all_special_ids)
        fn = functools.partial(torch_mlm, data["tensor"], special, tok.mask_token_id, len(tok),
                               generator=torch.Generator().manual_seed(0))
    else:
        backend = impl[len("mlm_mask["):-1]
        fn = functools.partial(fastpt.ops.mlm_mask, data["tensor"], mask_token_id=tok.mask_token_id,
                               vocab_size=len(tok), special_token_ids=tok.all_special_ids, seed=0, backend=backend)
    out = benchmark(fn)
    labels = out["labels"] if isinstance(out, dict) or hasattr(out, "keys") else out[1]
    # a sanity check that every implementation did the same job: ~15% of the non-special tokens
    rate = float((labels != -100).float().sum()) / (n - 2 * shape[0])
    assert abs(rate - 0.15) < 0.01, rate


# ------------------------------------------------------------------ MAE

@pytest.mark.parametrize("shape", MAE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["torch_argsort", "random_masking[cpu]", "random_masking[reference]"])
def test_mae(benchmark, impl, shape):
    if impl != "torch_argsort" and random_masking is None:
        pytest.skip("fastpt.ops.random_masking is not importable yet")
    b, length = shape
    _record(benchmark, f"mae {b}x{length}", impl, b * length, shape)
    if impl == "torch_argsort":
        fn = functools.partial(torch_mae, b, length, generator=torch.Generator().manual_seed(0))
    else:
        backend = impl[len("random_masking["):-1]
        fn = functools.partial(random_masking, b, length, mask_ratio=0.75, seed=0, backend=backend)
    ids_keep, mask, _ = benchmark(fn)
    assert ids_keep.shape == (b, length // 4) and int(mask.sum()) == b * (length - length // 4)
