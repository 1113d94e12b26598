"""Sentence-pair objectives: BERT's next-sentence prediction (NSP) and ALBERT's sentence-order
prediction (SOP), each optionally with MLM on the same pass (BERT / ALBERT pre-training).

``prepare`` builds the pairs from a batch of raw segments (one document chunk per row, no special
tokens; or packed rows with ``cu_seqlens``, the recipe's ``data.mode: pack``, where each row's longest
document piece is its segment, so that A and B never straddle two documents): each row keeps at most
its first ``S - 3`` tokens (``S`` the batch's width), so a pair and
its three special tokens fit in ``S`` positions (BERT's ``create_pretraining_data``: ``max_seq_length -
3``; rows of ``seq_len == max_positions`` stay inside the position table), and is cut at a random point
into A and B, then

- NSP: half the rows keep ``[CLS] A [SEP] B [SEP]`` (label 0, "B follows A"); the others replace
  B by the tail of another row of the batch, truncated to B's length (label 1, "B is random"),
- SOP: half the rows keep the order (label 0), the others swap it: ``[CLS] B [SEP] A [SEP]`` (label 1),

with ``token_type_ids`` 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]`` (Hugging Face's label
conventions: ``next_sentence_label``, ``sentence_order_label``), so the backbone needs two segment types
(``type_vocab_size >= 2``: ``attach`` refuses another, naming it). A 2-way classifier on BERT's
``Pooler`` (tanh dense on the first token) predicts the label. The backbone always runs bidirectionally
(``causal=False``, whatever its default mask kind): the pooled ``[CLS]`` must see both segments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.heads import Pooler
from ..models.layers import init_weights
from .base import (TEXT_BATCH, Objective, ObjectiveOutput, check_ids, check_seed, check_token_id, encode_text,
                   positive, refuse_prefix_lens, require, row_lengths, seeded, upcast)
from .mlm import MLM


def build_pairs(ids: torch.Tensor, a_row, a_start, a_len, b_row, b_start, b_len, *, cls_id: int, sep_id: int,
                pad_id: int) -> dict:
    """``[CLS] A [SEP] B [SEP]`` rows, right padded, from segments of ``ids (B, S)``.

    Segment A of output row i is ``ids[a_row[i], a_start[i] : a_start[i] + a_len[i]]`` (B likewise);
    all arguments are int64 ``(B,)`` on the device of ``ids``. Returns ``input_ids``, ``attention_mask``,
    ``token_type_ids`` and ``special_tokens_mask`` (True at CLS / SEP), each ``(B, max(a + b) + 3)``.
    """
    s = ids.shape[1]
    la, lb = a_len.unsqueeze(1), b_len.unsqueeze(1)
    width = int((a_len + b_len).max()) + 3 if ids.shape[0] else 3
    p = torch.arange(width, device=ids.device).unsqueeze(0)
    in_a, in_b = (p >= 1) & (p <= la), (p >= la + 2) & (p < la + 2 + lb)
    src_a = ids[a_row].gather(1, (a_start.unsqueeze(1) + p - 1).clamp(0, max(s - 1, 0)))
    src_b = ids[b_row].gather(1, (b_start.unsqueeze(1) + p - la - 2).clamp(0, max(s - 1, 0)))
    special = (p == 0) | (p == la + 1) | (p == la + lb + 2)
    out = torch.where(in_a, src_a, torch.where(in_b, src_b, torch.where(special, sep_id, pad_id)))
    out = torch.where(p == 0, cls_id, out).to(ids.dtype)
    attention = p <= la + lb + 2
    return dict(input_ids=out, attention_mask=attention.long(), token_type_ids=((p >= la + 2) & attention).long(),
                special_tokens_mask=special & attention)


def longest_pieces(cu_seqlens, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest document piece of each row of packed ``ids (B, S)``: ``(lengths, starts)``, int64 ``(B,)``
    on the host, starts within the row (the first of equally long pieces). ``cu_seqlens`` are document
    offsets over the ``B * S`` tokens (the recipe's packed batches); a document crossing a row's end is
    cut there. ValueError naming cu_seqlens when it is not such offsets."""
    b, s = ids.shape
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() \
            or cu_seqlens.dtype == torch.bool:
        raise ValueError("cu_seqlens: expected a 1-D integer tensor of document offsets over the B * S tokens "
                         "of input_ids")
    cu = cu_seqlens.to("cpu", torch.int64)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != b * s or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to B * S = {b * s}, got "
                         f"{cu.tolist()[:8]}{' ...' if cu.numel() > 8 else ''}")
    bounds = torch.unique(torch.cat([cu, torch.arange(0, b * s + 1, max(s, 1))]))  # sorted, row ends added
    starts, lens = bounds[:-1], bounds[1:] - bounds[:-1]
    rows = starts // max(s, 1)
    order = torch.sort(rows * (s + 1) + (s - lens), stable=True).indices  # per row: longest, then first
    first = torch.ones(len(order), dtype=torch.bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    chosen = order[first]
    lengths, offsets = torch.zeros(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int64)
    lengths[rows[chosen]], offsets[rows[chosen]] = lens[chosen], starts[chosen] - rows[chosen] * s
    return lengths, offsets


class _SentencePair(Objective):
    needs = ("input_ids",)
    backbone_causal = False
    prepare_on_host = True  # pairs are cut from the documents' boundaries, read on the host
    label_key = ""
    hf_heads = {"pooler": "pooler", "mlm": "mlm.head"}
    other_heads = ("classifier",)  # SOP's (ALBERT's checkpoints keep theirs out of fastpt's conversion)

    # NSP and SOP share this signature (assemble reads it as their config schema); see NSP's docstring.
    def __init__(self, *, hidden_size: int, cls_token_id: int, sep_token_id: int, pad_token_id: int = 0,
                 vocab_size: int | None = None, mask_token_id: int | None = None, mask_prob: float = 0.15,
                 replace_prob: float = 0.8, random_prob: float = 0.1, special_token_ids: tuple[int, ...] = (),
                 tie_word_embeddings: bool = True, activation: str = "gelu", layer_norm_eps: float | None = None,
                 log_accuracy: bool = False):
        super().__init__()
        positive("hidden_size", hidden_size, integer=True)
        if vocab_size is not None:
            positive("vocab_size", vocab_size, integer=True)
        # the ids prepare writes into the rows: inside the backbone's vocabulary when it is known
        for name, v in (("cls_token_id", cls_token_id), ("sep_token_id", sep_token_id), ("pad_token_id", pad_token_id)):
            check_token_id(name, v, vocab_size)
        self.cls_token_id, self.sep_token_id, self.pad_token_id = cls_token_id, sep_token_id, pad_token_id
        self.pooler = Pooler(hidden_size)
        self.classifier = init_weights(nn.Linear(hidden_size, 2))  # BERT's: normal(0, 0.02), bias 0
        self.mlm = None
        if mask_token_id is not None:
            if vocab_size is None:
                raise ValueError("vocab_size: required with mask_token_id (the MLM part)")
            specials = (cls_token_id, sep_token_id, pad_token_id, *special_token_ids)
            self.mlm = MLM(hidden_size=hidden_size, vocab_size=vocab_size, mask_token_id=mask_token_id,
                           mask_prob=mask_prob, replace_prob=replace_prob, random_prob=random_prob,
                           special_token_ids=tuple(sorted(set(specials))), tie_word_embeddings=tie_word_embeddings,
                           activation=activation, layer_norm_eps=layer_norm_eps, log_accuracy=log_accuracy)

    def attach(self, backbone: nn.Module) -> None:
        """Check the backbone has the two segment types ``prepare`` writes (ValueError naming
        backbone.type_vocab_size: RoBERTa-style configs have 1, GPT-2-style 0; found at build, not at the
        first step); tie the MLM part's head."""
        types = _type_vocab_size(backbone)
        if types is not None and types < 2:
            name = type(self).__name__.lower()
            raise ValueError(f"backbone.type_vocab_size: {name} writes token type 1 on segment B (type 0 on "
                             f"[CLS] A [SEP]) and needs a backbone with 2 segment types (type_vocab_size >= 2), "
                             f"got type_vocab_size {types}: build the backbone with type_vocab_size: 2")
        if self.mlm is not None:
            self.mlm.attach(backbone)
        self._attached = True

    def _check_labels(self, labels, input_ids) -> torch.Tensor:
        """The pair labels as int64 ``(B,)``: an integer tensor, one label per row of ``input_ids``,
        each 0, 1 or -100 (ignored); TypeError / ValueError naming the key otherwise."""
        key = self.label_key
        labels = check_ids(key, labels, ndim=(1,))
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and labels.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{key}: expected shape ({input_ids.shape[0]},) (one label per row of input_ids), "
                             f"got {tuple(labels.shape)}")
        bad = (labels != 0) & (labels != 1) & (labels != -100)
        if bool(bad.any()):
            raise ValueError(f"{key}: expected labels 0, 1 or -100 (ignored), found {int(labels[bad][0])}")
        return labels.long()

    def _pairs(self, lengths, cut, flip, g) -> tuple[tuple, torch.Tensor]:
        """Segments ``(a_row, a_start, a_len, b_row, b_start, b_len)`` (int64 (B,), CPU) and the labels."""
        raise NotImplementedError

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Sentence pairs and their labels (and the MLM masks when enabled), from ``seed``."""
        seed = check_seed(seed)
        where = f"{type(self).__name__}.prepare"
        require(batch, self.needs, where)
        refuse_prefix_lens(batch, f"the {type(self).__name__.lower()} objective")
        ids = check_ids("input_ids", batch["input_ids"])
        if batch.get("cu_seqlens") is not None:  # packed rows: the pair comes from one document's piece
            lengths, offset = longest_pieces(batch["cu_seqlens"], ids)
        else:
            lengths = row_lengths("attention_mask", batch.get("attention_mask"), ids)
            offset = torch.zeros_like(lengths)
        # [CLS] A [SEP] B [SEP] must fit the row's S positions: keep at most S - 3 tokens of each row
        lengths = lengths.clamp(max=max(ids.shape[1] - 3, 0))
        g = seeded(seed)
        cut = torch.where(lengths < 2, lengths,
                          1 + (torch.rand(len(lengths), generator=g, dtype=torch.float64) * (lengths - 1)).long())
        flip = (torch.rand(len(lengths), generator=g) < 0.5) & (cut < lengths) & (cut > 0)
        (a_row, a_start, a_len, b_row, b_start, b_len), label = self._pairs(lengths, cut, flip, g)
        parts = (a_row, a_start + offset[a_row], a_len, b_row, b_start + offset[b_row], b_len)
        pairs = build_pairs(ids, *(t.to(ids.device) for t in parts), cls_id=self.cls_token_id,
                            sep_id=self.sep_token_id, pad_id=self.pad_token_id)
        pairs[self.label_key] = label.to(ids.device)
        if self.mlm is not None:
            pairs = self.mlm.prepare(pairs, seed=seed)
        return pairs

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """Pair classification loss (+ MLM loss) from one backbone pass (run ``prepare`` first)."""
        keys = ("input_ids", self.label_key) + (("labels",) if self.mlm is not None else ())
        require(batch, keys, f"{type(self).__name__}.forward (run prepare first)")
        target = self._check_labels(batch[self.label_key], batch["input_ids"])
        self._ensure_attached(backbone)
        h = encode_text(backbone, batch, causal=False,
                        objective=f"the {type(self).__name__.lower()} objective").last_hidden_state
        logits = self.classifier(self.pooler(h))
        # mean over the labelled rows; 0 (not NaN) when every label is -100, as the token losses
        valid = target != -100
        n = valid.sum().clamp(min=1)
        pair_loss = F.cross_entropy(upcast(logits), target, ignore_index=-100, reduction="sum") / n
        name = self.label_key.split("_label")[0]
        hits = (logits.detach().argmax(-1) == target) & valid
        metrics = {f"{name}_loss": pair_loss.detach(), f"{name}_accuracy": hits.sum() / n}
        loss = pair_loss
        if self.mlm is not None:
            mlm_loss, mlm_metrics = self.mlm.loss_from_hidden(h, batch["labels"])
            loss = loss + mlm_loss
            metrics.update(mlm_metrics)
        return ObjectiveOutput(loss, metrics, logits, h)

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """The backbone on every token; the pooler and pair classifier once per row of ``seq_len`` tokens,
        the MLM head on the masked ``mask_prob`` of them (one weight for all the heads, by their sizes)."""
        from ..models.model import _matmul_params

        pair = _matmul_params(self.pooler, trainable=True) + _matmul_params(self.classifier, trainable=True)
        mlm = _matmul_params(self.mlm, trainable=True) if self.mlm is not None else 0
        per_token = (self.mlm.mask_prob * mlm if self.mlm is not None else 0.0) + (pair / seq_len if seq_len else 0.0)
        return {"backbone": 1.0, "heads": per_token / max(pair + mlm, 1)}


def _type_vocab_size(backbone: nn.Module) -> int | None:
    """The segment types of a ``TextEncoder``'s embedding (0 without a table), None for a backbone without one."""
    embeddings = getattr(backbone, "embeddings", None)
    if not hasattr(embeddings, "token_type_embeddings"):
        return None
    table = embeddings.token_type_embeddings
    return 0 if table is None else int(table.num_embeddings)


