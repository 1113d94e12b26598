"""The assembled model: a backbone and an objective side by side (composition, STYLE.md 8).

``PretrainModel(backbone, objective)`` is what ``fastpt.build(config)`` returns and what the
pre-training recipe trains::

    model = fastpt.build("bert-mini", special_ids=ids)         # backbone + MLM objective
    batch = model.prepare(raw_batch, seed=step)                 # masks / views / crops, on the device
    out = model(**batch)                                        # ModelOutput(loss, logits, last_hidden_state, metrics)
                                                                # (a key nothing reads: TypeError naming it)
    out.loss.backward(); optimizer.step(); model.on_step_end(step)
    model.save_pretrained("ckpt"); model = PretrainModel.from_pretrained("ckpt")

Checkpoint directory (``save_pretrained``):
    ``fastpt_config.json``: ``{"format": "fastpt-pretrain", "format_version": 1, "model": <the
    resolved build config>}``; ``model.safetensors``: the ``state_dict`` (``backbone.*``,
    ``objective.*``) with each tensor stored once: a tied head weight lives under its embedding's
    name, ALBERT's shared layers under ``layers.0``. Teacher / momentum copies (DINO, MoCo v3) and
    their buffers (DINO's center, step counters) are saved like any other state, so a round trip
    is exact. Each file is written to a temporary name and moved into place (``os.replace``), with the mode a
    new file gets under the umask (``hf.save_safetensors``: safetensors alone writes 0600).
    ``from_pretrained`` rebuilds the model from the config (through the builder ``fastpt.assemble``
    registers as ``PretrainModel.builder``: models/ does not import assemble) and loads every tensor;
    while it builds, ``restoring_checkpoint()`` is True, so nothing is read from outside the checkpoint
    (self_distill's ``teacher_path``: the teacher comes from the saved ``objective.teacher.*``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data.shards import named_os_error
from .hf import _load_into, _load_safetensors, _safetensors, save_safetensors
from .outputs import ModelOutput

FORMAT = "fastpt-pretrain"
FORMAT_VERSION = 1
CONFIG_FILE = "fastpt_config.json"
WEIGHTS_FILE = "model.safetensors"
# Annotations of a raw text batch (collators, tokenizers) that a model without objective takes and encodes
# nothing of (objectives.base.TEXT_NOTES; models/ does not import objectives/).
_NOTES = ("special_tokens_mask", "word_ids", "max_seqlen")
# backbone arguments that change what it computes: refused where an objective runs the backbone (they were ignored)
_MODE_SWITCHES = ("causal", "output_hidden_states")
# Set while from_pretrained rebuilds a model whose every tensor it loads next (restoring_checkpoint()).
_RESTORING = contextvars.ContextVar("fastpt_restoring_checkpoint", default=False)


@contextlib.contextmanager
def restoring():
    """``restoring_checkpoint()`` is True inside: for builds whose weights come from elsewhere (a checkpoint's,
    or none: a meta-device build that only reads the resolved config)."""
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def restoring_checkpoint() -> bool:
    """True while ``PretrainModel.from_pretrained`` builds the model it then fills from the checkpoint: an
    objective's ``attach`` skips reading weights from elsewhere (self_distill's ``teacher_path``), which the
    checkpoint holds (and the source may be gone)."""
    return _RESTORING.get()


class PretrainModel(nn.Module):
    """A backbone and the objective that trains it.

    Args:
        backbone: a ``TextEncoder``, ``EncoderDecoder``, ``VisionEncoder`` or ``TwoTower``.
        objective: an objective module (``fastpt.objectives``) already attached to ``backbone``
            (``Objective.from_backbone``), or None for a bare backbone (forward returns its states).
        config: the resolved build config (``fastpt.assemble.build``); saved with the weights.

    Attributes: backbone, objective, config.
    """

    # Callable(config dict) -> PretrainModel used by ``from_pretrained``; fastpt.assemble sets it to
    # its ``build`` (the objectives registry lives above models/ in the layering).
    builder: Callable[[dict], "PretrainModel"] | None = None
    # (build config, the checkpoint's tensor names) -> build config: options an older fastpt's checkpoint
    # implies (registered by fastpt.assemble, from the objectives' upgrade_config)
    config_upgrader: Callable[[dict, tuple], dict] | None = None

    def __init__(self, backbone: nn.Module, objective: nn.Module | None = None, *, config: dict | None = None):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone: expected an nn.Module, got {type(backbone).__name__}")
        if objective is not None and not isinstance(objective, nn.Module):
            raise TypeError(f"objective: expected an objective nn.Module or None, got {type(objective).__name__}")
        self.backbone = backbone
        self.objective = objective
        self.config = json.loads(json.dumps(config or {}))  # a private, JSON-able copy

    # ------------------------------------------------------------------ training protocol

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """The objective's ``prepare``: model inputs from a raw batch (masks, spans, views), on its
        device, a pure function of ``seed``. Without objective: a shallow copy."""
        if self.objective is None:
            return dict(batch)
        return self.objective.prepare(batch, seed=seed)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **batch) -> ModelOutput:
        """Run the objective on a prepared batch: ``model(**model.prepare(raw, seed=s))`` or
        ``model(input_ids, attention_mask, labels=...)``; any other batch key by name
        (``pixel_values``, ``return_logits=True``, ...). Without objective the keys are the backbone's
        own arguments (``token_type_ids``, ``cu_seqlens``, ``causal``, ``output_hidden_states`` ...),
        passed on to it. Returns ``ModelOutput`` (``loss`` None without objective; ``hidden_states``
        with ``output_hidden_states=True`` without objective).

        Raises TypeError naming every key that nothing on the path reads (``batch_keys()``: without
        objective, and for objectives that declare their keys, the text ones) and, for any objective, a
        backbone mode switch (``causal``, ``output_hidden_states``) it would ignore because it runs the
        backbone itself (call ``model.backbone(...)`` for those). Objectives whose ``prepare`` passes a
        raw batch's keys through (SimCLR, MoCo v3, DINO, MAE, CLIP, a user's own) take other keys.
        """
        self._check_keys(batch)
        if input_ids is not None:
            batch["input_ids"] = input_ids
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        if self.objective is None:
            out = self._encode(batch)
            return ModelOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)
        out = self.objective(self.backbone, batch)
        return ModelOutput(loss=out.loss, logits=out.logits, last_hidden_state=out.last_hidden_state,
                           metrics=out.metrics)

    def batch_keys(self) -> frozenset[str] | None:
        """The batch keys ``forward`` takes: the objective's ``batch_keys`` (what its forward reads and its
        prepare keeps of a raw batch), or without objective the backbone's ``forward`` arguments plus the
        raw-batch annotations nothing encodes (``special_tokens_mask``, ``word_ids``, ``max_seqlen`` when
        the backbone does not take it). None when unknown (an objective without ``batch_keys``, a backbone
        whose forward takes ``**kwargs``): then every key is passed on unchecked."""
        if self.objective is not None:
            keys = getattr(self.objective, "batch_keys", None)
            return None if keys is None else frozenset(keys) | {"input_ids", "attention_mask"}
        params = _forward_params(self.backbone)
        return None if params is None else frozenset(params) | frozenset(_NOTES)

    def _check_keys(self, batch: dict) -> None:
        """TypeError naming the keys of ``batch`` outside ``batch_keys()``; for an objective that declares none
        (its prepare passes a raw batch's keys through), the backbone's mode switches it would ignore."""
        allowed = self.batch_keys()
        if allowed is None and self.objective is not None:
            needs = set(getattr(self.objective, "needs", ()))
            self._refuse_backbone_args([k for k in batch if k in _MODE_SWITCHES and k not in needs])
            return
        unknown = [k for k in batch if allowed is not None and k not in allowed]
        if not unknown:
            return
        if self.objective is not None:
            what = f"the {type(self.objective).__name__} objective"
            self._refuse_backbone_args(unknown)
        else:
            what = f"a {type(getattr(self.backbone, '_orig_mod', self.backbone)).__name__} backbone without objective"
        hint = ("; labels need an objective (this model has none: build it with one for a loss)"
                if self.objective is None and "labels" in unknown else "")
        raise TypeError(f"{', '.join(unknown)}: unknown batch key{'s' if len(unknown) > 1 else ''} for {what}; it "
                        f"takes {', '.join(sorted(allowed))}{hint}")

    def _refuse_backbone_args(self, keys) -> None:
        """TypeError naming those of ``keys`` that are the backbone's own arguments, which the objective (it
        runs the backbone itself) would not pass on."""
        own = [k for k in keys if k in (_forward_params(self.backbone) or ())]
        if own:
            these = "this argument" if len(own) == 1 else "these arguments"
            raise TypeError(f"{', '.join(own)}: the {type(self.objective).__name__} objective runs the backbone "
                            f"itself and does not take {these}; call model.backbone(..., {own[0]}=...) for the "
                            f"backbone's output")

    def _encode(self, batch: dict):
        from .two_tower import TwoTower
        from .vision import VisionEncoder

        backbone = self.backbone
        if isinstance(backbone, TwoTower):
            raise ValueError("PretrainModel.forward: a two_tower backbone has no single last_hidden_state without "
                             "an objective: call model.backbone(input_ids=..., pixel_values=...) for a "
                             "TwoTowerOutput, or build it with an objective (clip)")
        if batch.get("input_ids") is None and batch.get("pixel_values") is None:
            raise KeyError(f"PretrainModel.forward: batch has neither input_ids nor pixel_values (has {sorted(batch)})")
        # the backbone's keyword arguments in the batch (checked by _check_keys), annotations left out
        params = _forward_params(backbone)
        extra = {k: v for k, v in batch.items() if v is not None and k not in ("input_ids", "attention_mask",
                                                                              "pixel_values")
                 and (k in params if params is not None else k not in _NOTES)}
        if isinstance(backbone, VisionEncoder):
            if batch.get("pixel_values") is None:
                raise ValueError("pixel_values: a vision backbone encodes images (B, C, H, W); the batch has "
                                 "input_ids instead")
            return backbone(batch["pixel_values"], **extra)
        if batch.get("input_ids") is None:
            raise ValueError(f"pixel_values: a {type(backbone).__name__} backbone encodes token ids; give input_ids")
        return backbone(batch["input_ids"], batch.get("attention_mask"), **extra)

    def on_step_end(self, step: int) -> None:
        """After each optimizer step: the objective's EMA teachers / momentum encoders / schedules."""
        if self.objective is not None:
            self.objective.on_step_end(self.backbone, step)

    def tokens_in(self, batch: dict) -> int:
        """Tokens (or image patches) in ``batch``, for throughput (the objective's count)."""
        if self.objective is not None:
            return self.objective.tokens_in(batch)
        if batch.get("attention_mask") is not None:
            return int(batch["attention_mask"].sum())
        if batch.get("input_ids") is not None:
            return int(batch["input_ids"].numel())
        px = batch["pixel_values"]
        return int(px.shape[0] * self.backbone.num_patches)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require grad, each once (tied ones included once; frozen teacher and
        momentum copies left out): what the optimizer gets."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count, tied / shared tensors counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token counted by ``tokens_in`` (forward + backward), for MFU, as in
        PaLM's appendix B, part by part:

            sum over the backbone's parts of w_part * (6 * N_part + 12 * layers * width * keys attended)
            + w_heads * 6 * N_heads

        N counts the weight elements of every matrix product a token passes through: the part's 2-D
        weights (fused q/k/v, projections, MLPs; ALBERT's shared layer once per use) and patch
        convolutions, not the embedding tables (lookups); N_heads the objective's trainable 2-D weights
        (heads, projectors, the MAE decoder; the vocabulary matrix of a tied head included). The second
        term is attention's score and value products over the keys each token attends to. The weights w
        are the objective's (``Objective.flops_weights``): the passes a counted token makes through each
        part, e.g. MLM's head on the masked ``mask_prob`` of the tokens, T5's encoder / decoder on their
        shares of a corrupted row, SimCLR's two views, MAE's encoder on the visible patches, a teacher's
        forward-only pass as 1/3, pooled heads once per image. ``seq_len``: tokens per text sequence
        (required for text backbones); a vision stack uses its own patch count (+ cls).

        An encoder-decoder counts each side's weights on that side's tokens (Kaplan et al. 2020, PaLM
        appendix B): its weights w_encoder / w_decoder are each side's tokens per counted token, so the
        encoder's row is w_encoder * seq_len tokens long and the decoder's w_decoder * seq_len. The
        encoder attends over its own row; the decoder over its own row (self-attention) plus the encoder's
        (cross-attention); the decoder's cross-attention K/V projections run on the encoder's tokens and
        count at w_encoder. An estimate: augmented views cost by their area, causal attention counts its
        full square (as PaLM does), and a single stack's attention keeps the unsplit sequence length.
        """
        weights = self.objective.flops_weights(self.backbone, seq_len) if self.objective is not None else {}
        total = 0.0
        for part, n_matmul, layers, width, keys in _parts(self.backbone, weights, seq_len):
            total += _weight(weights, part) * (6 * n_matmul + 12 * layers * width * keys)
        if self.objective is not None:
            total += weights.get("heads", 1.0) * 6 * _matmul_params(self.objective, trainable=True)
        return float(total)

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, path) -> Path:
        """Write ``fastpt_config.json`` + ``model.safetensors`` under directory ``path`` (created),
        each atomically. Returns the directory. Raises ValueError when the model has no config
        (not built by ``fastpt.build``: ``from_pretrained`` could not rebuild it)."""
        if not self.config.get("backbone"):
            raise ValueError("config: this PretrainModel has no build config (make it with fastpt.build or "
                             "fastpt.from_hf) so from_pretrained could not rebuild it")
        _safetensors()  # ImportError naming the extra before any work
        tensors, seen = {}, set()
        for key, t in self.state_dict(keep_vars=True).items():
            if id(t) in seen:  # tied / shared: stored once, under its first name
                continue
            seen.add(id(t))
            # a submodule replaced by torch.compile(...) names its weights "<name>._orig_mod.<...>": the
            # rebuilt model has them under "<name>.<...>"
            tensors[key.replace("._orig_mod.", ".").removeprefix("_orig_mod.")] = t.detach().to("cpu").contiguous()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.config}
        save_safetensors(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
        _atomic_write(path / CONFIG_FILE,
                      lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
        return path

    @classmethod
    def from_pretrained(cls, path, *, map_location="cpu", dtype: torch.dtype | None = None) -> "PretrainModel":
        """Rebuild a ``save_pretrained`` directory: the model from its config, then every tensor.

        Args:
            path: the directory. map_location: device to put the model on. dtype: cast floating
                parameters and buffers to it (default: float32, as built).

        Raises FileNotFoundError (no fastpt_config.json / model.safetensors), ValueError (another
        format, e.g. a Hugging Face or ``fastpt convert`` directory: load those with
        ``fastpt.from_hf``; missing, unexpected or mis-shaped tensors, named; a truncated or corrupt
        model.safetensors, named).
        """
        path = Path(path)
        meta = read_checkpoint_config(path)
        if cls.builder is None:
            raise RuntimeError("PretrainModel.from_pretrained: no builder registered; import fastpt.assemble "
                               "(import fastpt does) before loading")
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"path: no {WEIGHTS_FILE} in {path}")
        values = _load_safetensors(weights)
        config = meta["model"]
        if cls.config_upgrader is not None:  # an older fastpt's layout the config does not name (its tensors do)
            config = cls.config_upgrader(config, tuple(values))
        with restoring():
            model = cls.builder(config)
        if hasattr(getattr(model, "objective", None), "upgrade_state"):
            model.objective.upgrade_state(values, "objective.")  # an older fastpt's layout
        named = model.state_dict(keep_vars=True)
        unexpected = sorted(k for k in values if k not in named)
        if unexpected:
            raise ValueError(f"from_pretrained({path}): tensors the rebuilt model has no place for: {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        _load_into(named, values, f"from_pretrained({path})")
        model.to(map_location)
        if dtype is not None:
            model.to(dtype)
        return model


def config_format(path) -> str | None:
    """The ``format`` of the ``fastpt_config.json`` in directory ``path`` (``FORMAT``, "fastpt-pretrain": a
    ``save_pretrained`` checkpoint; "fastpt": a ``fastpt convert --from-hf`` output), None when there is none
    or it is not a readable JSON object (the loader then says what is wrong)."""
    try:
        data = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def read_checkpoint_config(path) -> dict:
    """``fastpt_config.json`` of a ``save_pretrained`` directory, checked: ``{"format", "format_version",
    "model": build config}``. Raises FileNotFoundError / ValueError naming the file."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"path: no {CONFIG_FILE} in {path} (a Hugging Face directory loads with "
                                f"fastpt.from_hf)")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r} (a `fastpt convert --from-hf` "
                         f"directory loads with fastpt.from_hf)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {meta['format_version']} is newer than this fastpt reads "
                         f"({FORMAT_VERSION})")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{file}: no 'model' build config")
    return meta


