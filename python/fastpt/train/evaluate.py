"""``fastpt eval``: does pre-training help? Downstream accuracy of a backbone, pre-trained or not.

Text: fine-tune a classifier (pooled states + a linear head) on a labelled file, one example per
line, ``label<TAB>text`` (labels are strings; ids follow their sorted order), and report test
accuracy and macro-F1. ``freeze=True`` keeps the encoder fixed and fits a linear probe on its
pooled features instead. With no test file a stratified share of the training file is held out
(by seed). ``builtin_text_task()`` writes a labelled task derived from the running Python's own
documentation, so the demo needs no download (the file format, split and task: ``fastpt.data.tasks``).

Vision: features of a frozen encoder (``extract_features``), then a linear probe (multinomial
logistic regression on standardised features, full-batch L-BFGS) and a weighted kNN
(cosine similarity, k=20, votes ``exp(sim / 0.07)``: DINO's protocol; both probes live in
``fastpt.train.probes``), on fashion-mnist, an image folder (``root/<class>/*.png``;
``root/train`` + ``root/test`` when split) or the output of ``fastpt preprocess --images``.

Which weights: objectives that keep a second copy of the backbone are evaluated as their reference
evaluates them (``select_weights``): DINO's EMA teacher (DINO's eval_knn.py / eval_linear.py default to
``--checkpoint_key teacher``, and the paper reports the teacher), MoCo v3's base (online) encoder,
not the momentum one (its main_lincls.py loads ``base_encoder``). ``--weights teacher|student``
picks one; the result says which (``weights``).

The baseline that shows pre-training helps is the same architecture with random weights:
``load_backbone(dir, from_scratch=True)`` / ``fastpt eval ... --from-scratch`` (or ``--baseline``
for both rows from one command, same data, same seed).

Everything is deterministic for a seed on the CPU (the random state is forked, the caller's is
left as it was); the backbone given to ``evaluate_text`` is copied, never trained in place.

    fastpt eval text --model runs/bert-mini --task python-docs-topics --baseline
    fastpt eval text --model DIR --train train.tsv [--test test.tsv] [--freeze]
    fastpt eval vision --model runs/mae --data fashion-mnist --train-limit 10000 [--probe knn]
    fastpt eval vision --model runs/dino --data fashion-mnist [--weights student]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The labelled-task and probe names stay importable from here (re-exported; they lived here first).
from .._args import arg_type as _arg_type
from .._args import positive_float as _positive_float
from .._args import positive_int as _positive_int
from .._args import seed as _seed_arg
from ..data.shards import nearest_existing
from ..data.tasks import (BUILTIN_TASKS, PYTHON_DOCS_TOPICS, builtin_text_task, read_labelled,  # noqa: F401
                          read_rows, stratified_split, write_text_atomic)
from ..models import TextEncoder, VisionEncoder
from ..objectives.base import pool
from ..ops._rng import generator_seed
from .data import pixels_to_float
from .probes import classification_metrics, knn_predict, linear_probe, standardize  # noqa: F401
from .recipe import resolve_precision

PROBES = ("linear", "knn", "both")
WEIGHTS = ("auto", "teacher", "student")
POOLINGS = ("mean", "first", "last")
CHECKPOINT_FILES = ("fastpt_config.json", "model.safetensors")


# ----------------------------------------------------------------------------- backbones


def _find(module: nn.Module, kind: type, what: str) -> nn.Module:
    """``module`` itself when it is a ``kind``, else its first such submodule (the encoder of an
    encoder-decoder, a tower of a two-tower model)."""
    for m in module.modules():
        if isinstance(m, kind):
            return m
    raise TypeError(f"{what} needs a {kind.__name__} backbone (or a model holding one), got {type(module).__name__}")


def _is_checkpoint(d: Path) -> bool:
    return all((d / f).is_file() for f in CHECKPOINT_FILES) or \
        ((d / "config.json").is_file() and any((d / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory ``path`` names: ``path`` itself when it holds a model
    (``fastpt_config.json`` + ``model.safetensors``, or a Hugging Face ``config.json`` + weights);
    for a pretrain run directory, its newest checkpoint that verifies (``checkpoint.latest_checkpoint``:
    a torn or corrupt newer one is skipped with a warning); else the model directory below ``path``
    with the largest step number in its name, then the newest (hidden and ``*.tmp`` directories,
    torn writes, are skipped).

    Raises FileNotFoundError naming the path and what was looked for; CorruptCheckpointError
    (a ValueError) when a run's checkpoints all fail verification, or a training checkpoint named
    itself (its ``checkpoint.json`` beside it) does not match its manifest.
    """
    from .checkpoint import MANIFEST, checkpoints_dir, find_checkpoints, latest_checkpoint, verify_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {path}: no such directory")
    if _is_checkpoint(path):
        if (path / MANIFEST).is_file():  # a training checkpoint named directly: verified as --resume verifies it
            verify_checkpoint(path)
        return path
    if find_checkpoints(checkpoints_dir(path)):  # a pretrain run: its newest checkpoint that verifies
        return latest_checkpoint(path, warn=lambda msg: warnings.warn(msg.replace("resuming from", "using"),
                                                                      stacklevel=3))
    found = [d for d in path.rglob("*") if d.is_dir() and _is_checkpoint(d)
             and not any(p.startswith(".") or p.endswith(".tmp") for p in d.relative_to(path).parts)]
    if not found:
        raise FileNotFoundError(f"model {path}: no checkpoint in it or below it (looked for "
                                f"{' + '.join(CHECKPOINT_FILES)}, or a Hugging Face config.json + weights)")

    def order(d: Path):
        steps = [int(n) for n in re.findall(r"\d+", d.relative_to(path).as_posix())]
        return (steps[-1] if steps else -1, d.stat().st_mtime, d.as_posix())

    return max(found, key=order)


