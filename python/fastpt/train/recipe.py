"""The pre-training recipe behind ``fastpt pretrain``: setup, train, save, cleanup, top to bottom.

    recipe = PretrainRecipe(load_recipe("bert-mini.yaml"), resume=False)
    recipe.setup()      # process group, run directory, data, model, optimizer, resume state
    recipe.train()      # the loop below; checkpoints every output.save_every steps
    summary = recipe.finish()   # final checkpoint, plot, summary.json, summary line
    recipe.cleanup()

One optimizer step::

    lr = lr_at(step)                                   # warmup + cosine / linear, a function of step
    for micro in range(grad_accum):
        batch = model.prepare(next(data), seed=step_seed(seed, step, micro, rank))   # masks, views
        with no_sync unless last micro, autocast(bf16 / fp16):
            loss = model(**batch).loss / grad_accum       # or x its share of the step's targets (below)
        scaler.scale(loss).backward()
    clip_grad_norm_(params, clip_grad); optimizer.step(); model.on_step_end(step)

Objectives whose loss is a mean over a varying number of targets (MLM's masked tokens, CLM's and T5's
target tokens: ``Objective.loss_weight``) prepare the step's micro-batches first and weigh each one's
loss by its share of the targets of the whole step on every rank (one all-reduce of a count), so that
``grad_accum`` and several ranks give the gradient and the loss of one batch holding them all (the
token mean, not the mean of per-micro-batch means); the others scale by ``1 / grad_accum``.

Everything random is a function of the recipe's seed, the step and the checkpointed RNG
states, so ``--resume`` after a kill continues bit for bit on the CPU. The logged loss and the
objective's metrics are the same weighted means over the window's micro-steps and ranks.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import BUILDERS
from ..objectives import DINO, MLM, NSP, OBJECTIVES, SOP, CausalLM, MoCoV3, SelfDistillation
from . import checkpoint as ckpt
from . import distributed
from .config import ConfigError, load_recipe, to_yaml
from .data import ImageStream, Prefetcher, TextStream, to_model
from .logging import MetricsWriteError, RunLogger, now
from .mfu import mfu as compute_mfu
from .mfu import peak_flops
from ..bench import peaks as _peaks
from .schedule import lr_at

from .. import _cpu_malloc
from .._yaml import load as load_yaml
from .._lock import lock_dir, unlock_dir
from ..assemble import _assemble as assemble_model
from ..assemble import _head_options as head_options
from ..assemble import build, from_hf, load_config
from ..data.shards import TOKENIZER_FILE, nearest_existing, read_json_object
from ..models.embeddings import TextEmbedding
from ..ops._rng import generator_seed
from ..models.model import PretrainModel, config_format, restoring
from ..models.vision import vit

# Objectives that read packed documents (one (1, T) row with cu_seqlens); the others get rows.
PACKED_OBJECTIVES = (MLM, CausalLM, SelfDistillation)
# objectives that write their own [CLS] / [SEP] around pairs cut from one document (per packed row: its longest
# document piece, found from cu_seqlens): the documents come without separators
PAIR_OBJECTIVES = (NSP, SOP)
# the signals that end a run with a checkpoint; under torchrun the ranks sum one count per signal each step
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The ``prepare`` seed of one micro-batch: a hash of (seed, step, micro-step, rank), < 2**63."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    folded = generator_seed(seed)  # torch's and numpy's generators keep 32 bits: every bit of seed counts
    np.random.seed(folded)
    torch.manual_seed(folded)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 autocast where the device multiplies bf16 natively (a GPU with bf16 tensor
    cores; a CPU with AVX512_BF16 or AMX: 2.1x the fp32 tokens/s of a bert-mini MLM step on a
    2-core Zen 5), else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if _peaks.native_bf16(device) else "fp32"


def legacy_auto_precision(device: torch.device) -> str:
    """What "auto" resolved to before 2026-11-26 11:00 (commit 1fa82fd: bf16 on CPUs with native bf16
    products): bf16 on a CUDA device ``torch.cuda.is_bf16_supported()`` accepts, fp32 on every other
    device (CPUs included, whatever their bf16 support). Named in the note of a resumed checkpoint that
    does not record its precision (``PretrainRecipe._run_precision``)."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def model_name(cfg: dict) -> str:
    m = cfg["model"]
    if isinstance(m, dict):
        return str(m.get("name") or "model")
    if m is not None:
        return Path(str(m)).stem
    return Path(cfg["init_from"]).name


def is_model_dir(path: Path) -> bool:
    return (path / "fastpt_config.json").is_file()


