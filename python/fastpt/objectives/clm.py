"""Causal language modelling (GPT) and prefix-LM (T5 / UL2's S-denoiser on a decoder-only stack).

Labels follow Hugging Face: aligned with ``input_ids`` (-100 where no loss), shifted inside the
loss, so position ``t`` predicts ``labels[t + 1]``. The head runs only on rows with a target::

    loss = linear_cross_entropy(h[:-1][active], head.weight, labels[1:][active], bias=head.bias)

Packed documents (``cu_seqlens``) never predict across a boundary: each document's first label
is ignored. Prefix-LM attends bidirectionally over each row's prefix (``prefix_lens``, drawn in
``prepare`` uniformly in ``[1, L - 1]`` unless the batch brings its own) and takes the loss on the
tokens after it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import linear_cross_entropy
from ..models.heads import LMHead
from ..nn.attention import check_padding_mask
from ..ops.attention import check_mask_args
from .base import (TEXT_BATCH, Objective, ObjectiveOutput, check_ids, check_seed, encode_text, head_accuracy, positive,
                   refuse_prefix_lens, require, seeded, want_logits)


def token_positions(input_ids: torch.Tensor, attention_mask=None, cu_seqlens=None):
    """Per token: its position in its row (or packed document) and that row's / document's length.

    Returns ``(pos, length)`` int64, shaped like ``input_ids``; padded tokens get ``pos >= length``.
    """
    dev = input_ids.device
    if cu_seqlens is not None:
        cu = cu_seqlens.to(dev, torch.int64)
        t = torch.arange(input_ids.numel(), device=dev)
        doc = torch.searchsorted(cu, t, right=True) - 1
        return (t - cu[doc]).view(input_ids.shape), (cu[doc + 1] - cu[doc]).view(input_ids.shape)
    s = input_ids.shape[-1]
    pos = torch.arange(s, device=dev).expand_as(input_ids)
    if attention_mask is None:
        return pos, torch.full_like(pos, s)
    return pos, attention_mask.long().sum(-1, keepdim=True).expand_as(input_ids)


def lm_labels(input_ids: torch.Tensor, attention_mask=None, cu_seqlens=None, prefix: torch.Tensor | None = None):
    """Labels aligned with ``input_ids``: the id itself, -100 at padding (wherever ``attention_mask`` is 0:
    also right for a left-padded batch, which the model's forward then refuses), at each packed document's
    first token and (prefix-LM) inside the prefix. ``prefix``: per token, its row's prefix length."""
    pos, length = token_positions(input_ids, attention_mask, cu_seqlens)
    drop = pos >= length if attention_mask is None else attention_mask == 0
    if cu_seqlens is not None:
        drop |= pos == 0
    if prefix is not None:
        drop |= pos < prefix
    return input_ids.to(torch.int64).masked_fill(drop, -100)


def next_token_targets(labels: torch.Tensor, cu_seqlens=None, packed: bool = False) -> torch.Tensor:
    """The targets of positions ``0 .. n-2`` for labels aligned with the ids: ``labels[:, 1:]`` per row, or
    ``labels[1:]`` over one packed stream (``packed``), where a document's first label is never a target."""
    if not packed:
        return labels[:, 1:]
    labels = labels.reshape(-1)
    if cu_seqlens is not None:
        labels = labels.clone()
        labels[cu_seqlens[:-1].to(labels.device, torch.int64).clamp(max=labels.numel() - 1)] = -100
    return labels[1:]


def text_ids(batch: dict) -> torch.Tensor:
    """``input_ids``: ``(B, S)``, or packed ``(T,)`` / ``(1, T)`` with ``cu_seqlens``; the batch's
    attention_mask, cu_seqlens and prefix_lens checked against it (the labels index by them)."""
    packed = batch.get("cu_seqlens") is not None
    ids = check_ids("input_ids", batch["input_ids"], ndim=(1, 2) if packed else (2,))
    if batch.get("attention_mask") is not None:
        check_padding_mask("attention_mask", batch["attention_mask"], ids)
    if packed or batch.get("prefix_lens") is not None:
        check_mask_args((ids.numel(),) if packed else ids.shape, ids.device, causal=True,
                        prefix_lens=batch.get("prefix_lens"), cu_seqlens=batch.get("cu_seqlens"))
    return ids


class CausalLM(Objective):
    """Next-token prediction on a ``TextEncoder`` run with the causal mask.

    Args:
        hidden_size, vocab_size: the backbone's width D and vocabulary V.
        tie_word_embeddings: the head's matrix is the backbone's word embedding (set by ``attach``). The LM head
            reads the D-wide states directly, so a factorised ``(V, E)`` embedding (ALBERT's ``embed_dim`` E != D)
            cannot be tied: ``attach`` raises ValueError naming tie_word_embeddings and embed_dim (build the
            objective with ``tie_word_embeddings: false``).
        bias: give the LM head a bias.
        return_logits: also return the full ``(B, S, V)`` logits (a batch's ``return_logits`` overrides).
        log_accuracy: report next-token accuracy (one extra no-grad pass over the target rows).

    Batch: ``{"input_ids" (B, S) or packed (T,) / (1, T), "attention_mask" (B, S) optional,
    "cu_seqlens" optional}``; ``labels`` (aligned, -100 ignored) optional: ``prepare`` (or ``forward``
    when absent) derives them from the ids. A batch's ``prefix_lens`` is refused (TypeError naming it):
    a bidirectional prefix would let each prefix token see the next one it is scored on (``PrefixLM``
    takes it, and no loss inside the prefix).
    """

    needs = ("input_ids",)
    batch_keys = TEXT_BATCH + ("return_logits",)  # encode_text's inputs, labels, return_logits
    backbone_causal = True
    # labels (and PrefixLM's prefixes, drawn from the documents' lengths on the host) without device reads
    prepare_on_host = True
    hf_heads = {"lm": "head"}

    def __init__(self, *, hidden_size: int, vocab_size: int, tie_word_embeddings: bool = True, bias: bool = False,
                 return_logits: bool = False, log_accuracy: bool = False):
        super().__init__()
        self.hidden_size = positive("hidden_size", hidden_size, integer=True)
        self.vocab_size = positive("vocab_size", vocab_size, integer=True)
        self.tie_word_embeddings, self.bias = bool(tie_word_embeddings), bool(bias)
        self.return_logits, self.log_accuracy = bool(return_logits), bool(log_accuracy)
        self.head = LMHead(hidden_size, vocab_size, bias=self.bias)

    def attach(self, backbone: nn.Module) -> None:
        """Tie the head's matrix to ``backbone.embeddings.word_embeddings`` (when asked). ValueError naming
        tie_word_embeddings and embed_dim for a factorised embedding narrower than the states (ALBERT's
        ``(V, E)`` table: unlike MLM's head, the LM head has no transform to map D -> E)."""
        if self.tie_word_embeddings and not self._attached:
            weight = backbone.embeddings.word_embeddings.weight
            if weight.shape[1] != self.hidden_size:
                raise ValueError(f"tie_word_embeddings: the backbone's word embedding is embed_dim={weight.shape[1]} "
                                 f"wide (a factorised embedding) and the LM head reads hidden_size="
                                 f"{self.hidden_size} states, so it cannot be the head's matrix: set "
                                 f"tie_word_embeddings: false (or build the backbone without embed_dim)")
            self.head = LMHead(self.hidden_size, self.vocab_size, bias=self.bias, tied_weight=weight)
        self._attached = True

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Adds ``labels`` (no randomness: ``seed`` is only checked)."""
        check_seed(seed)
        require(batch, self.needs, f"{type(self).__name__}.prepare")
        refuse_prefix_lens(batch, "the clm objective")
        ids = text_ids(batch)
        if batch.get("labels") is not None:
            return dict(batch)
        return {**batch, "labels": lm_labels(ids, batch.get("attention_mask"), batch.get("cu_seqlens"))}

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        require(batch, ("input_ids",), f"{type(self).__name__}.forward")
        self._ensure_attached(backbone)
        labels = batch.get("labels")
        if labels is None:
            labels = lm_labels(text_ids(batch), batch.get("attention_mask"), batch.get("cu_seqlens"))
        h = self._encode(backbone, batch).last_hidden_state
        loss, metrics = self.loss_from_hidden(h, labels, batch.get("cu_seqlens"))
        logits = self.head(h) if want_logits(batch, self.return_logits) else None
        return ObjectiveOutput(loss, metrics, logits, h)

    def _encode(self, backbone: nn.Module, batch: dict):
        """The backbone run causally over whole rows (a batch's prefix_lens refused: PrefixLM's reads it)."""
        return encode_text(backbone, batch, causal=True, objective="the clm objective")

    def loss_weight(self, batch: dict) -> torch.Tensor | None:
        """The next-token targets the loss averages over (labels not -100 after the shift)."""
        labels = batch.get("labels")
        if labels is None:
            return None
        cu = batch.get("cu_seqlens")
        return (next_token_targets(labels, cu, cu is not None or labels.dim() == 1) != -100).sum()

    def loss_from_hidden(self, h: torch.Tensor, labels: torch.Tensor, cu_seqlens=None) -> tuple[torch.Tensor, dict]:
        """Shifted LM loss of ``h`` ``(B, S, D)`` / packed ``(T, D)`` against aligned ``labels``."""
        if labels.shape != h.shape[:-1]:
            raise ValueError(f"labels: expected shape {tuple(h.shape[:-1])} (the token shape), "
                             f"got {tuple(labels.shape)}")
        packed = cu_seqlens is not None or h.dim() == 2
        hs = h.reshape(-1, h.shape[-1])[:-1] if packed else h[:, :-1]
        ys = next_token_targets(labels, cu_seqlens, packed)
        # Every position, the -100 ones included: the fused loss skips ignored rows itself (one
        # device sync to count them), where selecting them here would read the mask on the host
        # in the forward and again in the backward.
        hs, ys = hs.reshape(-1, hs.shape[-1]), ys.reshape(-1)
        loss = linear_cross_entropy(hs, self.head.weight, ys, bias=self.head.bias)
        metrics = {"lm_loss": loss.detach()}
        if self.log_accuracy:
            sel = ys != -100
            metrics["lm_accuracy"] = head_accuracy(hs.detach()[sel], self.head.weight, self.head.bias, ys[sel])
        return loss, metrics


class PrefixLM(CausalLM):
    """Prefix-LM: bidirectional attention over each row's prefix, next-token loss after it.

    Same arguments as ``CausalLM``. ``prepare`` draws ``prefix_lens`` (int64 ``(B,)``, one per
    packed document with ``cu_seqlens``) uniformly in ``[1, L - 1]`` from ``seed`` (rows with
    ``L < 2`` keep ``L``), unless the batch brings its own, and sets the labels inside the
    prefix to -100. It alone of the text objectives reads a batch's ``prefix_lens`` (the others refuse it).
    """

    batch_keys = CausalLM.batch_keys + ("prefix_lens",)

    def prepare(self, batch: dict, *, seed: int) -> dict:
        seed = check_seed(seed)
        require(batch, self.needs, "PrefixLM.prepare")
        ids = text_ids(batch)
        mask, cu = batch.get("attention_mask"), batch.get("cu_seqlens")
        prefix = batch.get("prefix_lens")
        if prefix is None:
            lengths = (cu[1:] - cu[:-1]).long().cpu() if cu is not None else (
                mask.long().sum(-1).cpu() if mask is not None else torch.full((ids.shape[0],), ids.shape[-1]))
            u = torch.rand(lengths.shape[0], generator=seeded(seed),
                           dtype=torch.float64)
            prefix = torch.where(lengths < 2, lengths, 1 + (u * (lengths - 1)).long()).to(ids.device)
        else:
            prefix = check_ids("prefix_lens", prefix, ndim=(1,))
        per_token = prefix.to(ids.device, torch.int64)
        if cu is not None:
            t = torch.arange(ids.numel(), device=ids.device)
            per_token = per_token[torch.searchsorted(cu.to(ids.device, torch.int64), t, right=True) - 1].view(ids.shape)
        else:
            per_token = per_token.view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
        labels = lm_labels(ids, mask, cu, per_token)
        return {**batch, "prefix_lens": prefix, "labels": labels}

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """Encode with ``prefix_lens`` (run ``prepare`` first) and score the tokens after each prefix."""
        require(batch, ("input_ids", "prefix_lens", "labels"), "PrefixLM.forward (run prepare first)")
        return super().forward(backbone, batch)

    def _encode(self, backbone: nn.Module, batch: dict):
        """The backbone run bidirectionally inside each row's (packed document's) prefix, causally after it."""
        return encode_text(backbone, batch, causal=True, prefix_lens=batch["prefix_lens"])