def select_weights(model: nn.Module, weights: str = "auto", *, where: str = "model") -> tuple[nn.Module, str]:
    """The backbone of ``model`` (a ``PretrainModel``) to evaluate, and which it is: "teacher",
    "student", or "backbone" when the objective keeps no second copy of it.

    Second copies: DINO's EMA teacher (``teacher_backbone``), MoCo v3's momentum encoder
    (``momentum_backbone``), self-distillation's frozen teacher (``teacher``). ``weights="auto"``
    picks what the method's reference evaluates: DINO's teacher (eval_knn.py / eval_linear.py
    ``--checkpoint_key teacher``; the paper's numbers are the teacher's), MoCo v3's base (online)
    encoder (main_lincls.py loads ``base_encoder``), the distilled student. "teacher" / "student"
    force one. Raises ValueError naming ``weights`` and ``where`` for an unknown choice, or
    "teacher" when the objective keeps none.
    """
    from ..objectives import DINO, MoCoV3, SelfDistillation

    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    objective = getattr(model, "objective", None)
    teacher, default = None, "student"
    if isinstance(objective, DINO):
        teacher, default = objective.teacher_backbone, "teacher"
    elif isinstance(objective, MoCoV3):
        teacher = objective.momentum_backbone
    elif isinstance(objective, SelfDistillation):
        teacher = objective.teacher
    if teacher is None:
        if weights == "teacher":
            raise ValueError(f"weights: teacher: {where} has no teacher backbone (its objective, "
                             f"{type(objective).__name__ if objective is not None else 'none'}, keeps no EMA / "
                             f"momentum / distillation copy); use student or auto")
        return model.backbone, "backbone"
    which = default if weights == "auto" else weights
    if which == "teacher":  # a trainable copy: the objective keeps its teacher frozen (no gradients), which
        teacher = copy.deepcopy(teacher).requires_grad_(True)  # fine-tuning would silently leave as it was
    return (teacher if which == "teacher" else model.backbone), which


def load_backbone(path: str | os.PathLike, *, from_scratch: bool = False, seed: int = 0,
                  weights: str = "auto") -> nn.Module:
    """The backbone of a checkpoint (see ``resolve_checkpoint``): a ``PretrainModel.save_pretrained``
    directory (what pretrain checkpoints hold), or what ``fastpt.assemble.from_hf`` reads (a Hugging
    Face directory, a ``fastpt convert`` output; its heads are not needed and dropped silently).

    ``weights``: "auto", "teacher" or "student", for objectives that keep a second copy of the
    backbone (``select_weights``: "auto" is DINO's EMA teacher, MoCo v3's online encoder).
    ``from_scratch``: the same architecture with fresh random weights (drawn from ``seed``): the
    baseline pre-training has to beat (``weights`` other than "auto" is then a ValueError).
    Raises FileNotFoundError / ValueError naming the path.
    """
    return _load_backbone(path, from_scratch=from_scratch, seed=seed, weights=weights)[0]


def _load_backbone(path, *, from_scratch: bool, seed: int, weights: str) -> tuple[nn.Module, str]:
    """``load_backbone`` and which weights it returned (``select_weights``; "random" from scratch)."""
    import fastpt.assemble as assemble
    from ..models.model import FORMAT, PretrainModel

    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    if from_scratch and weights != "auto":
        raise ValueError(f"weights: {weights}: a from-scratch backbone has random weights, no teacher or "
                         f"student; leave weights at auto")
    d = resolve_checkpoint(path)
    config = {}
    if (d / "fastpt_config.json").is_file():
        config = json.loads((d / "fastpt_config.json").read_text(encoding="utf-8"))
    if config.get("format") == FORMAT:
        if not from_scratch:
            return select_weights(PretrainModel.from_pretrained(d), weights, where=str(d))
        with _seeded(seed, "cpu"):
            return assemble.build(d, objective=None).backbone, "random"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="from_hf: dropped")
        model = assemble.from_hf(d, objective=None)
    if not from_scratch:
        return select_weights(model, weights, where=str(d))
    with _seeded(seed, "cpu"):
        return assemble.build(model.config, objective=None).backbone, "random"


def fresh_like(backbone: nn.Module, seed: int = 0) -> nn.Module:
    """A new backbone of the same architecture (rebuilt from its ``.config``, the builder's
    arguments) with random weights drawn from ``seed``. Raises ValueError for a backbone whose
    ``.config`` names no known builder."""
    import fastpt.assemble as assemble

    with _seeded(seed, "cpu"):
        return assemble.build({"backbone": dict(getattr(backbone, "config", {}) or {})}).backbone