def _atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then ``os.replace(tmp, dest)``: readers see the old file or the whole new one. An OSError
    without a file name (a full disk's) names ``dest``."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise named_os_error(exc, dest) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _forward_params(module: nn.Module) -> tuple[str, ...] | None:
    """Names ``module.forward`` takes by keyword (a ``torch.compile`` wrapper's: the wrapped module's); None
    when it also takes ``**kwargs``. Read once per forward function: every training step asks."""
    forward = getattr(module, "_orig_mod", module).forward
    return _keyword_params(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=64)
def _keyword_params(forward) -> tuple[str, ...] | None:
    params = list(inspect.signature(forward).parameters.values())
    if params and params[0].name == "self":  # the unbound function of a method
        params = params[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _matmul_params(module: nn.Module, trainable: bool = False) -> int:
    """Weight elements of the matrix products in ``module``, a shared submodule once per use (only those
    that require grad with ``trainable``: not a frozen teacher's): 2-D weights and patch convolutions, not
    embedding tables, mask tokens or position tables (lookups and additions)."""
    n = 0
    for _, m in module.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Embedding):
            continue
        for p in m.parameters(recurse=False):
            if trainable and not p.requires_grad:
                continue
            if p.dim() == 2 or (isinstance(m, nn.Conv2d) and p is m.weight):
                n += p.numel()
    return n


class _Rest(nn.Module):
    """An encoder-decoder's modules outside its encoder (the decoder, its norms), for ``_matmul_params``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(m for name, m in backbone.named_children() if name != "encoder")


def _weight(weights: dict[str, float], part: str) -> float:
    """The objective's weight for ``part`` (``Objective.flops_weights``), else its "backbone" weight, else 1."""
    return weights.get(part, weights.get("backbone", 1.0))


def _cross_kv_params(backbone: nn.Module) -> int:
    """Weight elements of an encoder-decoder's cross-attention K/V projections (``CrossAttention.kv_proj``,
    or separate ``k_proj`` / ``v_proj``): matrix products on the encoder's tokens, not the decoder's."""
    n = 0
    for layer in backbone.decoder_layers:
        cross = getattr(layer, "cross_attn", None)
        for name in ("kv_proj", "k_proj", "v_proj"):
            proj = getattr(cross, name, None)
            if isinstance(proj, nn.Module):
                n += _matmul_params(proj)
    return n


def _parts(backbone: nn.Module, weights: dict[str, float], seq_len: int | None):
    """(weight name, matmul weight elements, layers, width, keys each token attends to per layer) for
    ``flops_per_token``: an encoder-decoder's "encoder" (its stack, then the decoder's cross-attention
    K/V projections, which run on encoder tokens) and "decoder" (self-attention over its own row plus
    cross-attention over the encoder's), two towers' "text" and "vision", else the whole "backbone".
    Raises ValueError when a text stack needs ``seq_len`` and it is None."""
    def text_len() -> int:
        if seq_len is None:
            raise ValueError("seq_len: required for a text backbone (tokens per sequence)")
        return seq_len

    def stack(name: str, module: nn.Module):
        layers, width, tokens = _stack(module)
        return name, _matmul_params(module), layers, width, text_len() if tokens is None else tokens

    if isinstance(getattr(backbone, "text", None), nn.Module) and isinstance(getattr(backbone, "vision", None),
                                                                            nn.Module):
        yield stack("text", backbone.text)
        yield stack("vision", backbone.vision)
    elif hasattr(backbone, "decoder_layers"):
        # each side's row: its tokens per counted token (its weight) x the counted tokens per sequence
        enc_len, dec_len = _weight(weights, "encoder") * text_len(), _weight(weights, "decoder") * text_len()
        width, kv = backbone.hidden_size, _cross_kv_params(backbone)
        yield "encoder", _matmul_params(backbone.encoder), len(backbone.encoder.layers), width, enc_len
        yield "encoder", kv, 0, width, 0
        yield "decoder", _matmul_params(_Rest(backbone)) - kv, len(backbone.decoder_layers), width, dec_len + enc_len
    else:
        yield stack("backbone", backbone)


def _stack(encoder: nn.Module) -> tuple[int, int, int | None]:
    """(layers, width, tokens per sequence: a ViT's patches (+ cls), None for text) of one encoder."""
    if hasattr(encoder, "patch_embed"):
        cls = int(getattr(encoder.patch_embed, "cls_token", None) is not None)
        return len(encoder.layers), encoder.hidden_size, encoder.num_patches + cls
    return len(encoder.layers), encoder.hidden_size, None
