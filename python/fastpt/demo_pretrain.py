"""``fastpt demo``: the main job on its embedded default, with no download.

Three steps, each the public command a user would run on their own corpus:

1. ``fastpt preprocess --corpus python-docs --train-tokenizer wordpiece``: the Python
   installation's own documentation (module docstrings and pydoc topics, always present) becomes a
   WordPiece vocabulary and packed token shards (``fastpt.data.preprocess``; resumable: a second
   run reuses finished shards).
2. ``fastpt pretrain``: a BERT-Mini MLM (``fastpt.build("bert-mini")``: fused attention over the
   packed documents, masking with ``fastpt.ops.mlm_mask``, the MLM head through the fused linear
   cross-entropy) for a few minutes (``--minutes``), with checkpoints, metrics.csv and loss.png.
3. ``fastpt eval text --task python-docs-topics --baseline``: fine-tune the pre-trained encoder on
   a built-in 9-class task (which stdlib topic family a docstring comes from) next to the same
   encoder from random init, same data and seed: the row that shows pre-training helped.

Everything lands in ``--out`` (default ``runs/demo``); the summary names the loss curve, the
throughput and both accuracies.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def run(out: str | Path = "runs/demo", *, minutes: float = 3.0, model: str = "bert-mini", vocab_size: int = 8000,
        seq_len: int = 128, batch_size: int = 32, lr: float = 5e-4, seed: int = 0, eval_epochs: int = 3,
        evaluate: bool = True, progress: bool = True, log=print) -> dict:
    """Preprocess, pre-train and evaluate; returns ``{"preprocess", "pretrain", "eval"}`` summaries."""
    from .data.preprocess import preprocess_text
    from .data.shards import read_manifest
    from .train import pretrain

    out = Path(out)
    shards = out / "shards"
    t0 = time.perf_counter()
    log(f"== 1/3 preprocess: the Python documentation -> WordPiece ({vocab_size}) -> shards in {shards}")
    try:
        manifest = read_manifest(shards, verify=False)
        log(f"   reusing {shards} ({manifest['stats']['docs']:,} documents, {manifest['stats']['tokens']:,} tokens)")
    except (FileNotFoundError, ValueError):
        manifest = preprocess_text([], shards, corpus="python-docs", train_tokenizer="wordpiece",
                                   vocab_size=vocab_size, progress=progress, log=log)
    result = {"preprocess": {"docs": manifest["stats"]["docs"], "tokens": manifest["stats"]["tokens"],
                             "seconds": time.perf_counter() - t0}}

    run_dir = out / "pretrain"
    log(f"== 2/3 pretrain: {model} MLM for {minutes:g} min on {shards} -> {run_dir}")
    recipe = {
        "model": model,
        "data": {"path": str(shards), "seq_len": seq_len, "mode": "pack"},
        # max_steps sets the cosine schedule's length; the time limit ends the run first on a slow machine
        "train": {"batch_size": batch_size, "grad_accum": 1, "max_steps": 2000, "max_time_s": minutes * 60.0,
                  "lr": lr, "warmup_steps": 50, "schedule": "cosine", "seed": seed, "precision": "auto"},
        "output": {"dir": str(run_dir), "save_every": 0, "keep_last": 1, "log_every": 20, "progress": progress},
    }
    resume = (run_dir / "checkpoints").is_dir()
    summary = pretrain(recipe, resume=resume, log=log)
    result["pretrain"] = summary
    if evaluate:
        log("== 3/3 eval: fine-tune on the built-in python-docs-topics task, pre-trained vs from scratch")
        result["eval"] = _evaluate(run_dir, shards, seed=seed, epochs=eval_epochs, log=log)
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    _report(result, run_dir, log)
    return result


def _evaluate(run_dir: Path, shards: Path, *, seed: int, epochs: int, log) -> dict:
    from .data.tokenizer import load_tokenizer
    from .train.evaluate import builtin_text_task, evaluate_text, load_backbone

    train_path, test_path = builtin_text_task("python-docs-topics", seed=seed)
    tokenizer = load_tokenizer(shards / "tokenizer.json")
    rows = {}
    for name, scratch in (("pre-trained", False), ("from scratch", True)):
        backbone = load_backbone(run_dir, from_scratch=scratch, seed=seed)
        rows[name] = evaluate_text(backbone, tokenizer, train_path, test_path, epochs=epochs, seed=seed,
                                   precision="auto", log=None)
        log(f"   {name:<13} accuracy {rows[name]['accuracy']:.3f}  macro-F1 {rows[name]['macro_f1']:.3f}")
    return rows


def _report(result: dict, run_dir: Path, log) -> None:
    p = result["pretrain"]
    mfu = f"{p['mfu']:.1%}" if isinstance(p.get("mfu"), float) else "n/a (no peak known for this device)"
    log("")
    log(f"pre-training: {p['model']}, {p['steps']} steps, {p['tokens']:,} tokens in {p['train_time_s']:.0f} s on "
        f"{p['device']}: {p['tokens_per_s']:,.0f} tokens/s, MFU {mfu}")
    loss = ("" if p.get("first_loss") is None else  # None when a resumed run had no time left
            f"loss {p['first_loss']:.3f} -> {p['final_loss']:.3f}; ")
    log(f"  {loss}curve: {run_dir / 'loss.png'}, {run_dir / 'metrics.csv'}")
    if "eval" in result:
        e = result["eval"]
        log(f"downstream (9-class python-docs-topics, chance {1 / 9:.3f}): pre-trained "
            f"{e['pre-trained']['accuracy']:.3f} vs from scratch {e['from scratch']['accuracy']:.3f} accuracy")


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpt demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--minutes", type=float, default=3.0, help="pre-training time budget (default 3)")
    parser.add_argument("--model", default="bert-mini", help="zoo config with an MLM objective (default bert-mini)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    parser.add_argument("--eval-epochs", type=int, default=3)
    parser.add_argument("--no-eval", action="store_true", help="skip the downstream evaluation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.out, minutes=args.minutes, model=args.model, vocab_size=args.vocab_size, seq_len=args.seq_len,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_epochs=args.eval_epochs,
        evaluate=not args.no_eval, progress=sys.stderr.isatty())
    return 0