class NSP(_SentencePair):
    """BERT's next-sentence prediction (+ MLM when ``mask_token_id`` is given).

    Args:
        hidden_size: the backbone's width D. vocab_size: V (needed for MLM).
        cls_token_id, sep_token_id, pad_token_id: the special tokens written around the pairs.
        mask_token_id: enables MLM on the pairs (None: the pair loss alone); mask_prob,
            replace_prob, random_prob, special_token_ids, tie_word_embeddings, activation, layer_norm_eps:
            the MLM part's (``MLM``: its head's tying and transform; ``from_hf``, and ``init_from`` a
            Hugging Face checkpoint, set them to the checkpoint's head).
        log_accuracy: the MLM part's masked-token accuracy (the pair accuracy is always reported).

    Batch: raw ``{"input_ids" (B, S), "attention_mask" (B, S) optional}`` (rows from different
    documents, no special tokens), or packed rows with ``cu_seqlens`` (document offsets over the B * S
    tokens: each row's longest document piece is used); ``prepare`` returns input_ids, attention_mask, token_type_ids,
    special_tokens_mask, ``next_sentence_label`` (B,) and, with MLM, labels, at most S wide (a row's
    tokens past S - 3 are dropped to make room for [CLS] and the two [SEP]). Needs B >= 2 for
    random pairs (with B == 1 every pair is a true continuation).

    The backbone needs ``type_vocab_size >= 2`` (``attach``, so ``build``, raises ValueError naming it) and
    runs bidirectionally whatever its ``causal`` default (on a causal stack the pooled first token would see
    only ``[CLS]``: every pair the same logits).
    """

    label_key = "next_sentence_label"
    batch_keys = TEXT_BATCH + (label_key,)
    hf_heads = {"pooler": "pooler", "nsp": "classifier", "mlm": "mlm.head"}

    def _pairs(self, lengths, cut, flip, g):
        n = len(lengths)
        rows = torch.arange(n)
        # The random B comes from another row: i + k (mod n), k uniform in [1, n - 1].
        other = (rows + 1 + (torch.rand(n, generator=g, dtype=torch.float64) * max(n - 1, 1)).long()) % max(n, 1)
        other_len = (lengths[other] - cut[other]).clamp(max=lengths - cut)
        rand = flip & (n > 1) & (other_len > 0)
        b_row, b_start = torch.where(rand, other, rows), torch.where(rand, cut[other], cut)
        b_len = torch.where(rand, other_len, lengths - cut)
        return (rows, torch.zeros_like(cut), cut, b_row, b_start, b_len), rand.long()


class SOP(_SentencePair):
    """ALBERT's sentence-order prediction (+ MLM when ``mask_token_id`` is given).

    Same arguments and batch as ``NSP``; the label is ``sentence_order_label`` (B,): 0 in order,
    1 swapped. Works for any batch size.
    """

    label_key = "sentence_order_label"
    batch_keys = TEXT_BATCH + (label_key,)

    def _pairs(self, lengths, cut, flip, g):
        rows, zero = torch.arange(len(lengths)), torch.zeros_like(cut)
        a_start, a_len = torch.where(flip, cut, zero), torch.where(flip, lengths - cut, cut)
        b_start, b_len = torch.where(flip, zero, cut), torch.where(flip, cut, lengths - cut)
        return (rows, a_start, a_len, rows, b_start, b_len), flip.long()