class PretrainRecipe:
    """One pre-training run. ``cfg`` is a validated recipe (``load_recipe``)."""

    def __init__(self, cfg: dict, *, resume: bool = False, log=print):
        self.cfg, self.resume, self._print = cfg, resume, log
        self.step = self.tokens = 0
        self.elapsed_before = 0.0  # training seconds of the runs this one resumes
        self.last_saved = -1

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._print(msg)

    # ================================================================== setup
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg["train"]
        self.dist = distributed.init(t["device"])
        self.device = self.dist.device
        if self.device.type == "cpu":  # freed blocks kept for the next step: no page faults on them
            was = _cpu_malloc.is_tuned()
            why = _cpu_malloc.tune()
            self._restore_malloc = not was and why is None  # only what this run changed is undone
            self.log(f"pretrain: cpu: {_cpu_malloc.describe()}"
                     + (f" ({why})" if why else f"; {_cpu_malloc.ENV}=default leaves it as it comes"))
            if t["compile"]:
                self.log("pretrain: note: train.compile on a CPU measured 1.02-1.16x slower than eager for "
                         "fastpt's BERT and GPT-2 steps (2 Zen 5 cores, benches/results/e2e-cpu-compile.md); "
                         "it is meant for GPUs")
        self.out = Path(cfg["output"]["dir"] or Path("runs") / model_name(cfg))
        self.ckpt_dir = self.out / "checkpoints"
        resume_from = self._setup_run_dir()
        self.precision = self._run_precision(resume_from)
        if self.device.type == "cuda" and self.precision == "fp32":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls, as every GPU recipe does
        seed_everything(t["seed"])

        self.data = self._setup_data()
        self.model = self._setup_model(resume_from)
        self._pairs_without_separators()
        seed_everything(step_seed(t["seed"], 0, 0, self.dist.rank))  # per-rank dropout streams
        self.wrapped = distributed.wrap(self.model, self.dist, fsdp=t["fsdp"],
                                        find_unused_parameters=t["find_unused_parameters"])
        self.params = self.model.trainable_parameters()
        self.optimizer = self._setup_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.autocast = torch.autocast(self.device.type, dtype=DTYPES[self.precision],
                                       enabled=self.precision in ("bf16", "fp16"))
        if resume_from is not None:
            self._load_training_state(resume_from)
            if self.dist.is_main:  # after the checks of the resume (world size, data): a refused one changes nothing
                self._save_config()

        self.total_steps = self._total_steps()
        seq = self.data.seq_len if isinstance(self.data, TextStream) else getattr(self.model.backbone, "num_patches", 0)
        self.flops_per_token = float(self.model.flops_per_token(seq))
        self.peak, self.peak_desc = peak_flops(self.device, self.precision, peak_tflops=t["peak_tflops"])
        self.logger = RunLogger(self.out, enabled=self.dist.is_main, start_step=self.step,
                                total_steps=t["max_steps"], tensorboard=cfg["output"]["tensorboard"],
                                plot=cfg["output"]["plot"], progress=cfg["output"]["progress"], log=self._print)
        if self.logger.tb_missing:
            self.log("pretrain: TensorBoard logs skipped (pip install tensorboard)")
        n_params = sum(p.numel() for p in self.params)
        unit = "tokens" if isinstance(self.data, TextStream) else "patches"
        self.log(f"pretrain: {model_name(cfg)} ({n_params / 1e6:.2f}M trainable parameters) on "
                 f"{self.dist.world_size} x {self.device.type} ({self.peak_desc}), {self.precision}; "
                 f"batch {t['batch_size']} x {t['grad_accum']} accum x {self.dist.world_size} ranks; "
                 f"{self.flops_per_token / 1e6:.1f} MFLOP per {unit[:-1]}; output {self.out}")

    def _setup_run_dir(self) -> Path | None:
        """Create the run directory and pick the checkpoint to resume (rank 0 decides, the others follow)."""
        choice, error = None, None
        if self.dist.is_main:
            try:
                choice = self._pick_checkpoint()
            except (ConfigError, ckpt.CorruptCheckpointError) as exc:
                error = exc
        choice, error = distributed.broadcast_object((choice, error), self.dist)
        if error is not None:
            raise error
        return Path(choice) if choice else None

    def _pick_checkpoint(self) -> str | None:
        self._check_output_dir()
        try:  # one run per output.dir (a requeued job beside the first one wrote the same checkpoints)
            self._lock = lock_dir(self.out, LOCK_FILE, "fastpt pretrain")
        except ValueError as exc:
            raise ConfigError(f"output.dir: {exc}") from exc
        except OSError as exc:  # the lock file cannot be created: a read-only filesystem, no write permission
            raise ConfigError(f"output.dir: {self.out} is not writable ({exc.strerror or exc}: cannot create "
                              f"{self.out / LOCK_FILE}); choose another output.dir") from exc
        ckpt.clean_partial(self.ckpt_dir)
        if ckpt.find_checkpoints(self.ckpt_dir) and not self.resume:
            raise ConfigError(f"output.dir: {self.out} already holds checkpoints; pass --resume to continue "
                              "that run or choose another output.dir")
        found = None
        if self.resume:
            found = ckpt.latest_checkpoint(self.ckpt_dir, warn=lambda m: self._print(f"pretrain: warning: {m}"))
            if found is None:
                self._print(f"pretrain: --resume: no checkpoint in {self.ckpt_dir}, starting from step 0")
        if found is None:  # a resumed run's config.yaml is rewritten once its checkpoint has loaded
            self._save_config()
        return str(found) if found else None

    def _save_config(self) -> None:
        try:
            self._write_config()
        except OSError as exc:
            raise ConfigError(f"output.dir: cannot write {self.out / 'config.yaml'}: {exc}") from exc

    def _check_output_dir(self) -> None:
        """Create output.dir and make sure its checkpoints/ can be created: a file in the way would
        otherwise fail only at the first save, after the training it was to keep."""
        p = nearest_existing(self.out)
        if p is not None and not p.is_dir():
            what = "is" if p == self.out else f"is under {p}, which is"
            raise ConfigError(f"output.dir: {self.out} {what} not a directory (a file or a broken link); choose "
                              "another output.dir")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output.dir: cannot create {self.out}: {exc}") from exc
        if (self.ckpt_dir.exists() or self.ckpt_dir.is_symlink()) and not self.ckpt_dir.is_dir():
            raise ConfigError(f"output.dir: {self.ckpt_dir} is not a directory (a file or a broken link); "
                              "checkpoints could not be saved there (remove it or choose another output.dir)")

    def _write_config(self) -> None:
        path = self.out / "config.yaml"
        text = to_yaml(self.cfg)
        if path.is_file() and self.resume and path.read_text() != text:
            try:
                changed = _changed_keys(load_yaml(path.read_text()), self.cfg)
            except Exception:  # noqa: BLE001 - an unreadable old config.yaml: the note without the keys
                changed = []
            self._print(f"pretrain: note: the recipe differs from {path} (the resumed run's)"
                        + (f" in {', '.join(changed[:12])}{' ...' if len(changed) > 12 else ''}" if changed else "")
                        + "; writing the new one")
        tmp = path.with_name("config.yaml.tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def _setup_data(self, *, add_special: str | None = None, verify: bool | None = None):
        """The batch stream; the data readers' errors (a path that is not a shard directory, a
        seq_len longer than the corpus, separators the tokenizer lacks, ...) become ConfigErrors
        naming the recipe key, with the reader's own message."""
        d, t, r = self.cfg["data"], self.cfg["train"], self.dist
        if d["path"] is not None:
            path = Path(d["path"])
            if not path.exists():
                raise ConfigError(f"data.path: {path} does not exist (expected a `fastpt preprocess` shard directory)")
            if not path.is_dir():
                raise ConfigError(f"data.path: {path} is a file, not a `fastpt preprocess` shard directory")
            try:
                return TextStream(d["path"], d["seq_len"], mode=d["mode"], seed=t["seed"], rank=r.rank,
                                  world_size=r.world_size, shuffle=d["shuffle"],
                                  add_special=d["add_special"] if add_special is None else add_special,
                                  verify=d["verify"] if verify is None else verify)
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(f"{_data_key(exc)}: {exc}") from exc
        try:
            return ImageStream(d["images"], image_size=d["image_size"], seed=t["seed"], rank=r.rank,
                               world_size=r.world_size, shuffle=d["shuffle"])
        except (OSError, ValueError, TypeError) as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith("data.images") else f"data.images: {msg}") from exc

    def _pairs_without_separators(self) -> None:
        """NSP / SOP write [CLS] A [SEP] B [SEP] themselves: their documents come without the separators that
        ``data.add_special: auto`` would wrap them in (the pairs held nested [CLS] / [SEP] tokens, which also
        gave away the order SOP predicts); one set explicitly is refused."""
        d = self.cfg["data"]
        if not (isinstance(self.data, TextStream) and isinstance(self.model.objective, PAIR_OBJECTIVES)):
            return
        if not (self.data.dataset.prefix or self.data.dataset.suffix):
            return
        name = type(self.model.objective).__name__.lower()
        if d["add_special"] != "auto":
            raise ConfigError(f"data.add_special: the {name} objective writes its own [CLS] / [SEP] around each "
                              f"pair; use auto or none (got {d['add_special']!r})")
        self.data = self._setup_data(add_special="none", verify=False)  # checked when first opened

    def _model_config(self) -> dict:
        """The build config, with a momentum objective's ``total_steps`` defaulting to the run's length."""
        mcfg = model_config(self.cfg["model"])
        obj = mcfg.get("objective") or {}
        if obj.get("name") in ("moco_v3", "dino") and obj.get("total_steps") is None:
            steps = self._total_steps(per_row=self._patches_per_image(mcfg))  # max_steps, or from max_tokens
            if steps:
                mcfg["objective"] = {**obj, "total_steps": steps}
        return mcfg

    def _momentum_horizon(self, model: nn.Module) -> None:
        """A loaded (resumed, init_from) momentum objective's ``total_steps`` is this run's length, as for a fresh
        build (``_model_config``), unless the recipe's model pins it: the checkpoint's was the run that saved it,
        and past it the momentum is final (1: the teacher of a longer or continued run froze for good). The
        same length leaves the model as it was (a resumed run continues bit for bit)."""
        obj = getattr(model, "objective", None)
        mine = (model_config(self.cfg["model"]).get("objective") or {}) if self.cfg["model"] is not None else {}
        if not isinstance(obj, (MoCoV3, DINO)) or mine.get("total_steps") is not None:
            return
        mcfg = model.config if (model.config or {}).get("backbone") else None
        per_row = self._patches_per_image(mcfg) if mcfg else getattr(model.backbone, "num_patches", None)
        steps = self._total_steps(per_row=per_row)
        if steps and steps != obj.total_steps:
            self.log(f"pretrain: objective.total_steps (the momentum schedule's length) {obj.total_steps} -> {steps}, "
                     f"this run's")
            obj.total_steps = steps
            model.config = {**model.config, "objective": {**(model.config.get("objective") or {}),
                                                          "total_steps": steps}}

    def _patches_per_image(self, mcfg: dict) -> int | None:
        """Patches per image of the ViT ``mcfg`` builds, on this run's images (None for text)."""
        if isinstance(self.data, TextStream):
            return None
        patch = mcfg["backbone"].get("patch_size", inspect.signature(vit).parameters["patch_size"].default)
        ph, pw = patch if isinstance(patch, (list, tuple)) else (patch, patch)
        _, h, w = self.data.image_shape
        return (h // ph) * (w // pw)

    def _setup_model(self, resume_from: Path | None) -> nn.Module:
        """Build from the recipe, start from ``init_from``, or load the checkpoint being resumed."""
        cfg, text = self.cfg, isinstance(self.data, TextStream)
        if resume_from is not None:
            model = PretrainModel.from_pretrained(resume_from)
            if cfg["model"] is not None and cfg["init_from"] is None:
                differ = self._recipe_model_differs(model, ("backbone", "objective"), resuming=True)
                if differ:
                    raise ConfigError(f"model: the recipe's model differs from the one {resume_from} holds "
                                      f"({'; '.join(differ)}; recipe vs checkpoint): --resume continues the "
                                      f"checkpoint's model; restore the recipe's model:, or start a new run "
                                      f"(another output.dir) with init_from: {resume_from}")
        elif cfg["init_from"] is not None:
            model = self._init_from(Path(cfg["init_from"]))
        else:
            mcfg = self._model_config()
            if text == (mcfg["backbone"]["builder"] == "vit"):
                raise ConfigError(f"model: a {mcfg['backbone']['builder']} backbone does not train on "
                                  f"{'text shards (data.path)' if text else 'images (data.images)'}")
            kwargs = self._data_build_kwargs()
            given = (mcfg["backbone"].get("text") or mcfg["backbone"]).get("vocab_size") if text else None
            if given is not None and given != self.data.vocab_size:
                self.log(f"pretrain: model.backbone.vocab_size {given} -> {self.data.vocab_size}, the shards' "
                         "tokenizer's (the model is built for the data's vocabulary)")
            try:
                model = build(mcfg, **kwargs)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"model: {exc}") from exc
        self._check_model_data(model)
        if resume_from is not None or cfg["init_from"] is not None:
            self._momentum_horizon(model)
        if cfg["train"]["activation_checkpointing"]:
            for m in model.modules():
                if hasattr(m, "gradient_checkpointing"):
                    m.gradient_checkpointing = True
        model.to(self.device)
        mode = cfg["train"]["compile"]
        if mode:  # in place: state_dict keys unchanged
            model.backbone.compile(**({} if mode is True else {"mode": mode}))
        return model

    def _data_build_kwargs(self) -> dict:
        """``build``'s arguments from the data: a text model is built for the shards' vocabulary and ids."""
        if isinstance(self.data, TextStream):
            return dict(vocab_size=self.data.vocab_size, special_ids=self.data.special_ids)
        return {}

    def _recipe_build_config(self) -> dict:
        """The resolved build config of the model the recipe builds on this data, from a build on the meta device
        (no weights, nor a self_distill teacher_path, read); a fresh copy each call, built once."""
        if getattr(self, "_recipe_config", None) is None:
            try:
                with torch.device("meta"), restoring():
                    self._recipe_config = build(self._model_config(), **self._data_build_kwargs()).config
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"model: {exc}") from exc
        return copy.deepcopy(self._recipe_config)

    def _recipe_model_differs(self, model: nn.Module, sections: tuple[str, ...], ignore: tuple[str, ...] = (),
                              resuming: bool = False) -> list[str]:
        """The ``sections`` keys ("backbone.hidden_size 64 vs 32", "objective.name ...") where the model the
        recipe builds on this data (on the meta device: no weights) differs from ``model``'s build config.
        Keys only one side has (an older fastpt's config) and the run-length ``total_steps`` / the
        ``gradient_checkpointing`` switch (the recipe sets them on the loaded model) are not compared."""
        mine, theirs, out = self._recipe_build_config(), model.config or {}, []
        for section in sections:
            a, b = mine.get(section), theirs.get(section)
            if (a is None) != (b is None):
                out.append(f"{section} {'none' if a is None else a.get('name', a.get('builder'))} vs "
                           f"{'none' if b is None else b.get('name', b.get('builder'))}")
                continue
            # options only an older checkpoint implies (MoCo v3's predictor bias) count where the recipe sets them
            legacy = (set(getattr(OBJECTIVES.get((a or {}).get("name")), "legacy_options", ())) - set(a or {})
                      if resuming else set())  # a new run (init_from) takes the current layout
            a, b = _with_defaults(section, a), _with_defaults(section, b)  # a config holds the keys it was given
            for key in sorted(set(a or {}) & set(b or {}) - {"total_steps", "gradient_checkpointing", *ignore}
                              - (legacy if section == "objective" else set())):
                if json.dumps(a[key], sort_keys=True) != json.dumps(b[key], sort_keys=True):
                    out.append(f"{section}.{key} {a[key]!r} vs {b[key]!r}")
        return out

    def _with_recipe_objective(self, model: nn.Module, path: Path) -> nn.Module:
        """init_from a fastpt model whose objective is not the recipe's (MLM -> CLM, MLM -> NSP): the recipe's
        objective on the loaded backbone (built as ``from_hf`` builds it: teachers copy the loaded weights),
        with the heads both have (by their Hugging Face names: the MLM head, the pooler) copied over. The
        backbone must be the recipe's (ConfigError naming the keys otherwise), but for its default mask
        (``causal``: MLM -> CLM), which the recipe's sets."""
        # the vocabulary: _check_model_data names the shards' and the model's sizes
        differ = self._recipe_model_differs(model, ("backbone",), ignore=("causal", "vocab_size"))
        if differ:
            raise ConfigError(f"model: the recipe's backbone differs from init_from {path}'s ({'; '.join(differ)}; "
                              "recipe vs init_from): continued pre-training keeps the loaded architecture; make "
                              "the recipe's backbone the checkpoint's (or leave model: out to take all of it)")
        if not self._recipe_model_differs(model, ("objective",)):
            return model
        cfg = self._recipe_build_config()
        if "causal" in cfg["backbone"] and hasattr(model.backbone, "causal"):
            model.backbone.causal = bool(cfg["backbone"]["causal"])
            model.backbone.config = {**model.backbone.config, "causal": model.backbone.causal}
        cfg = {**cfg, "backbone": {**model.config["backbone"], **({"causal": model.backbone.causal}
                                                                 if hasattr(model.backbone, "causal") else {})}}
        old_heads = model.objective.heads() if model.objective is not None else {}
        # the loaded heads' own options (tying, activation, eps) unless the recipe sets them, as from_hf does
        cfg["objective"] = {**head_options(cfg["objective"]["name"], old_heads), **cfg["objective"]}
        was = (model.config.get("objective") or {}).get("name")
        try:
            fresh = assemble_model(cfg, model.backbone)
            if was == cfg["objective"]["name"] and self._load_whole_objective(fresh, model):
                self.log(f"pretrain: init_from {path}: the recipe's {was} options differ from the checkpoint's; "
                         f"its objective state (heads, teachers) is kept under the recipe's options")
                return fresh
            new_heads = fresh.objective.heads() if fresh.objective is not None else {}
            fresh.objective.load_heads({k: v for k, v in old_heads.items() if k in new_heads})
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model: init_from {path}: {exc}") from exc
        self.log(f"pretrain: init_from {path}: its {was} objective is replaced by the recipe's "
                 f"{cfg['objective']['name']}; heads loaded: {sorted(set(old_heads) & set(new_heads)) or 'none'}, "
                 f"new (initialised, or tied to the loaded embedding): "
                 f"{sorted(set(new_heads) - set(old_heads)) or 'none'}"
                 + (f", not used: {sorted(set(old_heads) - set(new_heads))}" if set(old_heads) - set(new_heads)
                    else ""))
        return fresh

    @staticmethod
    def _load_whole_objective(fresh: nn.Module, model: nn.Module) -> bool:
        """The loaded objective's whole state (heads, projectors, teachers) into the same objective built with
        the recipe's options, when its tensors fit (an option such as mask_prob changes none; an older layout's
        tensor is dropped by the objective's ``upgrade_state``, with a warning); False when they do not."""
        old, new = model.objective.heads(), fresh.objective.heads()
        if any(getattr(old[k], "tied", None) != getattr(new[k], "tied", None) for k in set(old) & set(new)):
            return False  # a tied head's matrix is the embedding: load_heads handles what may be copied
        state = model.objective.state_dict()
        try:
            fresh.objective.load_state_dict(state)
        except RuntimeError:  # missing / unexpected / mis-shaped tensors: another architecture of the objective
            return False
        return True

    def _init_from(self, path: Path) -> nn.Module:
        """Continued pre-training: a fastpt model / checkpoint / run directory, a Hugging Face directory, or a
        ``fastpt convert --from-hf`` output (loaded as ``fastpt.from_hf`` loads it). What ``from_hf`` warns
        about (heads dropped, heads newly initialized) goes to the run's log."""
        if not path.exists():
            raise ConfigError(f"init_from: {path} does not exist")
        if not is_model_dir(path) and (path / "checkpoints").is_dir():
            latest = ckpt.latest_checkpoint(path, warn=lambda m: self.log(f"pretrain: warning: {m}"))
            if latest is None:
                raise ConfigError(f"init_from: {path} is a run directory without checkpoints")
            path = latest
        converted = config_format(path) == "fastpt"  # a fastpt convert --from-hf output
        if is_model_dir(path) and not converted:
            if (path / ckpt.MANIFEST).is_file():  # a checkpoint: the same check as --resume's
                try:
                    ckpt.verify_checkpoint(path)
                except ckpt.CorruptCheckpointError as exc:
                    raise ConfigError(f"init_from: {exc}") from exc
            self.log(f"pretrain: init_from fastpt model {path}")
            try:
                model = PretrainModel.from_pretrained(path)
            except (ValueError, TypeError, FileNotFoundError) as exc:
                raise ConfigError(f"init_from: {exc}") from exc
            return model if self.cfg["model"] is None else self._with_recipe_objective(model, path)
        if converted or (path / "config.json").is_file():
            objective, kwargs = "auto", {}
            if self.cfg["model"] is not None:
                obj = dict(model_config(self.cfg["model"]).get("objective") or {})
                objective = obj.pop("name", "auto")
                kwargs = obj
            what = "fastpt convert --from-hf directory" if converted else "Hugging Face checkpoint"
            self.log(f"pretrain: init_from {what} {path} (objective {objective})")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model = from_hf(path, objective=objective, **kwargs)
            except (ValueError, TypeError, FileNotFoundError) as exc:
                raise ConfigError(f"init_from: {exc}") from exc
            for w in caught:
                self.log(f"pretrain: warning: init_from: {w.message}")
            return model
        raise ConfigError(f"init_from: {path} holds neither fastpt_config.json (a fastpt model or checkpoint), "
                          "checkpoints/ (a fastpt run) nor config.json (a Hugging Face model)")

    def _check_special_ids(self, model: nn.Module) -> None:
        """The shards' special token ids must be the model's (continued pre-training, init_from): shards of
        another tokenizer would train with the wrong mask id and mask real separators, silently."""
        mine = dict((model.config or {}).get("special_ids") or {})
        mask = getattr(model.objective, "mask_token_id", None)
        if mask is not None:
            mine["mask"] = mask
        theirs = self.data.special_ids
        differ = {role: (theirs[role], mine[role]) for role in sorted(set(theirs) & set(mine))
                  if int(theirs[role]) != int(mine[role])}
        if differ:
            pairs = ", ".join(f"{role} {a} vs {b}" for role, (a, b) in differ.items())
            raise ConfigError(f"data.path: the shards' special token ids differ from the model's ({pairs}; shards vs "
                              f"model): they were made with another tokenizer; preprocess with the model's "
                              f"(fastpt preprocess ... --tokenizer <its directory>)")

    def _check_sentinels(self, model: nn.Module) -> None:
        """Span corruption / UL2 on shards whose tokenizer has no ``<extra_id_0>``: its default first
        sentinel (vocab_size - 1) would be an ordinary token of the text. Unless the model's config sets
        sentinel_start_id itself. And a tokenizer with fewer sentinels than a row's noise spans (each span
        takes the next one down: ``<extra_id_0>``, ``<extra_id_1>``, ...): the spans past the last would
        be written as the ordinary tokens below it (``_sentinel_room``)."""
        sentinel = getattr(model.objective, "sentinel_start_id", None)
        explicit = ((model.config or {}).get("objective") or {}).get("sentinel_start_id") is not None \
            and "sentinel" not in ((model.config or {}).get("special_ids") or {})
        if sentinel is not None and "sentinel" not in self.data.special_ids and not explicit:
            raise ConfigError(f"data.path: the shards' tokenizer has no T5 sentinel tokens (<extra_id_0> ...), which "
                              f"{type(model.objective).__name__} writes in place of the spans it removes; preprocess "
                              f"with --train-tokenizer ... --sentinels 100 (or a T5 tokenizer), or set "
                              f"model.objective.sentinel_start_id")
        room = None if sentinel is None else self._sentinel_room(model.objective, int(sentinel))
        if room is not None:
            have, need, first, longest, what = room
            names = f"<extra_id_{first}>" + (f" .. <extra_id_{first + have - 1}>" if have > 1 else "")
            raise ConfigError(f"data.path: a row of data.seq_len={self.data.seq_len} tokens gets up to {need} noise "
                              f"spans under {type(model.objective).__name__}{what}, each written as its own sentinel "
                              f"counting down from id {sentinel}, but the shards' tokenizer has {have} sentinels "
                              f"({names}): the ids below them are ordinary tokens of the text; preprocess with "
                              f"--sentinels {need} (or more), or lower data.seq_len to {longest}")

    def _sentinel_room(self, objective, sentinel: int) -> tuple[int, int, int, int, str] | None:
        """``(sentinels, spans, first, longest, denoiser)`` when a row of data.seq_len tokens can get more noise
        spans than the shards' tokenizer has consecutive sentinels from ``sentinel`` down (``<extra_id_first>``,
        ``<extra_id_first+1>``, ...), else None (also when there is no tokenizer file to count them in, or the
        id is no ``<extra_id_k>``: a sentinel_start_id the model config sets). The spans per row are the
        objective's own rule, ``fastpt.ops.span_corrupt.span_counts`` (T5's ``random_spans_noise_mask``), for
        every valid length up to seq_len under each of its span denoisers (UL2: the R and X ones);
        ``longest`` is the longest seq_len whose rows fit the sentinels."""
        import re

        from ..ops.span_corrupt import span_counts

        if self._shards_tokenizer_file() is None:
            return None
        denoisers = getattr(objective, "denoisers", None)
        if denoisers is not None:
            rates = [(float(d.mean_span_len), float(d.noise_density), f" ({d.mode} denoiser, mean span "
                      f"{d.mean_span_len:g}, noise {d.noise_density:g})") for d in denoisers if d.mode != "S"]
        elif hasattr(objective, "mean_span_len") and hasattr(objective, "noise_density"):
            rates = [(float(objective.mean_span_len), float(objective.noise_density), "")]
        else:
            return None
        if not rates:
            return None
        lengths = torch.arange(self.data.seq_len + 1, dtype=torch.int64)
        per_rate = [span_counts(lengths, torch.full(lengths.shape, density, dtype=torch.float64),
                                torch.full(lengths.shape, mean, dtype=torch.float64))[1] for mean, density, _ in rates]
        spans = torch.stack(per_rate).amax(0)  # the most spans a row of each length gets
        need = int(spans.max())
        try:
            tok = self._shards_tokenizer()
        except Exception:  # noqa: BLE001 -- tokenizers raises a bare Exception; the manifest check reports the file
            return None
        match = re.fullmatch(r"<extra_id_(\d+)>", tok.id_to_token(sentinel) or "")
        if match is None:
            return None
        first = int(match.group(1))
        have = 1
        while have < need and sentinel - have >= 0 and tok.id_to_token(sentinel - have) == f"<extra_id_{first + have}>":
            have += 1
        if need <= have:
            return None
        worst = rates[int(torch.stack([r.max() for r in per_rate]).argmax())][2]  # the denoiser needing the most
        longest = int((torch.cummax(spans, 0).values <= have).sum()) - 1
        return have, need, first, longest, worst

    def _check_model_data(self, model: nn.Module) -> None:
        text = isinstance(self.data, TextStream)
        if model.objective is None:
            raise ConfigError("model: has no objective (objective: null); pre-training needs one, e.g. "
                              "objective: {name: mlm}")
        keys = {"input_ids", "attention_mask"} if text else {"pixel_values"}
        missing = [k for k in model.objective.needs if k not in keys]
        if missing:
            source = "data.path (text shards)" if text else "data.images"
            raise ConfigError(f"model: objective {type(model.objective).__name__} needs batch keys {missing}, "
                              f"which {source} does not provide")
        bb = model.backbone
        if text:
            if self.data.vocab_size > bb.vocab_size:
                raise ConfigError(f"data.path: the shards use a vocabulary of {self.data.vocab_size} ids, the model "
                                  f"has {bb.vocab_size}; preprocess with the model's tokenizer")
            self._check_special_ids(model)
            self._check_sentinels(model)
            self._check_positions(model)
            self._set_word_starts(model)
            return
        c, h, w = self.data.image_shape
        size = bb.config.get("image_size")
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if (h, w) != size or c != bb.in_channels:
            raise ConfigError(f"data.images: the images are {c}x{h}x{w} (channels x height x width), the model "
                              f"expects {bb.in_channels}x{size[0]}x{size[1]}: set the model's size, e.g. --set "
                              f"model.backbone.image_size={h} --set model.backbone.in_channels={c} --set "
                              f"model.backbone.patch_size=4, or resize with data.image_size")

    def _shards_tokenizer_file(self) -> Path | None:
        """The tokenizer file the text shards' manifest names (it may be missing), or None."""
        dataset = getattr(self.data, "dataset", None)
        entry = (getattr(dataset, "manifest", None) or {}).get("tokenizer") or {}
        return dataset.path / entry["file"] if dataset is not None and entry.get("file") else None

    def _shards_tokenizer(self):
        """The shards' tokenizer (``tokenizers.Tokenizer``), read once for the setup checks that need it;
        raises what ``Tokenizer.from_file`` raises for a missing or bad file."""
        if getattr(self, "_tokenizer", None) is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self._shards_tokenizer_file()))
        return self._tokenizer

    def _set_word_starts(self, model: nn.Module) -> None:
        """Whole-word masking on shards: token ids carry no word boundaries, so each MLM with
        ``whole_word_masking`` gets the shards' tokenizer's word boundaries (``data.tokenizer.word_boundary_tables``:
        WordPiece ``##`` pieces; byte-level / SentencePiece spaces, CJK ideographs, punctuation and newlines, as
        BERT's words). ConfigError when the shards hold no tokenizer file or its words cannot be told apart."""
        wanting = [m for m in model.modules() if isinstance(m, MLM) and m.whole_word_masking]
        if not wanting:
            return
        from ..data.tokenizer import word_boundary_tables

        what = "model.objective.whole_word_masking"
        file = self._shards_tokenizer_file()
        if file is None or not file.is_file():
            raise ConfigError(f"{what}: the shards in {self.data.dataset.path} hold no tokenizer file to find word "
                              f"boundaries in (token ids alone do not say where words begin); preprocess with a "
                              f"tokenizer, or set it to false")
        try:
            starts, ends = word_boundary_tables(self._shards_tokenizer())
        except Exception as exc:  # noqa: BLE001 -- tokenizers raises a bare Exception for a bad file
            raise ConfigError(f"{what}: {exc}") from exc
        for m in wanting:
            if starts.shape[0] < m.vocab_size:  # ids past the tokenizer's (a padded embedding): words of their own
                pad = starts.new_ones(m.vocab_size - starts.shape[0])
                starts, ends = torch.cat([starts, pad]), torch.cat([ends, pad])
            m.set_word_starts(starts, ends)

    def _check_positions(self, model: nn.Module) -> None:
        """data.seq_len must fit a learned position table: a doc-mode row is seq_len positions, and a
        packed window restarts positions per document but one document piece can fill the window."""
        seq_len = self.data.seq_len
        for m in model.modules():
            if isinstance(m, TextEmbedding) and m.position == "learned":
                if seq_len + m.position_offset > m.max_positions:
                    offset = f" + position_offset {m.position_offset}" if m.position_offset else ""
                    raise ConfigError(f"data.seq_len: {seq_len}{offset} exceeds the model's max_positions="
                                      f"{m.max_positions} (its learned position table); lower data.seq_len to "
                                      f"{m.max_positions - m.position_offset} or less")

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on matrices only (not biases, norms); torch's fused kernel on CUDA and
        on the CPU (there 2.6 ms a step against 10.7 for the foreach path, bert-mini's 5.4M
        parameters on 2 Zen 5 cores)."""
        t = self.cfg["train"]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
        # FSDP2's DTensor parameters take the foreach path
        fused = self.device.type in ("cuda", "cpu") and not t["fsdp"]
        fast = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["betas"]), eps=t["eps"], **fast)

    def _run_precision(self, resume_from: Path | None) -> str:
        """train.precision resolved for this run. A resumed run keeps the precision its checkpoint
        trained in when the recipe says "auto" ("auto" depends on the device and on fastpt's version:
        a run begun in fp32 must not go on in bf16 because its resume landed on a bf16 CPU or a newer
        fastpt); a precision the recipe names wins, with a note when it differs. A checkpoint without
        the recorded precision (an older fastpt) trained in its recipe's precision; under "auto" it
        continues in today's choice with a note (``legacy_auto_precision``: what auto meant before
        2026-11-26 11:00, which the checkpoint cannot rule out). Raises ConfigError naming trainer_state.json for a recorded
        precision other than fp32 / bf16 / fp16."""
        asked = self.cfg["train"]["precision"]
        now = resolve_precision(asked, self.device)
        if resume_from is None:
            return now
        spath = resume_from / ckpt.STATE
        state = read_json_object(spath, ConfigError)
        saved = state.get("precision")
        if saved is None:  # written before fastpt recorded it
            saved = ((state.get("recipe") or {}).get("train") or {}).get("precision", asked)
            if saved == "auto":
                # auto meant fp32 on every CPU until 2026-11-26 11:00 (legacy_auto_precision) and what it means
                # now since: the checkpoint cannot tell which; most were written since, so today's choice, said
                if asked == "auto":
                    self.log(f"pretrain: note: --resume: {resume_from.name} does not record the precision it "
                             f"trained in (precision auto); continuing in {now}, what auto chooses here (a run "
                             f"from before 2026-11-26 11:00 trained in {legacy_auto_precision(self.device)} on "
                             f"this device: set train.precision to choose)")
                saved = now
        if saved not in DTYPES:
            raise ConfigError(f"--resume: {spath}: precision {saved!r} is not one of {sorted(DTYPES)} "
                              "(damaged or edited checkpoint)")
        if asked == "auto":
            self.log(f"pretrain: --resume: precision auto keeps {saved}, what {resume_from.name} trained in"
                     + (f" (auto would choose {now} for a new run here)" if now != saved else ""))
            return saved
        if asked != saved:
            self.log(f"pretrain: note: --resume: {resume_from.name} trained in {saved}; continuing in {asked} "
                     "as train.precision asks (the loss curve may shift at the switch)")
        return asked

    def _load_training_state(self, path: Path) -> None:
        # FSDP: the optimizer state is saved unsharded; loaded onto the GPU it would be whole on every rank (a
        # model that needs FSDP for its Adam state ran out of memory on --resume): the CPU, then each rank's shard
        where = "cpu" if self.cfg["train"]["fsdp"] else self.device
        saved = ckpt.load_checkpoint(path, map_location=where, verify=False)  # verified when chosen
        state = saved["state"]
        if state.get("world_size") != self.dist.world_size:
            raise ConfigError(f"--resume: {path} was saved by {state.get('world_size')} processes, this run has "
                              f"{self.dist.world_size}; exact resumption needs the same number")
        if saved["optimizer"] is not None:
            fmt = "fsdp_full" if self.cfg["train"]["fsdp"] else "torch"
            if state.get("optimizer_format", "torch") != fmt:
                raise ConfigError(f"--resume: {path} holds the optimizer state of a run with train.fsdp="
                                  f"{not self.cfg['train']['fsdp']}; resume with the same train.fsdp")
            if self.cfg["train"]["fsdp"]:
                distributed.load_full_optimizer_state(self.wrapped, self.optimizer, saved["optimizer"])
            else:
                try:
                    self.optimizer.load_state_dict(saved["optimizer"])
                except ValueError as exc:
                    raise ConfigError(f"--resume: the optimizer state in {path} does not fit the model's parameters "
                                      f"({exc}); a checkpoint of an older fastpt's layout continues as a new run "
                                      f"with init_from: {path} (and another output.dir)") from exc
            self._apply_recipe_hyperparameters(path, int(state["step"]))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        try:
            self.data.load_state_dict(state["data"])
        except ValueError as exc:
            raise ConfigError(f"--resume: the data changed since {path}: {exc}") from exc
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.resumed_window = (state.get("log_window") or {}).get(str(self.dist.rank))
        self.resumed_first_loss, self.resumed_final_loss = state.get("first_loss"), state.get("final_loss")
        self.last_saved = self.step
        prefix = f"rank{self.dist.rank}."
        ckpt.set_rng_state({k[len(prefix):]: v for k, v in saved["rng"].items() if k.startswith(prefix)},
                           state["rng"][str(self.dist.rank)])
        self.log(f"pretrain: resumed from {path} (step {self.step}, {self.tokens:,} tokens)")

    def _apply_recipe_hyperparameters(self, path: Path, step: int) -> None:
        """torch's optimizer ``load_state_dict`` restores the saved param groups' weight_decay, betas and eps:
        the recipe's (what config.yaml records for this run) are set again, as lr is each step, and a change
        is logged (it takes effect from the resumed step on; Adam's moments carry on)."""
        t = self.cfg["train"]
        want = [{"weight_decay": t["weight_decay"]}, {"weight_decay": 0.0}]
        changed = set()
        for group, wd in zip(self.optimizer.param_groups, want, strict=True):
            for key, value in (("weight_decay", wd["weight_decay"]), ("betas", tuple(t["betas"])), ("eps", t["eps"])):
                old = tuple(group[key]) if key == "betas" else group[key]
                if old != value:
                    changed.add(key)
                    group[key] = value
        if changed:
            self.log(f"pretrain: note: --resume: train.{', train.'.join(sorted(changed))} differ from what "
                     f"{path.name} trained with; the recipe's apply from step {step} on")

    def _total_steps(self, per_row: float | None = None) -> int | None:
        """The schedule's length: the first limit the run reaches of max_steps and max_tokens over the
        tokens of one step: rows of ``per_row`` tokens (default: the data's mean sample, which for
        ``data.mode: doc`` counts each document's own tokens as the run does, not seq_len; patches per
        image for images). With both set, the schedule decays by the one that stops the run."""
        t = self.cfg["train"]
        steps = []
        if t["max_steps"] is not None:
            steps.append(t["max_steps"])
        if t["max_tokens"] is not None:
            if per_row is None:
                per_row = (self.data.dataset.mean_sample_tokens() if isinstance(self.data, TextStream)
                           else self.model.backbone.num_patches)
            per_step = t["batch_size"] * t["grad_accum"] * self.dist.world_size * per_row
            steps.append(math.ceil(t["max_tokens"] / per_step))
        return min(steps) if steps else None

    # ================================================================== train
    def to_device(self, raw: dict) -> dict:
        """Move a collated CPU batch to the device; packed text becomes one (1, B*S) row for objectives
        that read packed documents, plain rows (cu_seqlens dropped) for the others; uint8 images become the
        model's floats there (``data.to_model``: a quarter of the bytes moved)."""
        return to_model(self._move(self._model_batch(raw)))

    def prepared(self, raw: dict, seed: int) -> dict:
        """The objective's prepared batch of a collated CPU batch, on the device: prepared on the host and then
        moved where the objective says its ``prepare`` is cheaper there (``prepare_on_host``: the text
        objectives; on a GPU they would read ids, lengths or boundaries back every micro-batch), else moved and
        prepared on the device (the vision objectives' augmentations). The same batch either way (``prepare``
        is a pure function of the batch and the seed)."""
        if getattr(self.model.objective, "prepare_on_host", False):
            return self._move(self.model.prepare(to_model(self._model_batch(raw)), seed=seed))
        return self.model.prepare(self.to_device(raw), seed=seed)

    def _model_batch(self, raw: dict) -> dict:
        """The keys of a collated batch the objective reads, laid out for it (see ``to_device``)."""
        batch = dict(raw)
        if "cu_seqlens" in batch:
            if isinstance(self.model.objective, PACKED_OBJECTIVES):
                # positions come from cu_seqlens inside the model: its embedding adds its position_offset
                # (RoBERTa's 2) to the collator's document positions, which start at 0
                batch["input_ids"] = batch["input_ids"].reshape(1, -1)
                batch.pop("position_ids", None)
            elif isinstance(self.model.objective, PAIR_OBJECTIVES):
                batch = {"input_ids": batch["input_ids"], "cu_seqlens": batch["cu_seqlens"]}
            else:
                batch = {"input_ids": batch["input_ids"]}
        return batch

    def _move(self, batch: dict) -> dict:
        """The batch's tensors on the device. To a GPU from pinned memory (the prefetcher pins what it collates;
        a batch prepared on the host is pinned here), so the copies queue behind the GPU's work instead of
        waiting for it."""
        pin = self.device.type == "cuda"
        return {k: (v if not pin or v.is_pinned() else v.pin_memory()).to(self.device, non_blocking=True)
                if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def train(self) -> None:
        t, out = self.cfg["train"], self.cfg["output"]
        accum, rank, seed = t["grad_accum"], self.dist.rank, t["seed"]
        depth = self.cfg["data"]["prefetch"]
        if depth is None:  # made ahead on a thread where a GPU runs the step (a CPU's cores run it themselves)
            depth = 2 if self.device.type == "cuda" else 0
        self._batches = batches = (Prefetcher(self.data, t["batch_size"], depth, pin=self.device.type == "cuda")
                                   if depth else self.data.batches(t["batch_size"]))
        self.wrapped.train()
        self.t_start = now()
        self.start_step, self.start_tokens = self.step, self.tokens
        self._install_stop_handlers()
        # of the whole run (a resumed one included): the first and the last logged window
        self.first_loss = getattr(self, "resumed_first_loss", None)
        self.final_loss = getattr(self, "resumed_final_loss", None)
        self.t_first = self.tokens_first = None  # after the first step: steady-state throughput excludes it
        # The open logging window's sums (saved with a checkpoint: a resumed run's next row averages the same
        # micro-batches as an uninterrupted one's when log_every does not divide save_every).
        window = getattr(self, "resumed_window", None) or {"loss": [0.0, 0.0], "metrics": {}}
        loss_sum = torch.tensor(window["loss"], dtype=torch.float32, device=self.device)  # (sum of losses, count)
        metric_sums: dict[str, list] = {k: [torch.tensor(v, dtype=torch.float32, device=self.device), n]
                                        for k, (v, n) in window["metrics"].items()}
        # fp16: the window's steps GradScaler skipped (gradients not finite), counted on the device
        self._skipped = torch.tensor(float(window.get("skipped", 0.0)), device=self.device) if self.scaler else None
        # other precisions: steps whose gradients were not finite (applied: the run stops at the next check)
        self._nonfinite = None if self.scaler else torch.zeros((), device=self.device)
        self.window = (loss_sum, metric_sums)
        t_log, tokens_log = now(), self.tokens
        while not self.done():
            step = self.step
            lr = lr_at(step, lr=t["lr"], warmup_steps=t["warmup_steps"], total_steps=self.total_steps,
                       schedule=t["schedule"], min_lr_ratio=t["min_lr_ratio"])
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            local_tokens, pending, counts, stops = 0, [], [], None
            for micro in range(accum):
                raw = next(batches)
                local_tokens += self.model.tokens_in(raw)
                batch = self.prepared(raw, step_seed(seed, step, micro, rank))
                count = self.model.objective.loss_weight(batch)
                if count is None:  # every micro-batch weighs the same: run it now
                    self._micro_step(batch, micro, 1.0 / accum, None, metric_sums)
                else:
                    pending.append(batch)
                    counts.append(count)
            if pending:  # a mean over targets: weigh each micro-batch by its targets over the whole step's
                counts = torch.stack(counts).to(self.device, torch.float32)
                single = accum == 1 and not self.dist.enabled  # the factor is 1: no arithmetic for it
                if self.dist.enabled:  # the ranks' stop requests ride on the count's all-reduce
                    summed = distributed.all_reduce(torch.cat([counts.sum().reshape(1),
                                                               self._stop_flags_on_device(counts.dtype)]), self.dist)
                    total, stops = summed[0].clamp(min=1.0), summed[1:]
                else:
                    total = None if single else counts.sum().clamp(min=1.0)
                for micro, batch in enumerate(pending):
                    factor = 1.0 if single else counts[micro] * self.dist.world_size / total
                    self._micro_step(batch, micro, factor, counts[micro], metric_sums)
            del pending, counts
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if t["clip_grad"]:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t["clip_grad"])
            else:  # the norm for the log only: clip_grad_norm_ with inf multiplied every gradient by 1
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            if self.scaler:
                # a non-finite norm of the unscaled gradients is GradScaler's found-inf: it skips this update
                self._skipped += ~torch.isfinite(_local(grad_norm).detach().to(self._skipped.device))
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                # bf16 / fp32 apply a non-finite gradient (an overflow, a diverged step): NaN weights from here on.
                # Counted on the device (no read per step); the next logged row and any checkpoint write read
                # the count and stop the run, so no checkpoint ever holds the broken weights.
                self._nonfinite += ~torch.isfinite(_local(grad_norm).detach().to(self._nonfinite.device))
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.on_step_end(step)
            self.step += 1
            tokens, stops = self._global_tokens(local_tokens, stops)
            self.tokens += tokens
            self._agree_stop(stops)
            self.logger.step()
            if self.t_first is None:
                self.t_first, self.tokens_first = now(), self.tokens

            if self.step % out["log_every"] == 0 or self.done():
                t_now = now()
                mean_loss = distributed.all_reduce(loss_sum.clone(), self.dist)
                # one device read for the row: the loss sums, the gradient norm, and fp16's skipped steps (other
                # precisions: the steps with non-finite gradients since the last check)
                flagged = self._skipped if self.scaler else self._nonfinite
                total, count, norm, flagged = torch.cat(
                    [mean_loss, _local(grad_norm).detach().float().reshape(1).to(mean_loss.device),
                     flagged.reshape(1).to(mean_loss.device)]).tolist()
                if not self.scaler and flagged:
                    raise self._nonfinite_error(int(flagged))
                # a window whose micro-batches had no targets at all (MLM on a few tiny documents) logs NaN
                loss_value = total / count if count > 0 else math.nan
                if not math.isfinite(loss_value) and count > 0:
                    raise FloatingPointError(f"pretrain: the loss is {loss_value} at step {self.step}; "
                                             f"{self._divergence_hint()}")
                rate = (self.tokens - tokens_log) / max(t_now - t_log, 1e-9)
                row = {"step": self.step, "tokens": self.tokens, "loss": loss_value, "lr": lr,
                       "grad_norm": norm, "tokens_per_s": rate,
                       "mfu": compute_mfu(self.flops_per_token, rate, self.peak, self.dist.world_size),
                       "elapsed_s": self.elapsed_before + t_now - self.t_start}
                if self.scaler:  # fp16: the loss scale after the last step, and the window's skipped updates
                    row.update(loss_scale=self.scaler.get_scale(), skipped_steps=int(flagged))
                    self._skipped.zero_()
                for k, v in self._mean_metrics(metric_sums).items():
                    row.setdefault(k, v)  # an objective's own "loss" metric is the loss above, averaged the same
                self.logger.log(row)
                self.first_loss = loss_value if self.first_loss is None else self.first_loss
                self.final_loss = loss_value
                loss_sum.zero_()
                metric_sums.clear()
                t_log, tokens_log = now(), self.tokens
            if out["save_every"] and self.step % out["save_every"] == 0:
                self.save()
        self.t_end = now()

    def _micro_step(self, batch: dict, micro: int, factor, count, metric_sums: dict) -> None:
        """Forward and backward of one prepared micro-batch, its loss scaled by ``factor``: ``1 / grad_accum``,
        or (an objective with ``loss_weight``) its ``count`` targets times the world size over the targets of
        the whole step on every rank, so that the ranks' averaged, accumulated gradient is the gradient of
        the token mean over the step's combined batch. The window's sums of the loss and of the objective's
        metrics (loss parts, accuracies over the same targets) are weighted alike."""
        accum = self.cfg["train"]["grad_accum"]
        loss_sum = self.window[0]
        with distributed.sync_gradients(self.wrapped, micro == accum - 1), self.autocast:
            output = self.wrapped(**batch)
            loss = output.loss * factor
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        weight = loss_sum.new_ones(()) if count is None else count  # no targets (loss 0): adds nothing
        loss_sum += torch.stack([output.loss.detach().float() * weight, weight])
        for k, v in (output.metrics or {}).items():
            s = metric_sums.setdefault(k, [0.0, 0.0])
            s[0], s[1] = s[0] + v.detach().float() * weight, s[1] + weight

    def _global_tokens(self, local: int, stops: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None]:
        """This step's tokens over all ranks, and the ranks' summed stop requests: ``stops`` when the step's
        target-count all-reduce carried them, else these when this all-reduce does (it also carries the
        time-limit decision of rank 0), else None."""
        if not self.dist.enabled:
            return local, stops
        t = self.cfg["train"]
        same_everywhere = not (isinstance(self.data, TextStream) and self.data.mode == "doc")  # no padding
        if same_everywhere and t["max_time_s"] is None:
            return local * self.dist.world_size, stops  # no collective (and no device sync) needed
        over = t["max_time_s"] is not None and self.dist.is_main and self._elapsed() >= t["max_time_s"]
        flags = self._stop_flags() if stops is None else []
        box = torch.tensor([local, int(over), *flags], dtype=torch.int64, device=self.device)
        distributed.all_reduce(box, self.dist)
        self._time_up = bool(box[1])
        return int(box[0]), stops if stops is not None else box[2:]

    # ------------------------------------------------------------------ SIGINT / SIGTERM
    def _install_stop_handlers(self) -> None:
        """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) end the run at a step boundary with the
        final checkpoint written, then ``pretrain`` raises ``Interrupted``: ``--resume`` continues from that
        step. A second Ctrl-C interrupts at once (no checkpoint). One process stops after the step in
        progress; several ranks agree every step (``_agree_stop``) and stop at the same step, at most two
        steps after the one in progress: torchrun sends SIGTERM to every worker and SIGKILL 30 s later, so
        an agreement at the next logging step (log_every steps on) lost the final checkpoint of any run whose
        log_every steps took longer than that."""
        self.stop_signal, self._stop_agreed, self._stop_pending, self._old_handlers = None, None, None, {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set there

        def request(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.stop_signal = signum
            self._print(f"pretrain: {signal.Signals(signum).name}: stopping at the "
                        f"{'end of this step' if not self.dist.enabled else 'step the ranks agree on'} with a "
                        f"checkpoint (Ctrl-C again to stop at once, without one)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, request)

    def _restore_stop_handlers(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def _stop_flags(self) -> list[int]:
        """This rank's stop request: one count per ``STOP_SIGNALS`` entry, 1 for the signal it received."""
        return [int(getattr(self, "stop_signal", None) == s) for s in STOP_SIGNALS]

    def _stop_flags_on_device(self, dtype: torch.dtype) -> torch.Tensor:
        """``_stop_flags`` as a tensor on the training device, uploaded without waiting: ``torch.tensor(...,
        device=cuda)`` copies synchronously (the host would wait for the queued step every step); a pinned
        buffer copies asynchronously, and the caching host allocator keeps it until the copy ran."""
        if self.device.type != "cuda":
            return torch.tensor(self._stop_flags(), dtype=dtype, device=self.device)
        return torch.tensor(self._stop_flags(), dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    def _agree_stop(self, stops: torch.Tensor | None) -> None:
        """Every step under torchrun: the ranks' ``_stop_flags`` summed, from the step's target-count or token
        all-reduce (``stops``; no collective of its own), else, where the step makes neither (objectives
        without ``loss_weight`` on packed rows, no max_time_s), from a 2-element all-reduce here.

        The sums are read one step later: on a GPU, reading them now would wait for the whole step's kernels
        (the loop has no device sync per step), so they are copied to the host without waiting and read after
        the next step is queued; the CPU reads them one step later too (one code path: the step a run stops
        at does not depend on the device). Every rank reads the same sums after the same step, so all stop
        together, with the signal any rank got (SIGTERM before SIGINT when both were) as the run's
        ``stopped_by`` and exit status."""
        if not self.dist.enabled:
            return
        if stops is None:
            stops = distributed.all_reduce(self._stop_flags_on_device(torch.int64),
                                           self.dist)
        event = None
        host = stops.to("cpu", non_blocking=True)
        if stops.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        previous, self._stop_pending = getattr(self, "_stop_pending", None), (host, event)
        if previous is None or getattr(self, "_stop_agreed", None) is not None:
            return
        host, event = previous
        if event is not None:
            event.synchronize()  # the step before's copy: done long ago
        asked = [s for s, n in zip(STOP_SIGNALS, host.tolist()) if n > 0]
        self._stop_agreed = max(asked) if asked else None

    def _stopped_by(self) -> int | None:
        """The signal that stops the run: this process's own (one process), or the one every rank agreed on
        (``_agree_stop``): a rank that alone got one stops with the others, all with its exit status."""
        if getattr(self, "dist", None) is not None and self.dist.enabled:
            return getattr(self, "_stop_agreed", None)
        return getattr(self, "stop_signal", None)

    def _stop_now(self) -> bool:
        return self._stopped_by() is not None

    def _elapsed(self) -> float:
        return self.elapsed_before + now() - self.t_start

    def done(self) -> bool:
        t = self.cfg["train"]
        if self._stop_now():
            return True
        if t["max_steps"] is not None and self.step >= t["max_steps"]:
            return True
        if t["max_tokens"] is not None and self.tokens >= t["max_tokens"]:
            return True
        if t["max_time_s"] is not None:
            if self.dist.enabled:  # every rank must stop at the same step: rank 0's clock decides
                return getattr(self, "_time_up", False)
            return self._elapsed() >= t["max_time_s"]
        return False

    # ================================================================== save
    def save(self) -> Path | None:
        """Write checkpoint ``step-N`` (collective under FSDP; rank 0 writes)."""
        if self.last_saved == self.step:
            return self.ckpt_dir / ckpt.checkpoint_name(self.step)
        self._check_finite_before_save()
        if self.cfg["train"]["fsdp"]:
            model_sd, optim_sd = distributed.full_state_dicts(self.wrapped, self.optimizer)
            save_model = lambda d: self._shadow(model_sd).save_pretrained(d)  # noqa: E731
        else:
            optim_sd = self.optimizer.state_dict()
            save_model = self.model.save_pretrained

        def write_model(d: Path) -> None:
            save_model(d)
            tok = self._tokenizer_file()
            if tok is not None:  # the checkpoint is self-contained: eval / convert --to-hf find its tokenizer
                shutil.copyfile(tok, d / tok.name)
        tensors, plain = ckpt.rng_state()
        loss_sum, metric_sums = getattr(self, "window", (None, {}))
        window = {"loss": [float(x) for x in loss_sum.tolist()] if loss_sum is not None else [0.0, 0.0],
                  "metrics": {k: [float(v), float(n)] for k, (v, n) in metric_sums.items()}}
        if getattr(self, "_skipped", None) is not None:
            window["skipped"] = float(self._skipped)
        gathered = distributed.gather_object((tensors, plain, window), self.dist)
        path = None
        if self.dist.is_main:
            rng_tensors = {f"rank{r}.{k}": v for r, (ts, _, _) in enumerate(gathered) for k, v in ts.items()}
            state = {"tokens": self.tokens, "elapsed_s": self._elapsed(), "world_size": self.dist.world_size,
                     "data": self._data_state(), "scaler": self.scaler.state_dict() if self.scaler else None,
                     "rng": {str(r): p for r, (_, p, _) in enumerate(gathered)},
                     "log_window": {str(r): w for r, (_, _, w) in enumerate(gathered)},
                     "first_loss": getattr(self, "first_loss", None),
                     "final_loss": getattr(self, "final_loss", None),
                     "optimizer_format": "fsdp_full" if self.cfg["train"]["fsdp"] else "torch",
                     "precision": self.precision,  # what "auto" resolved to: --resume keeps it
                     "recipe": self.cfg}
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, write_model=write_model, optimizer_state=optim_sd,
                                        trainer_state=state, rng_tensors=rng_tensors,
                                        keep_last=self.cfg["output"]["keep_last"])
        self.last_saved = self.step
        distributed.barrier(self.dist)
        return path

    def _data_state(self) -> dict:
        """The data position after the batches trained on (a prefetcher's, not after the ones it made ahead)."""
        batches = getattr(self, "_batches", None)
        return batches.state_dict() if isinstance(batches, Prefetcher) else self.data.state_dict()

    def _tokenizer_file(self) -> Path | None:
        """The shards' tokenizer.json (text runs), copied into every checkpoint."""
        if not isinstance(self.data, TextStream):
            return None
        path = Path(self.cfg["data"]["path"]) / TOKENIZER_FILE
        return path if path.is_file() else None

    def _divergence_hint(self) -> str:
        """What to change when the training diverged, for this run's precision."""
        hint = "lower train.lr or raise train.warmup_steps"
        return hint + (", or use precision bf16 instead of fp16" if self.precision == "fp16" else "")

    def _nonfinite_error(self, steps: int) -> FloatingPointError:
        last = (f"the last checkpoint is step {self.last_saved}: --resume continues from it" if self.last_saved >= 0
                else "this run had not saved one yet")
        return FloatingPointError(
            f"pretrain: the gradients were not finite (an inf / NaN gradient norm) in {steps} step(s) up to step "
            f"{self.step}, and precision {self.precision} applies such a step: the weights are no longer finite, so "
            f"no checkpoint was written with them ({last}); {self._divergence_hint()}")

    def _check_finite_before_save(self) -> None:
        """FloatingPointError when a step since the last check applied non-finite gradients (one device read)."""
        flagged = getattr(self, "_nonfinite", None)
        if flagged is not None:
            n = int(flagged)
            if n:
                raise self._nonfinite_error(n)

    def _mean_metrics(self, metric_sums: dict) -> dict:
        """The objective's metrics averaged over the window's micro-steps and every rank (rank 0 gets them;
        a gather of plain numbers, so ranks whose metric names differ cannot deadlock a collective)."""
        keys = list(metric_sums)
        flat = (torch.stack([torch.as_tensor(x, dtype=torch.float32, device=self.device).reshape(())
                             for k in keys for x in metric_sums[k]]).tolist() if keys else [])  # one device read
        local = {k: (flat[2 * i], flat[2 * i + 1]) for i, k in enumerate(keys)}
        gathered = distributed.gather_object(local, self.dist) if self.dist.enabled else [local]
        if gathered is None:  # not rank 0: nothing to log
            return {}
        total: dict[str, list] = {}
        for part in gathered:
            for k, (s, n) in part.items():
                acc = total.setdefault(k, [0.0, 0])
                acc[0], acc[1] = acc[0] + s, acc[1] + n
        return {k: s / n for k, (s, n) in sorted(total.items()) if n > 0}

    def _shadow(self, model_sd: dict) -> nn.Module:
        """A CPU copy of the model holding the gathered FSDP weights, for ``save_pretrained``; built under
        a forked RNG: building draws initial weights from the global generator, which would move the
        run's dropout stream, so a run would depend on when it saved (and a resume would not match)."""
        # restoring(): the weights come from model_sd (a self_distill teacher_path is not read again: it may be gone)
        with torch.random.fork_rng(devices=[]), restoring():
            shadow = build(self.model.config)
        shadow.load_state_dict(model_sd)
        return shadow

    def finish(self) -> dict:
        """Final checkpoint, plot, summary.json and the summary line; returns the summary."""
        path = self.save()
        steps = self.step - self.start_step
        t_end = getattr(self, "t_end", now())
        train_time = t_end - self.t_start
        if self.t_first is not None and steps > 1:  # steady state: without the first step (lazy init, compile)
            rate = (self.tokens - self.tokens_first) / max(t_end - self.t_first, 1e-9)
            steps_per_s = (steps - 1) / max(t_end - self.t_first, 1e-9)
        else:
            rate = (self.tokens - self.start_tokens) / max(train_time, 1e-9)
            steps_per_s = steps / max(train_time, 1e-9)
        t = self.cfg["train"]
        global_batch = t["batch_size"] * t["grad_accum"] * self.dist.world_size
        summary = {
            "output_dir": str(self.out), "model": model_name(self.cfg), "steps": self.step, "steps_this_run": steps,
            "tokens": self.tokens, "unit": "tokens" if isinstance(self.data, TextStream) else "patches",
            "train_time_s": train_time, "elapsed_s": self.elapsed_before + train_time, "tokens_per_s": rate,
            "global_batch": global_batch, "samples_per_s": steps_per_s * global_batch,
            "mfu": compute_mfu(self.flops_per_token, rate, self.peak, self.dist.world_size),
            "peak": self.peak_desc, "flops_per_token": self.flops_per_token, "first_loss": self.first_loss,
            "final_loss": self.final_loss, "checkpoint": str(path or self.ckpt_dir / ckpt.checkpoint_name(self.step)),
            "stopped_by": signal.Signals(self._stopped_by()).name if self._stopped_by() else None,
            "device": str(self.device), "world_size": self.dist.world_size, "precision": self.precision,
            "parameters": sum(p.numel() for p in self.params),
            "peak_memory_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda"
            else None,
        }
        self.logger.finish(summary)
        return summary

    # ================================================================== cleanup
    def report_failure(self, exc: BaseException) -> None:
        """Under torchrun: the exception ending this rank, on stderr, tagged with the rank and the step, before
        cleanup and before it propagates. The other ranks then wait in a collective that this one never
        joins, so this may be all of the failure anyone sees; torchrun's summary names the rank, not the
        error. A configuration or checkpoint error (``pretrain_main`` reports it) and a second Ctrl-C get
        their one line, anything else its traceback."""
        d = getattr(self, "dist", None)
        if d is None or not d.enabled:
            return
        quiet = (KeyboardInterrupt, ConfigError, ckpt.CorruptCheckpointError, ckpt.CheckpointWriteError)
        text = (f"{type(exc).__name__}: {exc}" if isinstance(exc, quiet)
                else "".join(traceback.format_exception(exc)).rstrip())
        print(f"fastpt pretrain: rank {d.rank} of {d.world_size} failed at step {getattr(self, 'step', 0)}: "
              f"{text}", file=sys.stderr, flush=True)

    def cleanup(self, *, ok: bool = True) -> None:
        """Undo what setup did: signal handlers, prefetch thread, output lock, progress bar and TensorBoard
        writer, process group, malloc. ``ok=False`` (the run ends on an exception): the process group goes without the final
        barrier, which the other ranks would never reach (``distributed.cleanup``)."""
        self._restore_stop_handlers()
        if isinstance(getattr(self, "_batches", None), Prefetcher):
            self._batches.close()
        unlock_dir(getattr(self, "_lock", None))
        if hasattr(self, "logger"):
            self.logger.close()
        if hasattr(self, "dist"):
            distributed.cleanup(self.dist, ok=ok)
        if getattr(self, "_restore_malloc", False):
            _cpu_malloc.restore()  # the process's malloc as it was before the run


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new), key=str)
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if json.dumps(old, default=str) == json.dumps(new, default=str) else [prefix.rstrip(".")]


LOCK_FILE = ".fastpt-pretrain.lock"  # in output.dir while a run trains there (rank 0 holds it)


def _with_defaults(section: str, cfg: dict | None) -> dict | None:
    """A backbone / objective build config with the builder's / objective's defaults for the keys it lacks."""
    if not cfg:
        return cfg
    fn = (BUILDERS.get(cfg.get("builder")) if section == "backbone"
          else getattr(OBJECTIVES.get(cfg.get("name")), "__init__", None))
    if fn is None:
        return cfg
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**json.loads(json.dumps(defaults, default=str)), **cfg}


def model_config(model) -> dict:
    """``fastpt.assemble.load_config`` with its errors as ConfigError naming ``model``."""
    try:
        return load_config(model)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"model: {exc}") from exc


def _data_key(exc: BaseException) -> str:
    """The recipe key a text data error is about (``ShardDataset``'s messages name its argument)."""
    msg = str(exc)
    if "add_special" in msg:
        return "data.add_special"
    if "seq_len" in msg:
        return "data.seq_len"
    return "data.path"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2) full value, else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ====================================================================== entry points


