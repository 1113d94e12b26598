"""CLIP (Radford et al., 2021): contrastive image-text pre-training with two towers.

    t = normalize(W_t pool(text_tower(input_ids)))      i = normalize(W_i pool(vision_tower(pixel_values)))
    loss = (CE(s * i t^T, diag) + CE(s * t i^T, diag)) / 2,   s = min(exp(logit_scale), 100) learnable

through ``fastpt.ops.clip_loss``, which never materialises the N x N similarity matrix. The
backbone is a two-tower module with attributes ``text`` (a ``TextEncoder``) and ``vision`` (a
``VisionEncoder``), e.g. ``nn.ModuleDict({"text": ..., "vision": ...})``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import clip_loss
from ..ops.contrastive import MAX_LOGIT_SCALE
from .base import (Objective, ObjectiveOutput, check_backbone_size, check_first_pooling, check_ids,
                   check_images, choice, encode_text, gathered_keys, global_gradient, per_image_tokens, pool, positive,
                   require, top1_accuracy)
from .simclr import gather_default, vision_tokens


def towers(backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(backbone.text, backbone.vision)``, or a TypeError saying what CLIP needs."""
    text, vision = getattr(backbone, "text", None), getattr(backbone, "vision", None)
    if not isinstance(text, nn.Module) or not isinstance(vision, nn.Module):
        raise TypeError(f"backbone: CLIP needs a two-tower module with .text and .vision (e.g. "
                        f"nn.ModuleDict(text=..., vision=...)), got {type(backbone).__name__}")
    return text, vision


