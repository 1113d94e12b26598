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

Memory. CPU: the peak resident set above the level before the call, read from the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``). glibc's mmap threshold is
pinned at 128 KiB so that every tensor-sized block is mmapped and unmapped on free: the RSS
then follows live tensor bytes, and its peak is the peak of everything the step holds (logits,
softmax, autograd's saved tensors, the gradients themselves), not an estimate.
(tracemalloc cannot see torch's allocations.) CUDA: ``torch.cuda.max_memory_allocated`` above
the level before the call. Gradients are reset to None before each call (outside the measured
region), so every row includes allocating ``h.grad`` and ``w.grad``.

Run::

    python -m pytest benches/bench_cross_entropy.py --benchmark-only -s \
        --benchmark-json=benches/results/cross_entropy-cpu.json

``-s`` shows the summary table (time and memory ratios against torch-eager) at the end.
"""
from __future__ import annotations

import ctypes
import gc

import pytest
import torch
import torch.nn.functional as F

from fastpt.ops import linear_cross_entropy

import _harness  # benches/_harness.py (pytest puts benches/ on sys.path)

try:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
except ImportError:  # only on the GPU machine, shipped as a wheel
    LigerFusedLinearCrossEntropyFunction = None

CASES = {  # name: (tokens, D, V, fraction of tokens with a label)
    "bert-mlm": (32 * 128, 768, 30522, 0.15),
    "gpt-small": (1024, 512, 32000, 1.0),
}
RESULTS: dict[tuple[str, str], dict] = {}

try:  # pin glibc's mmap threshold: large frees go back to the OS, so RSS tracks live memory
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
except OSError:  # not glibc: the RSS numbers are then an upper bound
    _LIBC = None


def machine() -> dict:
    return _harness.machine()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_mb(fn, device: str) -> float:
    """Peak memory (MiB) that ``fn`` adds above what is held before it starts."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def inputs(case: str, device: str, dtype: torch.dtype):
    t, d, v, frac = CASES[case]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(t, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g)
    labels[torch.rand(t, generator=g) >= frac] = -100
    return h, w, labels.to(device)


def contenders(device: str):
    def eager(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y)

    def gather(h, w, y):
        keep = y != -100
        return F.cross_entropy(F.linear(h[keep], w).float(), y[keep])

    out = {"torch-eager": eager, "torch-gather": gather}
    if device == "cpu":
        out["fastpt-cpu"] = lambda h, w, y: linear_cross_entropy(h, w, y, backend="cpu")
    else:
        out["fastpt-triton"] = lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton")
        if LigerFusedLinearCrossEntropyFunction is not None:
            def liger(h, w, y):
                out = LigerFusedLinearCrossEntropyFunction.apply(h, w, y)  # a tuple in recent versions
                return out[0] if isinstance(out, tuple) else out
            out["liger"] = liger
    return out


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
