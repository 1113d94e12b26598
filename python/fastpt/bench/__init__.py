"""``fastpt bench``: every speed claim measured side by side with its baselines, in one run.

    fastpt bench [--suite kernels|e2e|all] [--device cpu|cuda] [--out DIR] [--quick] [--ops a,b] [--compile]

* ``kernels`` (:mod:`fastpt.bench.kernels`): one bench per fused op (masking, attention,
  contrastive, cross_entropy), fastpt against torch eager, torch SDPA and its backends,
  FlexAttention, transformers' collator, liger-kernel and inf-cl where importable.
* ``e2e`` (:mod:`fastpt.bench.e2e`): tokens/s of a BERT MLM training step, fastpt against
  transformers' BertForMaskedLM (bert-tiny 32 x 128 on the CPU, bert-base 32 x 512 on CUDA), and
  of a GPT-2 causal-LM step against GPT2LMHeadModel (gpt2-mini 16 x 128 on the CPU, gpt2-small
  16 x 1024 on CUDA); ``--model`` picks one of them and its size. ``--compile`` times the same
  pairs with both sides under torch.compile instead (fastpt's backbone, as ``fastpt pretrain``'s
  ``train.compile``; transformers' whole model, as HF Trainer's ``torch_compile``; transformers
  eager timed alongside as ``transformers-eager``), and only that: run once without it and once
  with it for both (default file stem
  ``bench-<device>[-quick]-compile``, so the two runs keep separate files).

One harness (:mod:`~fastpt.bench.harness`: warm-up, median of repeats, CUDA events, peak
memory, machine and versions), peaks looked up per device (:mod:`~fastpt.bench.peaks`), and
one report (:mod:`~fastpt.bench.report`): rows appended to ``<out>/bench-<device>.csv`` and
``.json`` as each op finishes, a Markdown table and a PNG of the run (``.md``, ``.png``).
Every speed-up is a ratio against a baseline measured in the same run on the same inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import _cpu_malloc
from .._args import arg_type, positive_int
from . import e2e
from .harness import Timing, machine_info, peak_memory, time_fn
from .peaks import Peak, peak, peak_flops
from .report import add_ratios, make_row, markdown, write_results

__all__ = ["bench_main", "run", "time_fn", "peak_memory", "machine_info", "Timing", "peak", "peak_flops", "Peak",
           "make_row", "add_ratios", "markdown", "write_results"]

OPS = ("masking", "dropout", "cross_entropy", "contrastive", "attention", "contrastive_1m")  # cheapest first: a cut-short run keeps most
E2E_MODELS = (*e2e.BERT_SIZES, *e2e.GPT2_SIZES)


def run(*, suite: str = "all", device: str = "cpu", out: str | Path = "benches/results", quick: bool = False,
        ops=None, name: str | None = None, model: str | None = None, batch: int | None = None,
        seq: int | None = None, dropout: float | None = None, compile: bool = False, log=print) -> list[dict]:
    """Run the suites and write the results (see the module docstring); returns the rows.

    Files are rewritten after every op, so a run stopped by a time limit keeps what it measured.
    ``compile``: the e2e pairs compiled instead of eager (``e2e.bench_e2e``); ValueError with
    ``suite="kernels"``, which has nothing it applies to.
    """
    import torch

    from . import kernels

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch here")
    if compile and suite == "kernels":
        raise ValueError("compile: applies to the e2e suite; --suite kernels has nothing to compile")
    machine = machine_info(device)
    ctx = kernels.Context(device=device, quick=quick, log=log, machine=machine)
    run_id = f"{machine['date']}-{machine['commit'] or 'unknown'}"
    stem = name or default_stem(device, quick, compile)
    out = Path(out)
    rows: list[dict] = []
    log(f"fastpt bench: {device} ({machine['device_name']}), {machine['cores']} cores, torch {machine['torch']}, "
        f"commit {machine['commit']}; writing {out / stem}.{{csv,json,md,png}}")

    def flush(new: list[dict]) -> None:
        load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # as this op ended
        for r in new:
            r.update({k: v for k, v in machine.items() if k in r and r[k] is None}, run=run_id, date=machine["date"],
                     loadavg_1m=load)
        add_ratios(new)
        rows.extend(new)
        # CSV and JSON get each op's rows once, as they come; the Markdown and PNG show the run so far
        write_results(new, out, stem, run_rows=rows, machine=machine,
                      peaks={k: p.note for k, p in ctx.peaks.items()})

    if device == "cpu":  # every CPU suite starts from glibc malloc's own settings, whatever ran before
        _cpu_malloc.restore()
    if suite in ("e2e", "all"):
        if model is None:
            which = {}
        elif model in e2e.GPT2_SIZES:
            which = dict(models=("gpt2",), gpt_size=model)
        elif model in e2e.BERT_SIZES:
            which = dict(models=("bert",), size=model)
        else:
            raise ValueError(f"model: expected one of {E2E_MODELS}, got {model!r}")
        for pair in which.pop("models", e2e.MODELS):  # written pair by pair: a cut-short run keeps BERT's
            flush(e2e.bench_e2e(ctx, batch=batch, seq=seq, dropout=dropout, models=(pair,), compile=compile, **which))
            write_tuning(out, stem)  # the attention kernels a training step tuned
    if suite in ("kernels", "all"):
        for op in ops or OPS:
            if device == "cpu":
                _cpu_malloc.restore()
            kernels.run_kernels(ctx, [op], on_rows=flush)
            write_tuning(out, stem)
    return rows


def tuning_choices() -> list[dict]:
    """The launch configs the Triton kernels' tuners picked in this process (attention's autotuner,
    the contrastive kernels' first-call timing): which candidates win on this GPU, for the next
    pruning of the candidate lists (they are picked offline by ``fastpt.bench.aot``)."""
    from ..ops import attention_triton, contrastive_triton

    if attention_triton.triton is None:
        return []
    return attention_triton.tuning_choices() + contrastive_triton.tuning_choices()


def write_tuning(out: str | Path, stem: str) -> Path | None:
    """``<out>/<stem>-tuning.json`` with ``tuning_choices()`` (rewritten as they grow); None, and
    nothing written, when nothing was tuned (the CPU, or FASTPT_TRITON_AUTOTUNE=0 with one candidate)."""
    choices = tuning_choices()
    if not choices:
        return None
    path = Path(out) / f"{stem}-tuning.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(choices, indent=1) + "\n")
    return path


def default_stem(device: str, quick: bool = False, compile: bool = False) -> str:
    """The results' file stem without ``--name``: ``bench-<device>[-quick][-compile]``."""
    return f"bench-{device}" + ("-quick" if quick else "") + ("-compile" if compile else "")