class CLIP(Objective):
    """CLIP's symmetric image-text contrastive loss.

    Args:
        text_hidden_size, vision_hidden_size: widths of the towers (``from_backbone`` reads them).
        embed_dim: shared embedding width (bias-free projections from each tower).
        init_logit_scale: initial ``logit_scale`` (log of the inverse temperature; CLIP: log(1 / 0.07)).
        learn_logit_scale: train ``logit_scale`` (else a fixed buffer). ``logit_scale`` has shape (1,) (FSDP2
            shards no 0-dim parameter); the 0-dim one of older state dicts loads (``load_state_dict``).
        text_pooling: "last" (last valid token: CLIP's EOT with a causal text tower), "first" (CLS) or "mean".
            The text tower runs with its own mask kind (``causal``: OpenAI CLIP's text transformer is causal and
            pools its EOT token, the last); "first" on a causal tower would pool a token that sees only itself
            (every caption one embedding): ``attach`` raises ValueError naming text_pooling and causal.
        vision_pooling: "first" (CLS token; ValueError at ``attach`` for a vision tower without one) or "mean".
        gather: all-gather negatives across ranks (None: when torch.distributed runs with > 1 rank). The
            gradient is then world_size x this rank's share of the global batch's (``global_gradient``):
            averaged by DDP / FSDP, N ranks train as one process on the combined batch.
        log_accuracy: image -> text and text -> image top-1 accuracy in the batch (every rank's when gathered).
        patch_size: the vision tower's patch size, for ``tokens_in`` (``from_backbone`` reads it).

    Batch: ``{"input_ids" (B, S), "attention_mask" (B, S), "pixel_values" (B, C, H, W)}``, pair i =
    (text i, image i). ``prepare`` only checks it. ``last_hidden_state`` of the output is the
    vision tower's.
    """

    needs = ("input_ids", "attention_mask", "pixel_values")

    def __init__(self, *, text_hidden_size: int, vision_hidden_size: int, embed_dim: int = 512,
                 init_logit_scale: float = math.log(1 / 0.07), learn_logit_scale: bool = True,
                 text_pooling: str = "last", vision_pooling: str = "first", gather: bool | None = None,
                 log_accuracy: bool = True, patch_size: int | None = None):
        super().__init__()
        positive("text_hidden_size", text_hidden_size, integer=True)
        positive("vision_hidden_size", vision_hidden_size, integer=True)
        positive("embed_dim", embed_dim, integer=True)
        if isinstance(init_logit_scale, bool) or not isinstance(init_logit_scale, (int, float)) \
                or not math.isfinite(init_logit_scale):
            raise ValueError(f"init_logit_scale: expected a finite number, got {init_logit_scale!r}")
        self.text_pooling = choice("text_pooling", text_pooling, ("last", "first", "mean"))
        self.vision_pooling = choice("vision_pooling", vision_pooling, ("first", "mean"))
        self.text_projection = nn.Linear(text_hidden_size, embed_dim, bias=False)
        self.vision_projection = nn.Linear(vision_hidden_size, embed_dim, bias=False)
        scale = torch.tensor([float(init_logit_scale)])
        if learn_logit_scale:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.gather, self.log_accuracy, self.patch_size = gather, bool(log_accuracy), patch_size

    @classmethod
    def from_backbone(cls, backbone: nn.Module, **kwargs):
        """Build with the towers' widths (and the vision patch size) read from ``backbone``; given ones must
        be the towers' (ValueError naming ``objective.<size>``)."""
        text, vision = towers(backbone)
        check_backbone_size("text_hidden_size", kwargs, text.hidden_size)
        check_backbone_size("vision_hidden_size", kwargs, vision.hidden_size)
        check_backbone_size("patch_size", kwargs, getattr(vision, "patch_size", None))
        obj = cls(**kwargs)
        obj.attach(backbone)
        return obj

    def attach(self, backbone: nn.Module) -> None:
        """Check that "first" vision pooling has a cls token to pool (``check_first_pooling``) and that "first"
        text pooling is not asked of a causal text tower, whose first token attends to nothing after it."""
        text, vision = towers(backbone)
        check_first_pooling("vision_pooling", self.vision_pooling, vision)
        if self.text_pooling == "first" and getattr(text, "causal", False):
            raise ValueError("objective.text_pooling: 'first' pools the first token, and the text tower is causal "
                             "(backbone.text.causal: true), so that token sees only itself: every caption would get "
                             "one embedding; use text_pooling: last (CLIP's EOT token) or mean, or a bidirectional "
                             "text tower (causal: false)")
        self._attached = True

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Checks the keys and shapes (CLIP draws nothing at random)."""
        out = super().prepare(batch, seed=seed)
        ids = check_ids("input_ids", out["input_ids"])
        px = check_images("pixel_values", out["pixel_values"])
        if px.shape[0] != ids.shape[0]:
            raise ValueError(f"pixel_values: expected {ids.shape[0]} images (one per text), got {px.shape[0]}")
        return out

    def embed(self, backbone: nn.Module, batch: dict):
        """``(text_emb (B, E), image_emb (B, E), vision states)``, embeddings not yet normalised."""
        text, vision = towers(backbone)
        th = encode_text(text, batch, objective="the clip objective").last_hidden_state
        vh = vision(batch["pixel_values"]).last_hidden_state
        t = self.text_projection(pool(th, self.text_pooling, batch.get("attention_mask")))
        i = self.vision_projection(pool(vh, self.vision_pooling))
        return t, i, vh

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        require(batch, self.needs, "CLIP.forward")
        if batch.get("labels") is not None:  # it pairs image i with text i; only the op takes labels
            raise TypeError("labels: the clip objective pairs image i with text i and takes no labels; for several "
                            "captions per image call fastpt.ops.clip_loss(image_emb, text_emb, logit_scale, labels=...)")
        self._ensure_attached(backbone)
        t, i, vh = self.embed(backbone, batch)
        gather = gather_default(self.gather)
        loss = global_gradient(clip_loss(i, t, self.logit_scale, gather=gather), gather)
        scale = self.logit_scale.detach().exp().clamp(max=100).reshape(())
        metrics = {"loss": loss.detach(), "logit_scale": scale}
        if self.log_accuracy:  # among every rank's pairs when gathered, as the loss
            tn, im = F.normalize(t.detach(), dim=1), F.normalize(i.detach(), dim=1)
            texts, offset = gathered_keys(tn, gather)
            metrics["image_to_text_accuracy"] = top1_accuracy(im, texts, key_offset=offset)
            metrics["text_to_image_accuracy"] = top1_accuracy(tn, gathered_keys(im, gather)[0], key_offset=offset)
        return ObjectiveOutput(loss, metrics, None, vh)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "logit_scale"
        if isinstance(state_dict.get(key), torch.Tensor) and state_dict[key].dim() == 0:  # saved before it was (1,)
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_step_end(self, backbone: nn.Module, step: int) -> None:
        """Clamp a learned ``logit_scale`` to [0, ln 100] after each optimizer step, as open_clip does: the
        loss's clamp of exp(logit_scale) at 100 has zero gradient above it, so a parameter an optimizer
        step carried past ln 100 would stay there for good (it could never come back down). The top is
        the largest value of the parameter's dtype whose exp() is still <= 100, where the gradient lives."""
        if isinstance(self.logit_scale, nn.Parameter):
            with torch.no_grad():
                self.logit_scale.clamp_(0.0, _top_logit_scale(self.logit_scale.dtype))

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """A counted token is a text token (text tower) or a patch (vision tower), ``seq_len`` of the one per
        ``num_patches`` of the other; the projections once per pair each (pooled)."""
        text, vision = towers(backbone)
        t, p = float(seq_len or 0), float(per_image_tokens(vision))
        return {"text": t / (t + p), "vision": p / (t + p), "heads": 2 / (t + p)}

    def tokens_in(self, batch: dict) -> int:
        """Text tokens plus image patches."""
        return int(batch["attention_mask"].sum()) + vision_tokens(batch["pixel_values"], self.patch_size)


_TOP_LOGIT_SCALE: dict = {}


def _top_logit_scale(dtype: torch.dtype) -> float:
    """The largest ``dtype`` value x with exp(x) <= MAX_LOGIT_SCALE in that dtype (ln 100 rounded may exceed it)."""
    if dtype not in _TOP_LOGIT_SCALE:
        x = torch.tensor(math.log(MAX_LOGIT_SCALE), dtype=dtype)
        while float(x.exp()) > MAX_LOGIT_SCALE:
            x = torch.nextafter(x, torch.zeros((), dtype=dtype))
        _TOP_LOGIT_SCALE[dtype] = float(x)
    return _TOP_LOGIT_SCALE[dtype]
