"""Masked language modelling (BERT), RoBERTa's dynamic masking, optional whole-word masking.

``prepare`` masks a fresh 15% of the tokens of every batch it sees (``fastpt.ops.mlm_mask``, 80%
mask token / 10% random / 10% unchanged), so the masks change every epoch as in RoBERTa; with
``whole_word_masking`` the batch's ``word_ids`` make all pieces of a word selected together.
The loss runs the head only on the masked rows, without materialising the (T, V) logits::

    loss = linear_cross_entropy(head.transform(h[masked]), head.weight, labels[masked], bias=head.bias)
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import linear_cross_entropy, mlm_mask
from ..ops.linear_cross_entropy import labelled_rows
from ..ops.mlm_mask import number_words, word_starts
from ..models.heads import MLMHead
from .base import (TEXT_BATCH, Objective, ObjectiveOutput, check_ids, check_seed, encode_text, fraction, head_accuracy,
                   positive, refuse_prefix_lens, require, want_logits)


def _word_runs(word_ids, ids: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """``word_ids`` renumbered per row so that each run of equal ids ``>= 0`` is its own word (-1 elsewhere).

    ``mlm_mask`` ties every token of a row sharing a word id; word ids that restart (the second
    sequence of a pair, each document of a packed row) would tie unrelated words. A new word starts
    where the id changes and at each document start in ``cu_seqlens`` (over the flattened tokens).
    Ids already numbered 0, 1, ... in order per row come back unchanged."""
    w = check_ids("word_ids", word_ids, ndim=(ids.dim(),))
    if w.shape != ids.shape:
        raise ValueError(f"word_ids: expected the shape of input_ids {tuple(ids.shape)}, got {tuple(w.shape)}")
    w = w.reshape(-1, w.shape[-1])
    prev = torch.full_like(w, -1)
    prev[:, 1:] = w[:, :-1]
    inside = w >= 0
    start = (w != prev) & inside
    _start_documents(start, cu_seqlens)
    return number_words(start, inside).reshape(ids.shape)


def _start_documents(start: torch.Tensor, cu_seqlens) -> None:
    """Mark, in place, each document start of ``cu_seqlens`` (offsets into the flattened tokens) as a
    word start in ``start`` (``number_words`` keeps only the starts inside words)."""
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and not cu_seqlens.dtype.is_floating_point:
        starts = cu_seqlens[:-1].to(device=start.device, dtype=torch.int64)
        start.view(-1)[starts[(starts >= 0) & (starts < start.numel())]] = True


class MLM(Objective):
    """BERT / RoBERTa masked-language-model objective on a ``TextEncoder``.

    The backbone always runs bidirectionally (``causal=False``, as ``CausalLM`` runs it with ``causal=True``): a
    masked token is predicted from both sides. A ``TextEncoder``'s ``causal`` is only its default mask kind
    (the same stack serves BERT and GPT-2), so ``fastpt.build("gpt2-small", objective={"name": "mlm", ...})``
    trains a true bidirectional MLM on GPT-2's layers, and ``build`` records that default on the backbone
    (``backbone_causal``): its saved config, ``fastpt eval`` and ``to_hf`` see a bidirectional encoder.

    Args:
        hidden_size, vocab_size: the backbone's width D and vocabulary V.
        mask_token_id: id written at 80% (``replace_prob``) of the selected positions.
        mask_prob, replace_prob, random_prob: selection rate and the 80/10/10 split.
        special_token_ids: ids never masked (CLS, SEP, PAD, ...).
        whole_word_masking: select whole words. A batch's ``word_ids`` give them (a word is a run of
            consecutive tokens with the same id ``>= 0``, so ``Encoding.word_ids()`` that restart per
            sequence of a pair or per packed document, ``None`` / -1 on special tokens, work as given);
            a batch without them (token shards) needs ``set_word_starts`` (``fastpt pretrain`` calls it
            with the shards' tokenizer: ``data.tokenizer.word_boundary_tables``).
        tie_word_embeddings: the head's output matrix is the backbone's word embedding (set by ``attach``;
            with ALBERT's factorised ``(V, E)`` embedding the head's transform maps D -> E).
        activation, layer_norm_eps: the head's transform (dense + activation + LayerNorm); layer_norm_eps
            None: the backbone's ``norm_eps`` (as BERT's and RoBERTa's heads), 1e-12 without one. (Before
            commit 8c12bf2, 2026-11-27, the head took 1e-12 whatever the backbone's eps, and its saved
            config does not say so: such a RoBERTa-style checkpoint, norm_eps 1e-5, rebuilds with 1e-5;
            ``"layer_norm_eps": 1e-12`` in its objective config rebuilds it exactly.)
        return_logits: also return the full ``(B, S, V)`` logits (a batch's ``return_logits`` overrides).
        log_accuracy: report the masked-token accuracy (one extra no-grad pass over the masked rows).

    Batch: raw ``{"input_ids" (B, S) or packed (T,), "attention_mask" (B, S) optional}`` plus optional
    ``special_tokens_mask``, ``word_ids``, ``token_type_ids``, ``position_ids``, ``cu_seqlens``; a batch's
    ``prefix_lens`` (a prefix-LM mask) is refused, naming it (TypeError). ``prepare`` replaces ``input_ids``
    by the masked ids and adds ``labels`` (original id where masked, -100 elsewhere). A batch that already
    has ``labels`` (masked by a collator) passes through unchanged.
    """

    needs = ("input_ids",)
    backbone_causal = False
    # masking is C++ on the host (GIL released); on a GPU the id-range check would read the ids back each batch
    prepare_on_host = True
    batch_keys = TEXT_BATCH + ("return_logits",)  # encode_text's inputs, labels, return_logits
    hf_heads = {"mlm": "head"}

    def __init__(self, *, hidden_size: int, vocab_size: int, mask_token_id: int, mask_prob: float = 0.15,
                 replace_prob: float = 0.8, random_prob: float = 0.1, special_token_ids: tuple[int, ...] = (),
                 whole_word_masking: bool = False, tie_word_embeddings: bool = True, activation: str = "gelu",
                 layer_norm_eps: float | None = None, return_logits: bool = False, log_accuracy: bool = False):
        super().__init__()
        self.hidden_size = positive("hidden_size", hidden_size, integer=True)
        self.vocab_size = positive("vocab_size", vocab_size, integer=True)
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id: expected an id in [0, vocab_size={vocab_size}), got {mask_token_id!r}")
        self.mask_token_id = mask_token_id
        self.mask_prob = fraction("mask_prob", mask_prob)
        self.replace_prob = fraction("replace_prob", replace_prob)
        self.random_prob = fraction("random_prob", random_prob)
        if self.replace_prob + self.random_prob > 1:
            raise ValueError(f"replace_prob + random_prob: expected <= 1, got {replace_prob} + {random_prob}")
        self.special_token_ids = tuple(int(i) for i in special_token_ids)
        self.whole_word_masking = bool(whole_word_masking)
        self.word_starts: torch.Tensor | None = None  # bool per vocabulary id (set_word_starts)
        self.word_ends: torch.Tensor | None = None
        self._word_tables: dict = {}  # device -> (word_starts, word_ends, special ids) there: no upload per batch
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.return_logits, self.log_accuracy = bool(return_logits), bool(log_accuracy)
        self._eps_from_backbone = layer_norm_eps is None
        self._head_args = dict(activation=activation, layer_norm_eps=1e-12 if layer_norm_eps is None else layer_norm_eps)
        self.head = MLMHead(hidden_size, vocab_size, **self._head_args)

    def attach(self, backbone: nn.Module) -> None:
        """Tie the head's output matrix to ``backbone.embeddings.word_embeddings`` (when asked). A
        factorised ``(V, E)`` table (ALBERT) gets ALBERT's head: the transform maps D -> E."""
        if self._eps_from_backbone and not self._attached:
            eps = (getattr(backbone, "config", None) or {}).get("norm_eps")
            if eps is not None:
                self._head_args["layer_norm_eps"] = self.head.layer_norm.eps = float(eps)
        if self.tie_word_embeddings and not self._attached:
            # A fresh head around the shared matrix (attach runs once, right after construction).
            weight = backbone.embeddings.word_embeddings.weight
            self.head = MLMHead(self.hidden_size, self.vocab_size, tied_weight=weight, embedding_size=weight.shape[1],
                                **self._head_args)
        self._attached = True

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Mask ``input_ids`` (dynamic masking: a new mask per call / seed); adds ``labels``."""
        seed = check_seed(seed)
        require(batch, self.needs, "MLM.prepare")
        refuse_prefix_lens(batch, "the mlm objective")
        if batch.get("labels") is not None:
            return dict(batch)
        ids = check_ids("input_ids", batch["input_ids"], ndim=(1, 2))
        word_ids = None
        if self.whole_word_masking and batch.get("word_ids") is None and self.word_starts is not None:
            word_ids = self._words_from_ids(ids, batch)
        elif self.whole_word_masking:
            require(batch, ("word_ids",), "MLM.prepare (whole_word_masking=True; or set_word_starts for batches "
                                          "of token ids alone)")
            word_ids = _word_runs(batch["word_ids"], ids, batch.get("cu_seqlens"))
        masked, labels = mlm_mask(ids, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                      mask_prob=self.mask_prob, replace_prob=self.replace_prob,
                                      random_prob=self.random_prob,
                                      special_tokens_mask=batch.get("special_tokens_mask"),
                                      special_token_ids=self.special_token_ids,
                                      attention_mask=batch.get("attention_mask"), word_ids=word_ids, seed=seed)
        return {**batch, "input_ids": masked, "labels": labels}

    def set_word_starts(self, word_starts, word_ends=None) -> None:
        """Whole-word masking for batches without ``word_ids`` (token shards): ``word_starts`` is a bool
        per vocabulary id, True where the token begins a word; ``word_ends`` (optional, the same shape) True
        where the token after it begins one (``data.tokenizer.word_boundary_tables``: not a WordPiece ``##``
        piece; a byte-level BPE / SentencePiece token beginning with its space ``Ġ`` / ``▁``, a CJK ideograph,
        punctuation or a newline, and the token after one ending with such a character: BERT's words). A
        word is then a start token and the non-start tokens after it, cut at special tokens and at document
        starts (``cu_seqlens``), as BERT's ``create_pretraining_data`` groups ``##`` pieces. None switches it
        off."""
        self._word_tables = {}
        if word_starts is None:
            self.word_starts = self.word_ends = None
            return
        tables = []
        for name, table in (("word_starts", word_starts), ("word_ends", word_ends)):
            if table is None:
                tables.append(None)
                continue
            t = torch.as_tensor(table)
            if t.dtype != torch.bool or t.dim() != 1 or t.shape[0] < self.vocab_size:
                raise ValueError(f"{name}: expected a 1-d bool tensor with an entry per vocabulary id "
                                 f"(>= vocab_size={self.vocab_size}), got {t.dtype} of shape {tuple(t.shape)}")
            tables.append(t.detach().cpu())
        self.word_starts, self.word_ends = tables

    def _words_from_ids(self, ids: torch.Tensor, batch: dict) -> torch.Tensor:
        """``word_ids`` from the token ids and ``word_starts`` (``set_word_starts``)."""
        if ids.device not in self._word_tables:
            ends = getattr(self, "word_ends", None)
            self._word_tables[ids.device] = (self.word_starts.to(ids.device),
                                             None if ends is None else ends.to(ids.device),
                                             torch.tensor(self.special_token_ids, device=ids.device, dtype=torch.int64))
        table, ends, specials = self._word_tables[ids.device]
        flat = ids.reshape(-1, ids.shape[-1])
        # ends: the token after one ending with a boundary character (a newline, "(") begins a word too
        start = word_starts(flat, table, ends)
        inside = torch.ones_like(start)
        if self.special_token_ids:
            inside &= ~torch.isin(flat, specials.to(flat.dtype))
        for key in ("special_tokens_mask",):
            if isinstance(batch.get(key), torch.Tensor):
                inside &= ~batch[key].reshape(flat.shape).bool()
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            inside &= batch["attention_mask"].reshape(flat.shape).bool()
        # a token after a special one (or a row's first) starts a word even if it is a continuation
        prev_inside = torch.zeros_like(inside)
        prev_inside[:, 1:] = inside[:, :-1]
        start |= ~prev_inside
        _start_documents(start, batch.get("cu_seqlens"))
        return number_words(start, inside).reshape(ids.shape)

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """The backbone on every token, the head on the masked ``mask_prob`` of them."""
        return {"backbone": 1.0, "heads": self.mask_prob}

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """Encode the masked ids and score the masked rows (run ``prepare`` first, or pass ``labels``).
        Without ``labels``: no loss, the logits of every position (the head on all rows)."""
        require(batch, ("input_ids",), "MLM.forward")
        self._ensure_attached(backbone)
        h = encode_text(backbone, batch, causal=False, objective="the mlm objective").last_hidden_state
        if batch.get("labels") is None:  # inference, as BertForMaskedLM without labels: every position's logits
            return ObjectiveOutput(None, {}, self.head(h), h)
        loss, metrics = self.loss_from_hidden(h, batch["labels"])
        logits = self.head(h) if want_logits(batch, self.return_logits) else None
        return ObjectiveOutput(loss, metrics, logits, h)

    def loss_weight(self, batch: dict) -> torch.Tensor | None:
        """The masked tokens the loss averages over."""
        return None if batch.get("labels") is None else (batch["labels"] != -100).sum()

    def loss_from_hidden(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """MLM loss of states ``h`` ``(..., D)`` against ``labels`` ``(...)`` (-100: not masked).

        Returns ``(loss, metrics)`` with metrics ``mlm_loss`` (and ``mlm_accuracy`` with ``log_accuracy``).
        """
        if labels.shape != h.shape[:-1]:
            raise ValueError(f"labels: expected shape {tuple(h.shape[:-1])} (the token shape), "
                             f"got {tuple(labels.shape)}")
        hm, y = labelled_rows(h, labels)
        hm = self.head.transform(hm)
        head = self.head
        loss = linear_cross_entropy(hm, head.weight, y, bias=head.bias)
        metrics = {"mlm_loss": loss.detach()}
        if self.log_accuracy:
            metrics["mlm_accuracy"] = head_accuracy(hm, head.weight, head.bias, y)
        return loss, metrics