def _labels_by_name(labels, names, train_names, where) -> np.ndarray:
    """Test labels numbered by the training classes: a test folder numbers its own sorted classes (one of
    only some classes scored against the wrong ids, silently); a class training never saw is an error."""
    labels = np.asarray(labels)
    names, train_names = list(names or []), list(train_names or [])
    if not names or not train_names or names == train_names:
        return labels
    index = {c: i for i, c in enumerate(train_names)}
    unknown = [c for c in names if c not in index]
    if unknown:
        raise ValueError(f"{_where(where)}: test classes {unknown} are not among the training classes "
                         f"{train_names}")
    remap = np.asarray([index[c] for c in names], dtype=np.int64)
    return np.where(labels >= 0, remap[np.clip(labels, 0, None)], labels)


def find_tokenizer(model_path: str | os.PathLike):
    """The tokenizer saved with a model: in its checkpoint directory, else in a parent up to
    ``model_path`` (a pretrain output dir), else in the shard directory the run trained on
    (``trainer_state.json``'s recipe ``data.path``). Returns a ``tokenizers.Tokenizer``, or None."""
    from ..data.tokenizer import load_tokenizer

    top = Path(model_path).resolve()
    ckpt = d = resolve_checkpoint(model_path).resolve()
    candidates = [d]
    while d != top and top in d.parents:
        d = d.parent
        candidates.append(d)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        data = (state.get("recipe") or {}).get("data") or {}
        if data.get("path"):
            candidates.append(Path(data["path"]))
    except (OSError, ValueError, AttributeError):
        pass
    for d in candidates:
        if any((d / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
            return load_tokenizer(d)
    return None


@contextmanager
def _seeded(seed: int, device):
    """Fork torch's random state (CPU, and ``device`` when CUDA), seed it, restore it on exit."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(generator_seed(seed))
        yield


def _device_of(module: nn.Module, device) -> torch.device:
    if device not in (None, "auto"):
        return torch.device(device)
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _autocast(device: torch.device, precision: str):
    if precision == "auto":  # as the recipe's: bf16 where the device multiplies it natively
        precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision: expected 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ----------------------------------------------------------------------------- text


def _tokenize(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text (special tokens from the tokenizer's post-processor), at most ``max_len``."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        from ..data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer or a path, got {type(tokenizer).__name__}")
    tok = Tokenizer.from_str(tokenizer.to_str())  # truncation set on a copy, the caller's is untouched
    tok.no_padding()
    specials = tok.num_special_tokens_to_add(False)
    if max_len <= specials:  # tokenizers then does not truncate at all (and max_len = specials keeps no text)
        raise ValueError(f"max_len: expected more than the {specials} special tokens the tokenizer adds "
                         f"([CLS] / [SEP] ...), got {max_len}")
    tok.enable_truncation(max_len)
    return [e.ids for e in tok.encode_batch(list(texts))]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class TextClassifier(nn.Module):
    """A text encoder, pooling (``"mean"`` over valid tokens, ``"first"`` token, ``"last"`` valid
    token) and dropout + a linear head: forward(input_ids (B, S), attention_mask (B, S)) -> logits (B, C)."""

    def __init__(self, encoder: nn.Module, num_classes: int, *, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.hidden_size, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids, attention_mask).last_hidden_state
        return pool(h, self.pooling, attention_mask).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(input_ids, attention_mask)))


def _batches(order: Sequence[int], rows: list[list[int]], batch_size: int, pad_id: int, device):
    for lo in range(0, len(order), batch_size):
        ids, mask = _pad([rows[i] for i in order[lo:lo + batch_size]], pad_id)
        yield order[lo:lo + batch_size], ids.to(device), mask.to(device)


@torch.no_grad()
def _predict(fn: Callable, rows: list[list[int]], batch_size: int, pad_id: int, device) -> torch.Tensor:
    """``fn(ids, mask)`` over all rows, batched by length (less padding), in the rows' order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    outs = [None] * len(rows)
    for idx, ids, mask in _batches(order, rows, batch_size, pad_id, device):
        for i, v in zip(idx, fn(ids, mask).float().cpu()):
            outs[i] = v
    return torch.stack(outs)


def evaluate_text(backbone: nn.Module, tokenizer, train_path, test_path=None, *, freeze: bool = False,
                  pooling: str = "mean", epochs: int = 3, batch_size: int = 32, lr: float = 1e-4,
                  head_lr: float = 1e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.1,
                  dropout: float = 0.1, max_len: int = 128, test_fraction: float = 0.2, seed: int = 0,
                  l2: float = 1e-4, device=None, precision: str = "fp32", log: Callable | None = None) -> dict:
    """Fine-tune a classifier on ``train_path`` and score it on ``test_path`` (``label<TAB>text`` files).

    Args:
        backbone: a ``TextEncoder`` (or a model holding one: the encoder of an encoder-decoder).
            It is copied: the caller's weights are never changed.
        tokenizer: ``tokenizers.Tokenizer`` or a path for ``load_tokenizer`` (the model's directory).
        train_path, test_path: labelled files; without ``test_path`` a stratified ``test_fraction``
            of the training file is held out (by ``seed``; repeated texts stay on one side).
        freeze: keep the encoder fixed and fit a linear probe (``linear_probe``, ``l2``) on its
            pooled features instead of fine-tuning.
        pooling: "mean" over valid tokens, "first" token ([CLS]) or "last" valid token (causal LMs).
        epochs, batch_size, lr (encoder), head_lr, weight_decay, warmup_ratio (linear warmup, then
            linear decay to 0), dropout (before the head), max_len (tokens, truncated): fine-tuning.
        device: default the backbone's. precision: "fp32", "bf16" or "fp16" autocast, or "auto"
            (the recipe's choice: bf16 where the device multiplies it natively).
        log: called with a progress line per epoch (e.g. ``print``).

    Returns a dict: accuracy, macro_f1, majority (accuracy of always answering the most frequent
    training label), n_train, n_test, labels (id order), mode ("fine-tune" / "linear-probe"),
    train_loss (last epoch's mean), seconds, and the settings.

    Raises FileNotFoundError / ValueError naming the file and line (malformed line, a test label
    absent from the training file), ValueError when token ids exceed the model's vocabulary, and
    ValueError naming the argument for max_len / batch_size / epochs < 1 or lr / head_lr <= 0.
    """
    start = time.perf_counter()
    for name, v in (("max_len", max_len), ("batch_size", batch_size)) + (() if freeze else (("epochs", epochs),)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    for name, v in () if freeze else (("lr", lr), ("head_lr", head_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: expected a number > 0, got {v!r}")
    encoder = _find(backbone, TextEncoder, "evaluate_text")
    device = _device_of(encoder, device)
    train_labels, train_texts = read_labelled(train_path)
    if test_path is None:
        # the same example twice (text, whitespace aside, and label) stays on one side: a held-out copy of a
        # training example would score memorisation as accuracy (a text under two labels is two examples: a
        # group of both could take a label's only example to the test side)
        tr, te = stratified_split(train_labels, test_fraction, seed,
                                  groups=[(" ".join(t.split()), y) for t, y in zip(train_texts, train_labels)])
        test_labels, test_texts = [train_labels[i] for i in te], [train_texts[i] for i in te]
        train_labels, train_texts = [train_labels[i] for i in tr], [train_texts[i] for i in tr]
        test_where = f"{train_path} (held out {test_fraction:g})"
        if not test_labels:
            raise ValueError(f"{train_path}: too few examples to hold out a test set; pass a test file")
    else:
        rows = read_rows(test_path)
        test_labels, test_texts, test_where = [r[1] for r in rows], [r[2] for r in rows], str(test_path)
        known = set(train_labels)
        for lineno, label, _ in rows:
            if label not in known:
                raise ValueError(f"{test_path}:{lineno}: label {label!r} does not occur in the training file "
                                 f"{train_path} (labels: {', '.join(sorted(known))})")
    names = sorted(set(train_labels))
    if len(names) < 2:
        raise ValueError(f"{train_path}: a classifier needs at least 2 labels, found {names}")
    label_id = {n: i for i, n in enumerate(names)}
    y_train = torch.tensor([label_id[y] for y in train_labels])
    y_test = torch.tensor([label_id[y] for y in test_labels])

    from ..data.tokenizer import load_tokenizer, special_token_ids

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    limit = encoder.config.get("max_positions") if encoder.config.get("position", "learned") == "learned" else None
    if limit:
        max_len = min(max_len, int(limit) - int(encoder.config.get("position_offset", 0) or 0))
    rows_train, rows_test = _tokenize(tokenizer, train_texts, max_len), _tokenize(tokenizer, test_texts, max_len)
    top = max(max((max(r) for r in rows if r), default=0) for rows in (rows_train, rows_test))
    if top >= encoder.vocab_size:
        raise ValueError(f"tokenizer: token id {top} is outside the model's vocabulary ({encoder.vocab_size}); "
                         "is this the tokenizer the model was trained with?")
    pad_id = special_token_ids(tokenizer).get("pad", 0)
    for rows in (rows_train, rows_test):
        for r in rows:
            if not r:
                r.append(pad_id)  # a text the tokenizer turns into nothing still gets one position

    result = dict(mode="linear-probe" if freeze else "fine-tune", pooling=pooling, seed=seed,
                  train=str(train_path), test=test_where, n_train=len(rows_train), n_test=len(rows_test),
                  labels=names, num_labels=len(names), max_len=max_len)
    was_training = encoder.training
    with _seeded(seed, device):  # the head's init, dropout and shuffling: a pure function of seed
        model = TextClassifier(encoder if freeze else copy.deepcopy(encoder), len(names), pooling=pooling,
                               dropout=dropout).to(device)
        if freeze:
            encoder.eval()
            try:
                with _autocast(device, precision):
                    f_train = _predict(model.features, rows_train, batch_size, pad_id, device)
                    f_test = _predict(model.features, rows_test, batch_size, pad_id, device)
            finally:
                encoder.train(was_training)
            pred = linear_probe(f_train, y_train, f_test, num_classes=len(names), l2=l2)
            result.update(l2=l2, feature_dim=f_train.shape[1])
        else:
            loss = _fine_tune(model, rows_train, y_train, pad_id=pad_id, device=device, epochs=epochs,
                              batch_size=batch_size, lr=lr, head_lr=head_lr, weight_decay=weight_decay,
                              warmup_ratio=warmup_ratio, seed=seed, precision=precision, log=log)
            model.eval()
            with _autocast(device, precision):
                pred = _predict(model, rows_test, batch_size, pad_id, device).argmax(1)
            result.update(epochs=epochs, lr=lr, head_lr=head_lr, batch_size=batch_size, train_loss=loss)
    result.update(classification_metrics(pred, y_test))
    result["majority"] = (y_test == torch.bincount(y_train).argmax()).double().mean().item()
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _fine_tune(model: TextClassifier, rows, y, *, pad_id, device, epochs, batch_size, lr, head_lr, weight_decay,
               warmup_ratio, seed, precision, log) -> float:
    """AdamW (encoder ``lr``, head ``head_lr``; no decay on biases and norms), linear warmup and
    decay, gradient clipping at 1; batches shuffled by ``seed``. Returns the last epoch's mean loss."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size: expected >= 1, got {epochs} and {batch_size}")
    decay = [p for n, p in model.encoder.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.encoder.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [dict(params=decay, lr=lr, weight_decay=weight_decay), dict(params=no_decay, lr=lr, weight_decay=0.0),
              dict(params=[model.head.weight], lr=head_lr, weight_decay=weight_decay),
              dict(params=[model.head.bias], lr=head_lr, weight_decay=0.0)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)
    steps = epochs * math.ceil(len(rows) / batch_size)
    warmup = int(warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    g = torch.Generator().manual_seed(generator_seed(seed))
    y = y.to(device)
    # fp16 needs loss scaling, as the pre-training recipe's (small gradients underflowed to 0 without it)
    fp16 = (resolve_precision(precision, device) if precision == "auto" else precision) == "fp16"
    scaler = torch.amp.GradScaler(torch.device(device).type) if fp16 else None
    model.train()
    mean_loss = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        total, count, t0 = 0.0, 0, time.perf_counter()
        for idx, ids, mask in _batches(order, rows, batch_size, pad_id, device):
            with _autocast(device, precision):
                logits = model(ids, mask)
            loss = F.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        mean_loss = total / count
        if log:
            log(f"eval text: epoch {epoch + 1}/{epochs} loss {mean_loss:.4f} ({time.perf_counter() - t0:.1f} s)")
    return mean_loss


# ----------------------------------------------------------------------------- vision


def _to_pixels(images: torch.Tensor, encoder: VisionEncoder) -> torch.Tensor:
    """uint8 (or float) ``(B, C, H, W)`` -> float at the encoder's channels and size. uint8 maps to
    [-1, 1] (``x / 127.5 - 1``) and sizes change by bilinear resizing, as the pre-training recipe's
    image stream does; float images are taken as already so normalised. Grey <-> RGB by
    repetition / luma."""
    # uint8: the pre-training image stream's floats, bit for bit on every device (data.pixels_to_float)
    x = pixels_to_float(images) if images.dtype == torch.uint8 else images.float()
    c = encoder.in_channels
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"images: {x.shape[1]} channels, the encoder takes {c}")
    size = tuple(encoder.patch_embed.image_size)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def extract_features(backbone: nn.Module, images, batch_size: int = 256, *, pooling: str = "auto",
                     device=None, precision: str = "fp32") -> torch.Tensor:
    """Pooled features of a frozen vision encoder: ``(N, D)`` float32 on the CPU.

    images: uint8 ``(N, C, H, W)`` (scaled to [-1, 1]) or float, a tensor or numpy array (a
    memory map is read ``batch_size`` rows at a time); channels and size are adapted to the
    encoder (see ``_to_pixels``). pooling: "first" (the cls token), "mean" over the patch tokens,
    or "auto" (first when the encoder has a cls token). The encoder runs in eval mode and is left
    in the mode it was in. Raises TypeError for a backbone without a ``VisionEncoder``.
    """
    encoder = _find(backbone, VisionEncoder, "extract_features")
    device = _device_of(encoder, device)
    has_cls = encoder.patch_embed.cls_token is not None
    if pooling == "auto":
        pooling = "first" if has_cls else "mean"
    if pooling not in ("first", "mean"):
        raise ValueError(f"pooling: expected 'auto', 'first' or 'mean', got {pooling!r}")
    if pooling == "first" and not has_cls:
        raise ValueError("pooling='first': this encoder has no cls token; use 'mean'")
    if not hasattr(images, "shape") or len(images.shape) != 4:
        raise ValueError(f"images: expected (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for lo in range(0, images.shape[0], batch_size):
            chunk = images[lo:lo + batch_size]
            chunk = torch.from_numpy(np.ascontiguousarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
            with _autocast(device, precision):
                h = encoder(_to_pixels(chunk.to(device), encoder)).last_hidden_state
            feats = h[:, 0] if pooling == "first" else h[:, int(has_cls):].mean(1)
            out.append(feats.float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, encoder.hidden_size)


def load_images(data, split: str = "train", *, channels: int | None = None, size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images uint8 (N, C, H, W), labels int64 (N,), class names)`` of ``data``:
    "fashion-mnist" (its ``split``), a preprocessed image dir (``manifest.json``), an image folder
    (``root/<class>/...``; with ``root/train`` and ``root/test`` those are the splits, ``split``
    picks one), a ``(images, labels)`` pair or a dataset of ``(image, label)``.
    Folder images are read at ``channels`` / ``size`` when given (they must share a size).
    Raises FileNotFoundError / ValueError naming the path (unlabelled images included).
    """
    from ..data import images as imgs

    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        return np.asarray(x), np.asarray(y, dtype=np.int64), []
    if isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]
        return (torch.stack([torch.as_tensor(x) for x, _ in items]).numpy(), np.array([y for _, y in items], np.int64),
                list(getattr(data, "classes", [])))
    if str(data) == "fashion-mnist":
        x, y = imgs.load_fashion_mnist(split)
        return x, y, list(imgs.FASHION_MNIST_CLASSES)
    root = Path(data)
    if (root / "manifest.json").is_file():
        ds = imgs.open_image_dataset(root)
        return ds.images, np.asarray(ds.labels, dtype=np.int64), ds.classes
    if (root / split).is_dir():
        root = root / split
    folder = imgs.ImageFolder(root, channels=channels, size=size)
    if any(label < 0 for label in folder.labels):
        raise ValueError(f"image folder {root}: images need labels (one subfolder per class)")
    try:
        x = np.stack([folder[i][0].numpy() for i in range(len(folder))])
    except ValueError as exc:
        raise ValueError(f"image folder {root}: images differ in size or channels ({exc})") from None
    return x, np.asarray(folder.labels, dtype=np.int64), folder.classes


def _where(data) -> str:
    """How an error names ``data``: its path or name, else what kind of object it is."""
    return str(data) if isinstance(data, (str, os.PathLike)) else f"images ({type(data).__name__})"


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    g = torch.Generator().manual_seed(generator_seed(seed))
    return np.sort(torch.randperm(n, generator=g)[:limit].numpy())


def evaluate_vision(backbone: nn.Module, data, test=None, *, probe: str = "both", k: int = 20,
                    temperature: float = 0.07, l2: float = 1e-4, train_limit: int | None = None,
                    test_limit: int | None = None, test_fraction: float = 0.2, batch_size: int = 256,
                    pooling: str = "auto", seed: int = 0, device=None, precision: str = "fp32",
                    log: Callable | None = None) -> dict:
    """Linear probe and / or kNN accuracy of a frozen vision encoder.

    Args:
        backbone: a ``VisionEncoder`` (or a model holding one).
        data: training images: "fashion-mnist", a directory, ``(images, labels)`` or a dataset
            (see ``load_images``). test: the test images in the same forms; default: the test
            split of fashion-mnist / of ``DIR/test``, else a stratified ``test_fraction`` held out.
        probe: "linear", "knn" or "both". k, temperature: kNN. l2: the probe's weight decay.
        train_limit, test_limit: random subsets (by ``seed``) for speed.
        batch_size, pooling, device, precision: feature extraction (``extract_features``).

    Returns a dict: ``linear`` / ``knn`` -> {accuracy, macro_f1}, n_train, n_test, num_classes,
    feature_dim, pooling, seconds and the settings. Raises ValueError for a bad probe name,
    unlabelled data, or no image on one side (a held-out split needs a class of 2 images or more).
    """
    if probe not in PROBES:
        raise ValueError(f"probe: expected one of {PROBES}, got {probe!r}")
    start = time.perf_counter()
    encoder = _find(backbone, VisionEncoder, "evaluate_vision")
    size = encoder.patch_embed.image_size
    opts = dict(channels=encoder.in_channels if encoder.in_channels in (1, 3) else None,
                size=size[0] if size[0] == size[1] else None)
    x_train, y_train, classes = load_images(data, "train", **opts)
    split_dir = isinstance(data, (str, os.PathLike)) and \
        (str(data) == "fashion-mnist" or (Path(data) / "test").is_dir())
    if test is not None or split_dir:
        x_test, y_test, test_classes = load_images(data if test is None else test, "test", **opts)
        y_test = _labels_by_name(y_test, test_classes, classes, data if test is None else test)
    else:
        tr, te = stratified_split(y_train.tolist(), test_fraction, seed)
        if len(y_train) and not te:  # stratified_split holds out one of a class only from 2 images up
            raise ValueError(f"{_where(data)}: too few images to hold out a test set: every class has 1 image, "
                             f"and a class needs at least 2 images to give one to the test side (test_fraction "
                             f"{test_fraction:g}); add images, or pass test images (--test-data / test=)")
        x_test, y_test = x_train[te], y_train[te]
        x_train, y_train = x_train[tr], y_train[tr]
    if (y_train < 0).any() or (y_test < 0).any():
        raise ValueError("evaluate_vision: every image needs a label (got -1: unlabelled)")
    keep_train, keep_test = _subset(len(y_train), train_limit, seed), _subset(len(y_test), test_limit, seed + 1)
    x_train, y_train = x_train[keep_train], torch.from_numpy(np.asarray(y_train[keep_train]))
    x_test, y_test = x_test[keep_test], torch.from_numpy(np.asarray(y_test[keep_test]))
    # num_classes and the probes reduce over both sides: an empty one failed deep inside torch (max())
    for side, ys, src in (("training", y_train, data), ("test", y_test, data if test is None else test)):
        if not len(ys):
            raise ValueError(f"{_where(src)}: no {side} images (the probes need at least one labelled image "
                             "on each side)")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    t0 = time.perf_counter()
    f_train = extract_features(encoder, x_train, batch_size, pooling=pooling, device=device, precision=precision)
    f_test = extract_features(encoder, x_test, batch_size, pooling=pooling, device=device, precision=precision)
    if log:
        log(f"eval vision: features {tuple(f_train.shape)} + {tuple(f_test.shape)} in {time.perf_counter() - t0:.1f} s")
    result = dict(n_train=len(y_train), n_test=len(y_test), num_classes=num_classes, classes=list(classes),
                  feature_dim=f_train.shape[1], seed=seed,
                  pooling=pooling if pooling != "auto" else ("first" if encoder.patch_embed.cls_token is not None
                                                             else "mean"))
    dev = _device_of(encoder, device)
    if probe in ("linear", "both"):
        with _seeded(seed, dev):
            pred = linear_probe(f_train.to(dev), y_train, f_test.to(dev), num_classes=num_classes, l2=l2)
        result["linear"] = classification_metrics(pred, y_test)
        result["l2"] = l2
    if probe in ("knn", "both"):
        pred = knn_predict(f_train.to(dev), y_train, f_test.to(dev), k=k, temperature=temperature,
                           num_classes=num_classes)
        result["knn"] = classification_metrics(pred, y_test)
        result.update(k=min(k, len(y_train)), temperature=temperature)  # the k used: at most the training images
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# ----------------------------------------------------------------------------- CLI


_fraction = _arg_type(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")


def _check_out(path: str) -> Path:
    """``--out``: fail before the evaluation, not after it, when the JSON cannot be written there."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; give a file name")
    p = nearest_existing(out.parent)
    if p is not None and not p.is_dir():
        raise ValueError(f"--out {out}: {p} is not a directory")
    if p is not None and not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {p} is not writable")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpt eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    src = common.add_argument_group("backbone")
    src.add_argument("--model", metavar="DIR", help="checkpoint dir, pretrain output dir (latest checkpoint) "
                                                    "or Hugging Face model dir")
    src.add_argument("--config", metavar="NAME", help="zoo name or YAML: build this architecture (with --from-scratch)")
    src.add_argument("--from-scratch", action="store_true",
                     help="random weights, same architecture: the baseline pre-training must beat")
    src.add_argument("--baseline", action="store_true",
                     help="also evaluate --model's architecture from scratch (same data and seed): two rows")
    src.add_argument("--weights", choices=WEIGHTS, default="auto",
                     help="for objectives that keep a second backbone: auto (what the method's reference "
                          "evaluates: DINO's EMA teacher, MoCo v3's online encoder), teacher or student")
    common.add_argument("--seed", type=_seed_arg, default=0, help="0 .. 2**63-1 (default 0)")
    common.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    common.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast precision (default auto: bf16 where the device multiplies it natively)")
    common.add_argument("--batch-size", type=_positive_int, default=None,
                        help="default 32 (text), 256 (vision features)")
    common.add_argument("--out", metavar="JSON", help="write the results here")

    t = sub.add_parser("text", parents=[common], help="fine-tune a classifier on label<TAB>text lines")
    t.add_argument("--train", metavar="FILE", help="labelled training file (label<TAB>text per line)")
    t.add_argument("--test", metavar="FILE", help="labelled test file (default: hold out --test-fraction)")
    t.add_argument("--task", choices=sorted(BUILTIN_TASKS), help="a built-in task instead of --train/--test")
    t.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or model dir (default: the model's)")
    t.add_argument("--freeze", action="store_true", help="linear probe on a frozen encoder instead of fine-tuning")
    t.add_argument("--pooling", choices=POOLINGS, default="mean")
    t.add_argument("--epochs", type=_positive_int, default=3)
    t.add_argument("--lr", type=_positive_float, default=1e-4, help="encoder learning rate (default 1e-4)")
    t.add_argument("--head-lr", type=_positive_float, default=1e-3, help="head learning rate (default 1e-3)")
    t.add_argument("--max-len", type=_positive_int, default=128, help="tokens per example (default 128)")
    t.add_argument("--test-fraction", type=_fraction, default=0.2)

    v = sub.add_parser("vision", parents=[common], help="linear probe and kNN of a frozen image encoder")
    v.add_argument("--data", required=True, help="fashion-mnist, an image folder or a preprocessed image dir")
    v.add_argument("--test-data", metavar="DIR",
                   help="test images (default: the data's test split or a held-out share)")
    v.add_argument("--probe", choices=PROBES, default="both")
    v.add_argument("--k", type=_positive_int, default=20)
    v.add_argument("--temperature", type=_positive_float, default=0.07)
    v.add_argument("--l2", type=float, default=1e-4, help="linear probe weight decay (default 1e-4)")
    v.add_argument("--pooling", choices=("auto", "first", "mean"), default="auto")
    v.add_argument("--train-limit", type=_positive_int, help="use a random subset of this many training images")
    v.add_argument("--test-limit", type=_positive_int, help="use a random subset of this many test images")
    v.add_argument("--test-fraction", type=_fraction, default=0.2)
    return parser


def _backbones(args, vocab_size: int | None) -> list[tuple[str, nn.Module, str]]:
    """(row name, backbone, which weights: ``select_weights``'s or "random") triples the command evaluates."""
    import fastpt.assemble as assemble

    if args.model is None and args.config is None:
        raise ValueError("give --model DIR, or --config NAME --from-scratch")
    if args.model is None:
        if not args.from_scratch:
            raise ValueError(f"--config {args.config}: a config has no trained weights; add --from-scratch")
        if args.weights != "auto":
            raise ValueError(f"--weights {args.weights}: --config --from-scratch has random weights; drop --weights")
        with _seeded(args.seed, "cpu"):  # objective=None: only the backbone is wanted, no token ids needed
            model = assemble.build(args.config, vocab_size=vocab_size, objective=None)
        return [(f"{args.config} (scratch)", model.backbone, "random")]
    name = str(args.model)
    if args.from_scratch:
        if args.weights != "auto":
            raise ValueError(f"--weights {args.weights}: --from-scratch has random weights; drop --weights "
                             f"(or use --baseline for both rows)")
        return [(f"{name} (scratch)", *_load_backbone(args.model, from_scratch=True, seed=args.seed, weights="auto"))]
    rows = [(name, *_load_backbone(args.model, from_scratch=False, seed=0, weights=args.weights))]
    if args.baseline:
        rows.append((f"{name} (scratch)",
                     *_load_backbone(args.model, from_scratch=True, seed=args.seed, weights="auto")))
    return rows


def _table(rows: list[tuple[str, dict]], columns: list[tuple[str, str]]) -> str:
    """A plain text table: one row per model, ``columns`` (header, key path like "knn.accuracy")."""
    def get(d, path):
        for part in path.split("."):
            d = d.get(part, {}) if isinstance(d, dict) else {}
        if isinstance(d, float):
            return f"{d:.1f}" if path == "seconds" else f"{d:.4f}"
        return "-" if d == {} else str(d)

    header = ["model"] + [h for h, _ in columns]
    body = [[name] + [get(r, key) for _, key in columns] for name, r in rows]
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [header] + body]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def eval_main(argv: list[str] | None = None) -> int:
    """``fastpt eval text|vision ...``; prints a result table, writes JSON with --out; returns the exit status."""
    args = _parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  progress on stderr, results on stdout
    try:
        out = _check_out(args.out) if args.out else None
        if args.kind == "text":
            from ..data.tokenizer import load_tokenizer

            if args.task:
                if args.train or args.test:
                    raise ValueError("--task replaces --train/--test: give one or the other")
                train_path, test_path = builtin_text_task(args.task, seed=args.seed, test_fraction=args.test_fraction)
                log(f"eval text: task {args.task}: {train_path} / {test_path}")
            elif args.train:
                train_path, test_path = args.train, args.test
            else:
                raise ValueError("give --train FILE (label<TAB>text lines) or --task NAME")
            tok = load_tokenizer(args.tokenizer) if args.tokenizer else \
                find_tokenizer(args.model) if args.model else None
            if tok is None:
                raise ValueError("no tokenizer: --model has no tokenizer.json (or vocab.txt) beside its checkpoint; "
                                 "pass --tokenizer PATH")
            rows = []
            for name, backbone, weights in _backbones(args, tok.get_vocab_size()):
                log(f"eval text: {name} ({weights} weights)")
                r = evaluate_text(backbone.to(device), tok, train_path, test_path, freeze=args.freeze,
                                  pooling=args.pooling, epochs=args.epochs, batch_size=args.batch_size or 32,
                                  lr=args.lr, head_lr=args.head_lr, max_len=args.max_len,
                                  test_fraction=args.test_fraction, seed=args.seed, device=device,
                                  precision=args.precision, log=log)
                rows.append((name, {**r, "weights": weights}))
            columns = [("mode", "mode"), ("n_train", "n_train"), ("n_test", "n_test"), ("accuracy", "accuracy"),
                       ("macro_f1", "macro_f1"), ("majority", "majority"), ("seconds", "seconds")]
        else:
            rows = []
            for name, backbone, weights in _backbones(args, None):
                log(f"eval vision: {name} ({weights} weights)")
                r = evaluate_vision(backbone.to(device), args.data, args.test_data, probe=args.probe, k=args.k,
                                    temperature=args.temperature, l2=args.l2, train_limit=args.train_limit,
                                    test_limit=args.test_limit, test_fraction=args.test_fraction,
                                    batch_size=args.batch_size or 256, pooling=args.pooling, seed=args.seed,
                                    device=device, precision=args.precision, log=log)
                rows.append((name, {**r, "weights": weights}))
            columns = [("weights", "weights"), ("n_train", "n_train"), ("n_test", "n_test")]
            columns += [(f"{p} acc", f"{p}.accuracy") for p in ("linear", "knn") if args.probe in (p, "both")]
            columns += [("seconds", "seconds")]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"fastpt eval: error: {exc}", file=sys.stderr)
        return 1
    print(_table(rows, columns))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, json.dumps({"kind": args.kind, "results": {n: r for n, r in rows}}, indent=2)
                              + "\n")
        except OSError as exc:
            print(f"fastpt eval: error: --out {out}: {exc}", file=sys.stderr)
            return 1
        print(f"fastpt eval: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
