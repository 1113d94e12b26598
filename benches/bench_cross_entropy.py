"""Fused linear cross-entropy: time and peak memory of forward + backward, against baselines in the same run.

Cases (float32 on the CPU; bfloat16 on CUDA):
  * ``bert-mlm``: BERT-base MLM head, 32 x 128 tokens of which 15% are masked (labels -100
    elsewhere), D=768, V=30522;
  * ``gpt-small``: every token predicts (causal LM), 1024 tokens, D=512, V=32000.
Contenders:
  * ``torch-eager``: ``F.cross_entropy(F.linear(h, w), labels)`` on all rows (the baseline);
  * ``torch-gather``: the same on the non-ignored rows only (``h[labels != -100]``);
  * ``fastpt-cpu`` / ``fastpt-triton``: ``fastpt.ops.linear_cross_entropy``;
  * ``liger`` (CUDA, only if liger-kernel is importable): LigerFusedLinearCrossEntropyFunction.

Memory: ``fastpt.bench.harness.peak_memory``. CPU: the peak resident set above the level before
the call, read from the kernel's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``), with glibc's mmap threshold pinned at 128 KiB during the call so that
every tensor-sized block is mmapped and unmapped on free: the RSS then follows live tensor bytes,
and its peak is the peak of everything the step holds (logits, softmax, autograd's saved tensors,
the gradients themselves), not an estimate. (tracemalloc cannot see torch's allocations.) CUDA:
``torch.cuda.max_memory_allocated`` above the level before the call. Cases and contenders live
in ``fastpt.bench.kernels`` (shared with ``fastpt bench``). Gradients are reset to None before each call (outside the measured
region), so every row includes allocating ``h.grad`` and ``w.grad``.

Run::

    python -m pytest benches/bench_cross_entropy.py --benchmark-only -s \
        --benchmark-json=benches/results/cross_entropy-cpu.json

``-s`` shows the summary table (time and memory ratios against torch-eager) at the end.
"""
from __future__ import annotations

import pytest
import torch

from fastpt.bench import harness
from fastpt.bench.kernels import CE_CASES as CASES
from fastpt.bench.kernels import ce_contenders, ce_inputs
from fastpt.ops import linear_cross_entropy

RESULTS: dict[tuple[str, str], dict] = {}


def machine() -> dict:
    return harness.machine()


def peak_memory_mb(fn, device: str) -> float:
    """Peak memory (MiB) that ``fn`` adds above what is held before it starts (``fastpt.bench.harness``)."""
    got = harness.peak_memory(fn, device=device)
    return float("nan") if got is None else got / 2**20


def inputs(case: str, device: str, dtype: torch.dtype):
    return ce_inputs(CASES[case], device, dtype)


def contenders(device: str):
    """torch-eager, torch-gather, fastpt with its device's backend forced, liger (CUDA, when importable)."""
    out = {n: fn for n, fn in ce_contenders(device).items() if n != "fastpt" and not isinstance(fn, str)}
    backend = "cpu" if device == "cpu" else "triton"
    out[f"fastpt-{backend}"] = lambda h, w, y: linear_cross_entropy(h, w, y, backend=backend)
    return dict(sorted(out.items(), key=lambda kv: kv[0] == "liger"))  # the old order: liger last


GRID = [("cpu", case, name) for case in CASES for name in contenders("cpu")]
if torch.cuda.is_available():
    # contenders() on "cuda" touches no device, so listing them here is safe
    GRID += [("cuda", case, name) for case in CASES for name in contenders("cuda")]


@pytest.mark.parametrize("device,case,name", GRID, ids=["-".join(p) for p in GRID])
def test_linear_cross_entropy(benchmark, device, case, name):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    h, w, y = inputs(case, device, dtype)
    fn = contenders(device)[name]

    def reset():  # outside the measured region: the freed old gradients must not offset the peak
        h.grad = w.grad = None

    def step():
        fn(h, w, y).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (Triton compile, allocator)
    reset()
    mem = peak_memory_mb(step, device)
    loss = float(fn(h.detach(), w.detach(), y))
    benchmark.group = f"{device}-{case}"
    benchmark.extra_info.update(machine(), case=case, contender=name, dtype=str(dtype), peak_mem_mb=round(mem, 1),
                                loss=loss, shape=dict(zip(("T", "D", "V", "active"), CASES[case])))
    benchmark.pedantic(step, setup=reset, rounds=3 if device == "cpu" else 20, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        RESULTS[(device, case, name)] = dict(time_s=benchmark.stats.stats.median, mem_mb=mem, loss=loss)


@pytest.fixture(scope="module", autouse=True)
def summary():
    """After the module: each contender's time and peak memory relative to torch-eager."""
    yield
    if not RESULTS:
        return
    print(f"\n\nlinear cross-entropy, forward + backward ({machine()})")
    print(f"{'device/case':<18}{'contender':<15}{'median s':>10}{'speed-up':>10}{'peak MiB':>10}{'mem ratio':>11}"
          f"{'loss':>10}")
    for (device, case, name), r in RESULTS.items():
        base = RESULTS.get((device, case, "torch-eager"))
        speed = f"{base['time_s'] / r['time_s']:.2f}x" if base else "-"
        mem = f"{r['mem_mb'] / base['mem_mb']:.3f}" if base and base["mem_mb"] > 0 else "-"
        print(f"{device + '/' + case:<18}{name:<15}{r['time_s']:>10.3f}{speed:>10}{r['mem_mb']:>10.0f}{mem:>11}"
              f"{r['loss']:>10.4f}")