def bench_main(argv: list[str] | None = None) -> int:
    """``fastpt bench``: returns 0 when every row ran or was skipped for a stated reason, 1 when a
    provider failed (its row says why; the others are still measured), 2 on a usage error."""
    import torch

    parser = argparse.ArgumentParser(prog="fastpt bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("kernels", "e2e", "all"), default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--out", default="benches/results", help="results directory (default benches/results)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    parser.add_argument("--ops", default=None, help=f"comma-separated op benches (default all: {','.join(OPS)})")
    parser.add_argument("--name", default=None, help="file stem (default bench-<device>[-quick][-compile])")
    parser.add_argument("--model", choices=E2E_MODELS, default=None,
                        help="e2e: only this model (default both pairs: bert-tiny and gpt2-mini on cpu, "
                             "bert-base and gpt2-small on cuda)")
    parser.add_argument("--batch", type=positive_int, default=None, help="e2e batch size (default 32 BERT, 16 GPT-2)")
    parser.add_argument("--seq", type=positive_int, default=None,
                        help="e2e sequence length (default 128 on cpu; 512 BERT, 1024 GPT-2 on cuda)")
    parser.add_argument("--dropout", type=arg_type(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
                        default=None,
                        help="e2e hidden and attention dropout (default: the model config's, 0.1 for BERT)")
    parser.add_argument("--compile", action="store_true",
                        help="e2e: both sides under torch.compile instead of eager, the compiled case only "
                             "(fastpt: model.backbone.compile() as fastpt pretrain's train.compile; transformers: "
                             "model.compile() as HF Trainer's torch_compile; transformers eager alongside; the rows report each side's compile "
                             "warm-up seconds); run once without it for eager. Default stem "
                             "bench-<device>[-quick]-compile")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads before running")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out: {args.out} is a file; expected a results directory")
    if args.compile and args.suite == "kernels":
        parser.error("--compile: applies to --suite e2e (or all); the kernel benches have nothing to compile")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    bad = [o for o in ops or () if o not in OPS]
    if bad:
        parser.error(f"--ops: unknown {bad}; expected some of {list(OPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastpt bench: --device cuda, but no CUDA device is visible to torch", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(suite=args.suite, device=args.device, out=args.out, quick=args.quick, ops=ops, name=args.name,
               model=args.model, batch=args.batch, seq=args.seq, dropout=args.dropout, compile=args.compile,
               log=lambda s: print(s, flush=True))
    failed = [r for r in rows if str(r["status"]).startswith("error")]
    stem = args.name or default_stem(args.device, args.quick, args.compile)
    print(f"fastpt bench: {len(rows)} rows, {len(failed)} failed; {Path(args.out) / stem}.md")
    for r in failed:
        print(f"  FAILED {r['op']} {r['case']} {r['mode']} {r['provider']}: {r['status']}")
    return 1 if failed else 0
