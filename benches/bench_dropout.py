"""Dropout on the CPU, every fastpt figure paired with its baseline from the same run.

* hidden dropout, p = 0.1, (4096, 256) and (4096, 1024), float32 and bfloat16, forward and
  forward + backward: ``torch.nn.functional.dropout`` vs ``fastpt.ops.dropout`` (seed drawn per
  call, as ``fastpt.nn.Dropout`` does); ``x * 2`` as the floor of a one-pass out-of-place op;
* attention dropout: ``fastpt.ops.attention(q, k, v, dropout_p=0.1)`` forward + backward at
  (B, S, H, D) = (32, 128, 4, 64), the old torch-int64 mask (``attention_cpu._drop_probs_torch``) vs
  the C++ kernel;
* one bert-mini MLM training step (32 x 128, bf16 autocast, AdamW): torch's ``nn.Dropout`` + the
  old attention mask vs ``fastpt.nn.Dropout`` + the kernel.

Baseline and fastpt alternate round by round, so a load change on a shared machine hits both
(with a pause between rounds: see ``paired``).
Run: ``python benches/bench_dropout.py > benches/results/dropout-cpu.md``.
"""
from __future__ import annotations

import importlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastpt
from fastpt.bench.harness import machine_info

attn = importlib.import_module("fastpt.ops.attention_cpu")  # where the dropout mask of the CPU path lives


def paired(fns: dict, rounds: int = 11, inner: int = 5, settle_s: float = 0.25) -> dict:
    """Median ms per call of each fn, timed in alternating rounds of ``inner`` calls.

    Each round starts after ``settle_s`` of sleep: torch's CPU dropout (MKL's Bernoulli generator)
    leaves MKL's worker threads spinning for up to 200 ms (MKL_BLOCKTIME), and on 2 cores they took
    the second core from whatever ran next (a fastpt call right after it measured 1.6 ms instead of
    0.09 ms). Sleeping, then one untimed call, measures each implementation warm and on its own,
    not in the other's wake."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            time.sleep(settle_s)
            fn()  # untimed: wakes the thread pools and the caches after the pause
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def hidden_rows():
    rows = []
    for shape in ((4096, 256), (4096, 1024)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype)
            g = torch.randn(shape, dtype=dtype)
            xg = x.clone().requires_grad_()

            def fwd_bwd(f):
                return lambda: f(xg).backward(g)

            fwd = paired({"torch": lambda: F.dropout(x, 0.1), "fastpt": lambda: fastpt.ops.dropout(x, 0.1),
                          "x * 2": lambda: x * 2})
            both = paired({"torch": fwd_bwd(lambda t: F.dropout(t, 0.1)),
                           "fastpt": fwd_bwd(lambda t: fastpt.ops.dropout(t, 0.1)),
                           "x * 2": fwd_bwd(lambda t: t * 2)})
            for what, r in (("fwd", fwd), ("fwd+bwd", both)):
                rows.append((f"dropout {shape[0]}x{shape[1]} {str(dtype)[6:]} {what}", r))
    return rows


KERNEL = attn._drop_probs


def with_mask(old: bool, fn):
    """``fn`` run with the attention-dropout mask of the old torch formula (old) or the C++ kernel."""
    def run():
        attn._drop_probs = attn._drop_probs_torch if old else KERNEL
        try:
            fn()
        finally:
            attn._drop_probs = KERNEL
    return run


def attention_rows():
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(32, 128, 4, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        g = torch.randn(32, 128, 4, 64, generator=gen).to(dtype)

        def step():
            fastpt.ops.attention(q, k, v, dropout_p=0.1, seed=1).backward(g)

        r = paired({"torch": with_mask(True, step), "fastpt": with_mask(False, step)}, rounds=9, inner=2)
        rows.append((f"attention (32, 128, 4, 64) {str(dtype)[6:]} dropout 0.1 fwd+bwd", r))
    return rows


def bert_mini_row():
    from fastpt.bench import e2e

    objective = dict(name="mlm", mask_token_id=e2e.MASK_ID, special_token_ids=[0, e2e.CLS_ID, e2e.SEP_ID])
    model = fastpt.build({"name": "bert-mini", "backbone": e2e.backbone_config("bert-mini", dropout=0.1),
                          "objective": objective})
    step = e2e.train_step(lambda batch: model(**batch).loss, e2e._unique(model.parameters()),
                          e2e.make_batches(4, 32, 128, "cpu"), "cpu", torch.bfloat16)
    fast = [(parent, name, m) for parent in model.modules() for name, m in parent.named_children()
            if isinstance(m, fastpt.nn.Dropout)]

    def swap(old):
        for parent, name, m in fast:
            setattr(parent, name, nn.Dropout(m.p) if old else m)

    r = paired({"torch": with_mask(True, lambda: (swap(True), step())),
                "fastpt": with_mask(False, lambda: (swap(False), step()))}, rounds=7, inner=2)
    swap(False)
    return [(f"bert-mini MLM step 32x128 bf16 autocast ({len(fast)} hidden dropouts)", r)]


def main():
    info = machine_info("cpu")
    print("# dropout-cpu\n")
    print(f"- machine: {info['cpu']} ({info['simd']}), {info['cores']} cores, torch {info['torch']} "
          f"with {info['torch_threads']} threads; load {info['loadavg_1m']}")
    print(f"- date: {info['date']}; commit {info['commit']}")
    print("- median ms per call, baseline and fastpt alternating round by round (benches/bench_dropout.py)\n")
    print("| case | torch ms | fastpt ms | speed-up | x * 2 ms |")
    print("|---|---|---|---|---|")
    for name, r in hidden_rows() + attention_rows() + bert_mini_row():
        floor = f"{r['x * 2']:.3f}" if "x * 2" in r else ""
        print(f"| {name} | {r['torch']:.3f} | {r['fastpt']:.3f} | {r['torch'] / r['fastpt']:.1f}x | {floor} |",
              flush=True)


if __name__ == "__main__":
    main()