def pretrain(config: dict | str | os.PathLike, *, resume: bool = False, overrides=(), log=print) -> dict:
    """Run the recipe ``config`` (dict or YAML path; see ``fastpt.train``) and return the summary dict.

    ``overrides``: ``"a.b=v"`` strings as ``--set``; ``resume``: continue from the newest good
    checkpoint in ``output.dir``. Raises ConfigError naming a bad key.
    """
    cfg = load_recipe(config, overrides, resolve_model=model_config)
    recipe = PretrainRecipe(cfg, resume=resume, log=log)
    ok = False
    try:
        recipe.setup()
        recipe.train()
        summary = recipe.finish()
        ok = True
    except BaseException as exc:
        recipe.report_failure(exc)  # before any collective: the other ranks may never come to one
        raise
    finally:
        recipe.cleanup(ok=ok)
    stopped = recipe._stopped_by()  # every rank's: the one they agreed on
    if stopped is not None:  # the final checkpoint is written: tell the caller the run did not end on its own
        raise Interrupted(stopped, summary)
    return summary


class Interrupted(KeyboardInterrupt):
    """``pretrain`` stopped by SIGINT / SIGTERM after writing its final checkpoint (``summary`` says which)."""

    def __init__(self, signum: int, summary: dict):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {summary['steps']}")
        self.signum, self.summary = signum, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpt pretrain", description="Pre-train a model from a recipe YAML "
                                "(see `python -c 'import fastpt.train; help(fastpt.train)'` for the keys). "
                                "Several GPUs or machines: torchrun --nproc_per_node N -m fastpt pretrain ...")
    p.add_argument("--config", required=True, help="recipe YAML (model:, data:, train:, output:)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in output.dir (from step 0 if there is none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr=3e-4 --set output.dir=runs/x (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    return p


def pretrain_main(argv: list[str] | None = None) -> int:
    """``fastpt pretrain --config X.yaml [--resume] [--set k=v ...]``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.print_config:
            print(to_yaml(load_recipe(args.config, args.overrides, resolve_model=model_config)), end="")
            return 0
        pretrain(args.config, resume=args.resume, overrides=args.overrides)
    except Interrupted as exc:
        print(f"fastpt pretrain: {exc}; checkpoint {exc.summary['checkpoint']}: rerun with --resume to continue",
              file=sys.stderr)
        return 128 + exc.signum
    except (ConfigError, ckpt.CorruptCheckpointError, ckpt.CheckpointWriteError, MetricsWriteError) as exc:
        print(f"fastpt pretrain: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # the training diverged: what happened and what to change, no traceback
        print(f"fastpt {exc}", file=sys.stderr)
        return 1
    return 0
