"""End to end: tokens/s of a BERT MLM training step (forward + backward + AdamW), fastpt against
transformers' BertForMaskedLM (``attn_implementation="sdpa"``), same config, same batches, same
precision, one run.

CPU: bert-tiny (2 layers, 128 wide, vocabulary 30522), batch 32 x 128, float32. CUDA (when
present): bert-base, batch 32 x 512, bfloat16 autocast. The models, batches and FLOP count are
``fastpt.bench.e2e``'s (the same code ``fastpt bench --suite e2e`` runs; that one alternates the
two models' timed steps, this one times them one after the other as pytest-benchmark does).

Run::

    python -m pytest benches/bench_e2e.py --benchmark-only -s \
        --benchmark-json=benches/results/e2e-cpu.json

``-s`` shows tokens/s, MFU and the speed-up over transformers at the end.
"""
from __future__ import annotations

import pytest
import torch

from fastpt.bench import e2e, harness, peaks

pytest.importorskip("transformers")

GRID = [("cpu", "bert-tiny", 32, 128)]
if torch.cuda.is_available():
    GRID.append(("cuda", "bert-base", 32, 512))
RESULTS: dict[tuple, dict] = {}


@pytest.mark.parametrize("provider", ["fastpt", "transformers"])
@pytest.mark.parametrize("device,size,batch,seq", GRID, ids=[f"{d}-{s}-{b}x{n}" for d, s, b, n in GRID])
def test_mlm_train_step(benchmark, device, size, batch, seq, provider):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = e2e.backbone_config(size)
    build = e2e.build_fastpt if provider == "fastpt" else e2e.build_transformers
    torch.manual_seed(0)
    loss_fn, params, how = build(size, cfg, device=device)
    step = e2e.train_step(loss_fn, params, e2e.make_batches(4, batch, seq, device), device, dtype)

    def timed():
        step()
        harness.synchronize(device)

    tokens = batch * seq
    flops = e2e.mlm_flops_per_token(cfg, seq) * tokens
    benchmark.group = f"e2e {device} {size} {batch}x{seq}"
    benchmark.extra_info.update(harness.machine(), provider=provider, built_with=how, tokens=tokens, flops=flops,
                                dtype=str(dtype), dropout=cfg["dropout"])
    benchmark.pedantic(timed, rounds=5 if device == "cpu" else 10, iterations=1, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing timed
        return
    median = benchmark.stats.stats.median
    peak = peaks.peak(torch.cuda.get_device_name() if device == "cuda" else None, dtype, device=device)
    RESULTS[(device, size, batch, seq, provider)] = dict(s=median, tokens_per_s=tokens / median,
                                                         mfu=peak.mfu(flops / median))
    benchmark.extra_info.update(tokens_per_s=tokens / median, mfu=peak.mfu(flops / median), peak=peak.note)


@pytest.fixture(scope="module", autouse=True)
def summary():
    """After the module: tokens/s, MFU and fastpt's speed-up over transformers (medians)."""
    yield
    if not RESULTS:
        return
    print(f"\n\nBERT MLM train step ({harness.machine()})")
    print(f"{'device/model/batch':<32}{'provider':<14}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}{'vs transformers':>17}")
    for (device, size, batch, seq, provider), r in RESULTS.items():
        base = RESULTS.get((device, size, batch, seq, "transformers"))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        speed = f"{base['s'] / r['s']:.2f}x" if base else "-"
        print(f"{f'{device}/{size}/{batch}x{seq}':<32}{provider:<14}{r['s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
              f"{mfu:>8}{speed:>17}")
