"""The ``fastpt`` command.

    fastpt info        versions, built backends and which backend serves each op
    fastpt demo        the main job on its embedded default: preprocess the Python documentation,
                       pre-train a BERT-Mini MLM for a few minutes, evaluate against scratch
    fastpt demo-masking  masking throughput on the same corpus against Hugging Face and torch
    fastpt preprocess  corpus -> tokenizer -> packed, memory-mapped shards (fastpt.data.preprocess)
    fastpt convert     Hugging Face checkpoints to and from fastpt (fastpt.models.hf)
    fastpt pretrain    the pre-training recipe (fastpt.train): checkpoints, exact resume, DDP / FSDP2
    fastpt eval        downstream accuracy of a pre-trained encoder vs the same one from scratch
    fastpt bench       the benchmark suite: every op and an end-to-end step against its baselines
    fastpt configs     the model zoo (python/fastpt/configs/*.yaml)

Each of the later commands owns its arguments: ``fastpt <command> --help``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _print_info(as_json: bool) -> None:
    import fastpt

    info = fastpt.info()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    native = info["native"]
    print(f"fastpt {info['version']}  python {info['python']}  torch {info['torch']}  triton {info['triton']}")
    if native:
        cuda = f"CUDA {native['cuda_version']} ({native['cuda_archs']})" if native.get("cuda") else "no CUDA kernels"
        print(f"native core: built with {native['compiler']}, {cuda}")
    print(f"CUDA device: {info['cuda_device'] or 'none'}")
    print("backends:")
    for name, why in info["backends"].items():
        print(f"  {name:<10} {'usable' if why is None else 'unavailable: ' + why}")
    if info["triton_interpreter"]:
        print("  (TRITON_INTERPRET=1: Triton kernels run on the CPU interpreter, for tests)")
    print("ops (backend picked when backend=None):")
    for op, per_device in info["ops"].items():
        print(f"  {op:<22} " + "  ".join(f"{dev}: {b}" for dev, b in per_device.items()))


def _preprocess(argv):
    from .data.preprocess import preprocess_main

    return preprocess_main(argv)


def _convert(argv):
    """A training checkpoint (``PretrainModel.save_pretrained``: objective heads, teachers) goes
    through ``fastpt.to_hf``; the backbone + heads format of ``--from-hf`` through models.hf.
    ``--to-hf`` of a pretrain run directory converts its newest checkpoint that verifies. The
    checkpoint's tokenizer (the shards' tokenizer.json) goes along, with the tokenizer_config.json
    transformers needs to load it (``models.hf.write_tokenizer_config``).
    Errors (a checkpoint Hugging Face cannot express: an encoder-decoder, a ViT without a cls token,
    a factorised embedding ...) end as ``fastpt convert: error:`` and status 1, as in convert_main."""
    from pathlib import Path

    if "--to-hf" in argv:
        i = argv.index("--to-hf")
        src = Path(argv[i + 1]) if i + 1 < len(argv) else None
        rest = argv[:i] + argv[i + 2:]
        if src is not None and src.is_dir():
            from .models.model import CONFIG_FILE, FORMAT, config_format
            from .train.checkpoint import (MANIFEST, CorruptCheckpointError, checkpoints_dir, find_checkpoints,
                                           latest_checkpoint, verify_checkpoint)

            def warn(msg: str) -> None:  # a torn newer checkpoint, skipped
                print(f"fastpt convert: warning: {msg.replace('resuming from', 'using')}", file=sys.stderr)

            hint = ""
            try:
                if not (src / CONFIG_FILE).is_file() and find_checkpoints(checkpoints_dir(src)):
                    src = latest_checkpoint(src, warn=warn)  # a pretrain run: its newest checkpoint that verifies
                    print(f"fastpt convert: {argv[i + 1]} is a run directory: converting its newest checkpoint {src}")
                    argv = argv[:i + 1] + [str(src)] + argv[i + 2:]
                elif (src / MANIFEST).is_file():  # a training checkpoint named directly: verified as a run's is
                    hint = f" (the run directory's newest good checkpoint: --to-hf {src.parent.parent})"
                    verify_checkpoint(src)
            except CorruptCheckpointError as exc:
                print(f"fastpt convert: error: --to-hf {src}: {exc}{hint}", file=sys.stderr)
                return 1
        if src is not None and src.is_dir() and config_format(src) == FORMAT:
            if len(rest) != 1 or rest[0].startswith("-"):
                print("fastpt convert: error: --to-hf DIR OUT takes one OUT directory (options --dtype/--arch apply "
                      "to the backbone format only)", file=sys.stderr)
                return 2
            import fastpt
            from .models.hf import _copy_side_files, check_out_dir, write_tokenizer_config

            try:
                check_out_dir(src, rest[0], "--to-hf")
                model = fastpt.PretrainModel.from_pretrained(src)
                out = fastpt.to_hf(model, rest[0])
                _copy_side_files(src, out)
                ids = dict(model.config.get("special_ids") or {})
                if getattr(model.objective, "mask_token_id", None) is not None:
                    ids["mask"] = model.objective.mask_token_id
                write_tokenizer_config(out, ids)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                print(f"fastpt convert: error: --to-hf {src}: {exc}", file=sys.stderr)
                return 1
            tokenizer = "with its tokenizer" if (out / "tokenizer.json").is_file() else \
                "without tokenizer files (the checkpoint holds none: copy the tokenizer's files there)"
            print(f"wrote a Hugging Face checkpoint to {out}, {tokenizer}")
            return 0
    from .models.hf import convert_main

    return convert_main(argv)


def _demo(argv):
    from .demo_pretrain import demo_main

    return demo_main(argv)


def _pretrain(argv):
    from .train import pretrain_main

    return pretrain_main(argv)


def _eval(argv):
    from .train.evaluate import eval_main

    return eval_main(argv)


def _bench(argv):
    from .bench import bench_main

    return bench_main(argv)


def _configs(argv):
    """List the zoo, or print one config; a name that is neither a zoo config nor a valid config file
    ends as ``fastpt configs: error:`` and status 1 (load_config's message names what is wrong)."""
    import fastpt

    parser = argparse.ArgumentParser(prog="fastpt configs", description="list the model zoo (shipped YAML configs)")
    parser.add_argument("name", nargs="?", help="print this config's YAML")
    args = parser.parse_args(argv)
    if args.name:
        import yaml

        try:
            cfg = fastpt.load_config(args.name)
        except (OSError, ValueError, TypeError) as exc:
            print(f"fastpt configs: error: {exc}", file=sys.stderr)
            return 1
        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    for name in fastpt.list_configs():
        cfg = fastpt.load_config(name)
        obj = (cfg.get("objective") or {}).get("name", "-")
        print(f"{name:<18} {cfg['backbone']['builder']:<16} {obj:<12} {cfg.get('description', '')[:80]}")
    return 0


# command -> (entry taking the remaining arguments, one-line help); imported on use, so that
# `fastpt info` stays fast and a missing optional dependency only affects its own command
DELEGATED = {
    "demo": (_demo, "the main job on its embedded default: preprocess, pre-train and evaluate (a few minutes)"),
    "preprocess": (_preprocess, "corpus -> tokenizer -> packed, memory-mapped token shards"),
    "convert": (_convert, "Hugging Face checkpoints to and from fastpt (--from-hf DIR OUT / --to-hf DIR OUT)"),
    "pretrain": (_pretrain, "pre-train from a recipe YAML (--config X.yaml [--resume] [--set k=v]); "
                            "torchrun -m fastpt pretrain for several GPUs"),
    "eval": (_eval, "downstream accuracy: text fine-tune / linear probe, vision linear probe + kNN"),
    "bench": (_bench, "time fastpt against its baselines on the same inputs (kernels, e2e); results under benches/results"),
    "configs": (_configs, "list the model zoo, or print one config (fastpt configs bert-base)"),
}


def main(argv: list[str] | None = None) -> int:
    """The ``fastpt`` command. Output piped into a reader that stops early (``fastpt configs | head``) ends
    quietly with status 141, as a command killed by SIGPIPE does (it was a BrokenPipeError traceback)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        try:  # Python flushes stdout at exit: point it at devnull, or that flush raises again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return int(DELEGATED[argv[0]][0](argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="fastpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, built backends and which backend serves each op")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_demo = sub.add_parser("demo-masking", help="masking throughput on a built-in corpus (the Python documentation) "
                                                 "against Hugging Face's collator and torch")
    p_demo.add_argument("--batch", type=int, default=256, help="rows per batch, >= 1 (default 256)")
    p_demo.add_argument("--seq-len", type=int, default=512, help="tokens per row, >= 3 (default 512)")
    p_demo.add_argument("--vocab-size", type=int, default=8000,
                        help="WordPiece vocabulary to train, >= 109: 8 specials + 100 T5 sentinels + 1 (default 8000)")
    p_demo.add_argument("--seed", type=int, default=0, help="0 .. 2**63-1 (default 0)")
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)  # listed here; parsed by its own entry
    args = parser.parse_args(argv)
    if args.command == "info":
        _print_info(args.json)
    elif args.command == "demo-masking":
        return _demo_masking(args)
    return 0


def _demo_masking(args) -> int:
    """``fastpt demo-masking``: a bad flag (named, with its valid range) ends as ``fastpt demo-masking:
    error:`` and status 2 before the corpus is built; an error of a step as status 1."""
    from .demo import MaskingDemoError, check_args, run_demo

    prog = "fastpt demo-masking"
    try:
        check_args(batch=args.batch, seq_len=args.seq_len, vocab_size=args.vocab_size, seed=args.seed)
    except MaskingDemoError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        run_demo(batch=args.batch, seq_len=args.seq_len, vocab_size=args.vocab_size, seed=args.seed)
    except (ValueError, OSError) as exc:  # e.g. a --seq-len longer than the whole corpus
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
