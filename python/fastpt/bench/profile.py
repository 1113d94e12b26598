"""Where an end-to-end training step spends its time: ``torch.profiler`` over the e2e pairs.

    python -m fastpt.bench.profile [--device cuda] [--models bert,gpt2] [--steps 2] [--compile] [--out FILE]

Each side of each pair of :mod:`fastpt.bench.e2e` (the same models, batches, precision and
optimizer as the timed bench) is built, warmed up for three steps, and profiled over ``--steps``
steps; ``--compile`` profiles the pairs' torch.compile case instead (each side compiled as the
bench's ``--compile`` compiles it; Inductor's kernels are the "triton (inductor)" class). The report (text, one section per side) gives

* the step's wall time and, on CUDA, the device-busy time (the sum of kernel times: one stream)
  and its share of the wall time: a low share means the host (Python, dispatch, launches, syncs)
  holds the step back, a high one that the kernels do;
* the kernel time by class (``KERNEL_CLASSES``: matrix products, attention, fastpt's Triton
  kernels, torch's elementwise and reduction kernels, the optimizer, copies);
* the top operators by device time (CPU: by self CPU time), as ``key_averages`` tabulates them.

It exists for the GPU check (``benches/gpu_check.sh``): a run that shows fastpt slower than its
baseline also says why, in the same files.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from . import e2e

# (class, pattern on the kernel name), first match wins; the rest is "other"
KERNEL_CLASSES = (
    ("optimizer", r"multi_tensor|fused_adam|_fused_adamw|adam"),
    ("attention", r"flash|fmha|attn|attention|sdpa|cudnn.*(mha|sdp)"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|sm\d+_|cublas|matmul|wgmma"),
    ("fastpt triton", r"^_[a-z0-9_]*kernel|_ce_chunk|_dropout|_mlm|_lse"),
    ("triton (inductor)", r"^triton_"),
    ("copy / cast", r"copy|memcpy|memset|cast|convert|fill"),
    ("reduction", r"reduce|softmax|norm|sum|mean|max"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pattern in KERNEL_CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


def _is_kernel(evt) -> bool:
    """A device-side event (kernel, memcpy, memset) of the profile."""
    return str(getattr(evt, "device_type", "")).endswith("CUDA")


def _kernel_us(evt) -> float:
    return float(evt.time_range.elapsed_us())


def profile_step(step, *, device: str, steps: int = 2, warmup: int = 3, row_limit: int = 25) -> dict:
    """Profile ``steps`` calls of ``step`` after ``warmup``; returns wall ms per step, device-busy
    ms per step, kernel ms per step by class, and the operator table (text)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    averages = prof.key_averages()
    classes: dict[str, float] = {}
    busy = 0.0
    if cuda:
        # kernels are the events that ran on the device; their self time is the kernel's own
        for evt in prof.events():
            if _is_kernel(evt):
                us = _kernel_us(evt)
                busy += us
                cls = kernel_class(evt.name)
                classes[cls] = classes.get(cls, 0.0) + us
    table = None
    for sort in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        try:  # the device column's name changed across torch versions
            table = averages.table(sort_by=sort, row_limit=row_limit, max_name_column_width=60)
            break
        except (KeyError, AttributeError):
            continue
    return dict(wall_ms=wall, busy_ms=busy / 1e3 / steps,
                classes={k: v / 1e3 / steps for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
                table=table)


def report(name: str, result: dict, cuda: bool) -> str:
    lines = [f"## {name}", f"wall {result['wall_ms']:.1f} ms/step"]
    if cuda:
        wall, busy = result["wall_ms"], result["busy_ms"]
        lines[-1] += f"; device busy {busy:.1f} ms/step ({100 * busy / wall:.0f}% of wall)"
        lines.append("kernel time by class (ms/step): " + ", ".join(
            f"{k} {v:.2f} ({100 * v / max(busy, 1e-9):.0f}%)" for k, v in result["classes"].items()))
    lines += ["", result["table"], ""]
    return "\n".join(lines)


def profile_pairs(ctx, *, models=e2e.MODELS, steps: int = 2, dtype: torch.dtype | None = None,
                  log=print, compile: bool = False, on_part=None) -> str:
    """The report (text) for every side of each pair in ``models`` (``compile``: their
    torch.compile case); a side that fails gets a line saying so and the others still run.
    ``on_part`` is called with the report so far after each side."""
    dtype = dtype or (torch.bfloat16 if ctx.cuda else torch.float32)
    parts = [f"# e2e profile: {ctx.device} ({ctx.machine.get('device_name', '?')}), torch {torch.__version__}, "
             f"commit {ctx.machine.get('commit')}; {steps} steps after 3 warm-up steps, {e2e.dtype_name(dtype)}"
             + (", torch.compile" if compile else "")]
    for model in (m for m in e2e.MODELS if m in models):
        sides, batches, kw = e2e.PAIRS[model](ctx, dtype=dtype, compile=compile)
        if compile:
            torch._dynamo.reset()
        case = f"{kw['size']} B{kw['batch']} S{kw['seq']}"
        for side, build in sides.items():
            if side == e2e.EAGER_SIDE:  # the compiled case's eager baseline: the plain profile has it
                continue
            name = f"{case} {side}"
            try:
                torch.manual_seed(0)
                loss_fn, params, how = build()
                step = e2e.train_step(loss_fn, params, batches, ctx.device, dtype)
                result = profile_step(step, device=ctx.device, steps=steps)
                parts.append(report(f"{name}: {how}", result, ctx.cuda))
                if on_part is not None:
                    on_part("\n".join(parts))
                log(f"profile {name}: {result['wall_ms']:.1f} ms/step"
                    + (f", device busy {result['busy_ms']:.1f} ms" if ctx.cuda else ""))
            except Exception as exc:  # noqa: BLE001 - one failing side must not hide the others
                parts.append(f"## {name}\nfailed: {type(exc).__name__}: {exc}\n")
                if on_part is not None:
                    on_part("\n".join(parts))
                log(f"profile {name}: failed: {type(exc).__name__}: {exc}")
            finally:
                loss_fn = params = step = None
                if ctx.cuda:
                    torch.cuda.empty_cache()
    return "\n".join(parts)


def main(argv=None) -> int:
    from .harness import machine_info
    from .kernels import Context

    parser = argparse.ArgumentParser(prog="python -m fastpt.bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(e2e.MODELS), help="comma-separated: bert, gpt2")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the small quick-run models (a smoke test)")
    parser.add_argument("--compile", action="store_true",
                        help="profile the torch.compile case (each side compiled as `fastpt bench --compile` does)")
    parser.add_argument("--out", default=None, help="write the report here (default: stdout)")
    args = parser.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    bad = [m for m in models if m not in e2e.MODELS]
    if bad:
        parser.error(f"--models: unknown {bad}; expected some of {list(e2e.MODELS)}")
    if args.steps < 1:
        parser.error(f"--steps: expected a positive count, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here")
    ctx = Context(device=args.device, quick=args.quick, log=lambda m: print(m, file=sys.stderr),
                  machine=machine_info(args.device))
    # with --out the report is rewritten after every side: a run cut by its time limit keeps the sides done
    write = (lambda text: Path(args.out).write_text(text)) if args.out else None
    text = profile_pairs(ctx, models=models, steps=args.steps, log=ctx.log, compile=args.compile, on_part=write)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
