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
import platform

import pytest
import torch

import fastpt
from fastpt.data import MLMCollator

transformers = pytest.importorskip("transformers")
from transformers import BertTokenizerFast, DataCollatorForLanguageModeling  # noqa: E402

try:
    from fastpt.ops import random_masking
except ImportError:  # being written alongside this bench
    random_masking = None

VOCAB = 30522  # bert-base-uncased
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MLM_SHAPES = [(256, 512), (4096, 128)]
MAE_SHAPES = [(256, 196), (64, 1024)]

# On a shared machine, FASTPT_BENCH_THREADS=1 keeps torch's and fastpt's thread pools from waiting
# on a core another process holds; the report names the thread count either way.
if os.environ.get("FASTPT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTPT_BENCH_THREADS"]))


# ------------------------------------------------------------------ machine and inputs

def machine() -> dict:
    """What the report names: CPU model, cores, threads torch uses, versions, load when measured."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        model = fields.get("model name", model)  # of the last CPU listed: they are all the same
        flags = set(fields.get("flags", "").split())
    except OSError:
        pass
    simd = next((x for x in ("avx512f", "avx2", "sse4_2", "asimd") if x in flags), "unknown")
    return dict(cpu=model, simd=simd, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__, fastpt=fastpt.__version__,
                loadavg_1m=os.getloadavg()[0])


@functools.lru_cache(maxsize=None)
def tokenizer():
    """A BERT-sized WordPiece tokenizer built in code (no download): specials + 30517 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return BertTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


@functools.lru_cache(maxsize=None)
def mlm_inputs(batch: int, length: int):
    """The same pre-tokenised batch in every form: ``[CLS] words... [SEP]`` rows of ``length`` ids."""
    tok = tokenizer()
    g = torch.Generator().manual_seed(batch * length)
    ids = torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    rows = ids.tolist()
    stm = [[1] + [0] * (length - 2) + [1]] * batch
    return dict(
        tensor=ids,
        ids=[{"input_ids": r} for r in rows],
        ids_stm=[{"input_ids": r, "special_tokens_mask": s} for r, s in zip(rows, stm)],
    )


def torch_mlm(ids, special_ids, mask_id, vocab, p=0.15, mask_p=0.8, rand_p=0.1, generator=None):
    """Hugging Face's torch_mask_tokens, vectorised: the special-tokens mask by ``torch.isin``."""
    labels = ids.clone()
    prob = torch.full(ids.shape, p)
    prob.masked_fill_(torch.isin(ids, special_ids), 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels[~selected] = -100
    out = ids.clone()
    replaced = torch.bernoulli(torch.full(ids.shape, mask_p), generator=generator).bool() & selected
    out[replaced] = mask_id
    # HF's random_replace_prob is a fraction of all selected tokens: rescale it to those not masked
    rand = torch.bernoulli(torch.full(ids.shape, rand_p / (1 - mask_p)), generator=generator).bool()
    rand &= selected & ~replaced
    words = torch.randint(vocab, ids.shape, generator=generator)
    out[rand] = words[rand]
    return out, labels


def torch_mae(batch, length, mask_ratio=0.75, generator=None):
    """MAE's random_masking index work (facebookresearch/mae models_mae.py) without the gather of x."""
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(batch, length, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


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
