"""End to end: tokens/s of a training step (forward + backward + AdamW), fastpt against transformers,
same config, same batches, same precision, one run: a BERT MLM step against BertForMaskedLM and a
GPT-2 causal-LM step against GPT2LMHeadModel (both ``attn_implementation="sdpa"``).

CPU: bert-tiny (2 layers, 128 wide, vocabulary 30522), batch 32 x 128, and gpt2-mini (4 layers,
256 wide, vocabulary 50257), batch 16 x 128, float32. CUDA (when present): bert-base, batch
32 x 512, and gpt2-small, batch 16 x 1024, bfloat16 autocast. The models, batches and FLOP counts
are ``fastpt.bench.e2e``'s (the same code ``fastpt bench --suite e2e`` runs; that one alternates
the two models' timed steps, this one times them one after the other as pytest-benchmark does).

Run::

    python -m pytest benches/bench_e2e.py --benchmark-only -s \
        --benchmark-json=benches/results/e2e-cpu.json

``-s`` shows tokens/s, MFU and the speed-up over transformers at the end.
"""
from __future__ import annotations

import pytest
import torch

from fastpt.bench import e2e, harness, peaks
from fastpt.bench.kernels import Context

pytest.importorskip("transformers")

GRID = [("cpu", "bert-tiny", 32, 128)]
GPT_GRID = [("cpu", "gpt2-mini", 16, 128)]
if torch.cuda.is_available():
    GRID.append(("cuda", "bert-base", 32, 512))
    GPT_GRID.append(("cuda", "gpt2-small", 16, 1024))
RESULTS: dict[tuple, dict] = {}


CASES = [("bert", *g) for g in GRID] + [("gpt2", *g) for g in GPT_GRID]


@pytest.mark.parametrize("provider", ["fastpt", "transformers"])
@pytest.mark.parametrize("model,device,size,batch,seq", CASES, ids=[f"{d}-{s}-{b}x{n}" for _, d, s, b, n in CASES])
def test_train_step(benchmark, model, device, size, batch, seq, provider):
    """One side of ``fastpt.bench.e2e``'s BERT MLM or GPT-2 CLM pair (its models, batches and FLOPs)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sides, batches, kw = e2e.PAIRS[model](Context(device=device), size, batch, seq, None, dtype)
    torch.manual_seed(0)
    loss_fn, params, how = sides[provider]()
    step = e2e.train_step(loss_fn, params, batches, device, dtype)

    def timed():
        step()
        harness.synchronize(device)

    tokens, flops = batch * seq, kw["flops"]
    benchmark.group = f"e2e {device} {kw['op']} {batch}x{seq}"
    benchmark.extra_info.update(harness.machine(), provider=provider, built_with=how, tokens=tokens, flops=flops,
                                dtype=str(dtype), setup=kw["note"])
    benchmark.pedantic(timed, rounds=5 if device == "cpu" else 10, iterations=1, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing timed
        return
    median = benchmark.stats.stats.median
    peak = peaks.peak(torch.cuda.get_device_name() if device == "cuda" else None, dtype, device=device)
    RESULTS[(device, kw["op"], batch, seq, provider)] = dict(s=median, tokens_per_s=tokens / median,
                                                             mfu=peak.mfu(flops / median))
    benchmark.extra_info.update(tokens_per_s=tokens / median, mfu=peak.mfu(flops / median), peak=peak.note)


@pytest.fixture(scope="module", autouse=True)
def summary():
    """After the module: tokens/s, MFU and fastpt's speed-up over transformers (medians)."""
    yield
    if not RESULTS:
        return
    print(f"\n\nBERT MLM / GPT-2 CLM train step ({harness.machine()})")
    print(f"{'device/model/batch':<44}{'provider':<14}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}{'vs transformers':>17}")
    for (device, model, batch, seq, provider), r in RESULTS.items():
        base = RESULTS.get((device, model, batch, seq, "transformers"))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        speed = f"{base['s'] / r['s']:.2f}x" if base else "-"
        print(f"{f'{device}/{model}/{batch}x{seq}':<44}{provider:<14}{r['s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
              f"{mfu:>8}{speed:>17}")
