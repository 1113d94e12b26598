"""Fused attention: time and throughput of forward and forward + backward, with baselines in the same run.

Mask cases (each contender computes the same attention):
  * ``none``: bidirectional rows;
  * ``causal``;
  * ``packed``: every row holds 8 documents of unequal lengths (tokens attend inside their own);
  * ``prefix``: prefix-LM, bidirectional over a per-row prefix, causal after it.
CPU (float32, one 2048-token row, H=8, head dim 64):
  * ``fastpt-cpu``: ``fastpt.ops.attention(..., backend="cpu")`` (torch's CPU flash kernel per
    group of documents, a small (L, L) mask only for prefix-LM);
  * ``torch-sdpa``: ``F.scaled_dot_product_attention`` with the equivalent mask: ``is_causal``
    for causal, none for none, the dense (B, 1, S, S) mask for packed and prefix (what a user
    without a varlen kernel writes).
CUDA (bfloat16, 16k tokens per batch, H = 2048 / head dim, head dims 64 and 128, rows of 4k
tokens): ``fastpt-triton`` / ``fastpt-cuda`` (when usable), torch SDPA with its own choice of
backend and forced to flash / efficient / cudnn (each where it accepts the mask), and
FlexAttention compiled with a block mask (packed and prefix-LM at head dim 128: it compiles per case).

Throughput counts the attended (query, key) pairs only: forward ``4 * pairs * D * H`` FLOPs,
backward 2.5 times that (FlashAttention's convention), so a kernel that skips masked blocks is
not credited with work it does not do, and one that computes them is not either.

Run::

    python -m pytest benches/bench_attention.py --benchmark-only -s \
        --benchmark-json=benches/results/attention-cpu.json

The cases (inputs, masks, pair counts, contenders) live in ``fastpt.bench.kernels.AttentionCase``,
shared with ``fastpt bench --suite kernels``, which also times torch eager and fastpt's default
dispatch.

``-s`` shows the summary table (speed-up against the torch baseline of the same case) at the end.
On a machine shared with other jobs, ``OMP_NUM_THREADS=1`` keeps torch's thread pool from
stalling at its barriers (it did, by 15 ms per call, on two oversubscribed cores).
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastpt.bench.harness import machine
from fastpt.bench.kernels import ATTN_KINDS as CASES
from fastpt.bench.kernels import ATTN_MODES as MODES
from fastpt.bench.kernels import AttentionCase as Case
from fastpt.bench.kernels import attention_providers

RESULTS: dict[tuple, dict] = {}


def contenders(case: Case) -> dict:
    if case.qkv[0].device.type == "cpu":
        return {"fastpt-cpu": case.fastpt("cpu"), "torch-sdpa": case.torch_sdpa()}
    # the CUDA contenders are fastpt bench's; a string there is why one does not serve the case
    return {name: fn for name, fn in attention_providers(case).items() if callable(fn)}


CPU_GRID = [("cpu", kind, 2048, 64, mode) for kind in CASES for mode in MODES]
# rows of 4k tokens only: every further (head dim, mask, length) key costs the autotuner a dozen
# compilations, and the lent GPU's minutes are few
GPU_GRID = [("cuda", kind, 4096, hd, mode) for hd in (64, 128) for kind in CASES
            for mode in MODES] if torch.cuda.is_available() else []
NAMES = {"cpu": ("fastpt-cpu", "torch-sdpa"),
         "cuda": ("fastpt-triton", "fastpt-cuda", "torch-sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex")}
GRID = [(dev, kind, seq, hd, mode, name) for dev, kind, seq, hd, mode in CPU_GRID + GPU_GRID for name in NAMES[dev]]


@functools.lru_cache(maxsize=2)  # the grid runs every mode and contender of a case in a row
def _case(device, kind, seq, hd) -> Case:
    if device == "cpu":
        return Case(kind, seq, 1, 8, hd, device, torch.float32)
    return Case(kind, seq, 16384 // seq, 2048 // hd, hd, device, torch.bfloat16)


@pytest.mark.parametrize("device,kind,seq,hd,mode,name", GRID, ids=["-".join(map(str, p)) for p in GRID])
def test_attention(benchmark, device, kind, seq, hd, mode, name):
    case = _case(device, kind, seq, hd)
    fn = contenders(case).get(name)
    if fn is None:
        pytest.skip(f"{name} does not serve {kind} here")
    q, k, v = case.qkv
    grad = torch.randn_like(q)

    def reset():
        for x in case.qkv:
            x.grad = None

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(q, k, v)
        else:
            fn(q, k, v).backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: compilation (Triton, torch.compile), allocator
    reset()
    benchmark.group = f"{device}-{kind}-S{seq}-D{hd}-{mode}"
    benchmark.extra_info.update(machine(), case=kind, seq=seq, batch=case.batch, heads=case.heads, head_dim=hd,
                                mode=mode, contender=name, dtype=str(q.dtype), pairs=case.pairs)
    benchmark.pedantic(step, setup=reset, rounds=5 if device == "cpu" else 10, iterations=1,
                       warmup_rounds=0 if device == "cpu" else 2)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing timed
        return
    stats = benchmark.stats.stats
    RESULTS[(device, kind, seq, hd, mode, name)] = dict(median_s=stats.median, min_s=stats.min,
                                                        tflops=case.flops(mode) / stats.min / 1e12)


@pytest.fixture(scope="module", autouse=True)
def summary():
    """After the module: each contender's time, throughput and speed-up over torch's SDPA.

    Throughput and speed-up use the fastest round: on a shared machine other processes only ever
    add time, so the minimum is the least disturbed measurement (the median is shown beside it)."""
    yield
    if not RESULTS:
        return
    print(f"\n\nattention ({machine()})")
    print(f"{'device/case':<26}{'mode':<9}{'contender':<16}{'median ms':>10}{'min ms':>9}{'TFLOP/s':>9}"
          f"{'vs torch-sdpa':>15}")
    for (device, kind, seq, hd, mode, name), r in RESULTS.items():
        base = RESULTS.get((device, kind, seq, hd, mode, "torch-sdpa"))
        speed = f"{base['min_s'] / r['min_s']:.2f}x" if base else "-"
        print(f"{f'{device}/{kind}/S{seq}/D{hd}':<26}{mode:<9}{name:<16}{r['median_s'] * 1e3:>10.2f}"
              f"{r['min_s'] * 1e3:>9.2f}{r['tflops']:>9.3f}{speed:>15}")
