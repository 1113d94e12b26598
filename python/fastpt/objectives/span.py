"""T5 span corruption and UL2's mixture of denoisers on an ``EncoderDecoder`` backbone.

``prepare`` turns raw rows into encoder inputs and decoder targets with ``fastpt.ops.span_corrupt``
(T5: 15% noise, mean span 3, one sentinel per span) or ``fastpt.ops.ul2_denoise`` (one R / X / S
denoiser per row, optionally a [NLU] / [NLG] / [S2S] paradigm token first), then builds the
teacher-forcing decoder input (targets shifted right after ``decoder_start_id``)::

    inputs   a b <s0> e f <s1> EOS          -> input_ids, attention_mask
    targets  <s0> c d <s1> g h EOS          -> labels (-100 after EOS)
    decoder  START <s0> c d <s1> g h        -> decoder_input_ids, decoder_attention_mask

The LM head (tied to ``backbone.shared`` by default) runs only on target rows through
``fastpt.ops.linear_cross_entropy``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import (Denoiser, UL2_DENOISERS, _validate, linear_cross_entropy, span_corrupt, span_corrupt_lengths,
                   ul2_denoise)
from ..models.heads import LMHead
from .base import (Objective, ObjectiveOutput, check_ids, check_seed, check_token_id, fraction,
                   head_accuracy, positive, require, row_lengths, want_logits)

SEQ2SEQ_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels")


def seq2seq_batch(inputs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
                  target_lengths: torch.Tensor, decoder_start_id: int) -> dict:
    """Encoder / decoder tensors from padded ``inputs (B, S')`` and ``targets (B, T)`` and their lengths."""
    dev = inputs.device
    in_len, tgt_len = input_lengths.to(dev).unsqueeze(1), target_lengths.to(dev).unsqueeze(1)
    attention_mask = (torch.arange(inputs.shape[1], device=dev) < in_len).long()
    dec_mask = (torch.arange(targets.shape[1], device=dev) < tgt_len).long()
    labels = targets.to(torch.int64).masked_fill(dec_mask == 0, -100)
    start = torch.full_like(targets[:, :1], decoder_start_id)
    decoder_input_ids = torch.cat([start, targets[:, :-1]], 1)
    return dict(input_ids=inputs, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=dec_mask, labels=labels)


class _Seq2SeqLM(Objective):
    """Shared head, attach and loss of the encoder-decoder objectives."""

    needs = ("input_ids",)
    batch_keys = SEQ2SEQ_KEYS + ("return_logits",)
    # an untied LM head is drawn with the backbone's initializer_range (init_heads), as its embedding is
    other_heads = ("head",)
    # span_corrupt / ul2_denoise are C++ on the host (the plan is made there): the recipe prepares CPU batches
    prepare_on_host = True

    def __init__(self, hidden_size, vocab_size, sentinel_start_id, eos_id, pad_id, decoder_start_id,
                 tie_word_embeddings, return_logits, log_accuracy):
        super().__init__()
        self.hidden_size = positive("hidden_size", hidden_size, integer=True)
        self.vocab_size = positive("vocab_size", vocab_size, integer=True)
        ids = dict(sentinel_start_id=vocab_size - 1 if sentinel_start_id is None else sentinel_start_id,
                   eos_id=eos_id, pad_id=pad_id,
                   decoder_start_id=pad_id if decoder_start_id is None else decoder_start_id)
        for name, v in ids.items():
            check_token_id(name, v, vocab_size)
        self.sentinel_start_id, self.eos_id, self.pad_id = ids["sentinel_start_id"], eos_id, pad_id
        self.decoder_start_id = ids["decoder_start_id"]
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.return_logits, self.log_accuracy = bool(return_logits), bool(log_accuracy)
        self.head = LMHead(hidden_size, vocab_size)

    def attach(self, backbone: nn.Module) -> None:
        """Tie the LM head to ``backbone.shared`` (when asked)."""
        if self.tie_word_embeddings and not self._attached:
            self.head = LMHead(self.hidden_size, self.vocab_size, tied_weight=backbone.shared.weight)
        self._attached = True

    def _raw(self, batch: dict, seed: int, where: str):
        check_seed(seed)
        require(batch, self.needs, where)
        ids = check_ids("input_ids", batch["input_ids"])
        _validate.ids_in_range("input_ids", ids, self.vocab_size, "vocab_size")
        return ids, row_lengths("attention_mask", batch.get("attention_mask"), ids)

    def _check_batch(self, batch: dict) -> None:
        """The decoder tensors fit each other and the encoder rows (before the backbone runs)."""
        enc = batch["input_ids"]
        dec = check_ids("decoder_input_ids", batch["decoder_input_ids"])
        if isinstance(enc, torch.Tensor) and enc.dim() == 2 and dec.shape[0] != enc.shape[0]:
            raise ValueError(f"decoder_input_ids: expected {enc.shape[0]} rows (those of input_ids), "
                             f"got shape {tuple(dec.shape)}")
        for key in ("decoder_attention_mask", "labels"):
            t = batch[key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{key}: expected a torch.Tensor of shape {tuple(dec.shape)}, got {type(t).__name__}")
            if t.shape != dec.shape:
                raise ValueError(f"{key}: expected the shape of decoder_input_ids {tuple(dec.shape)}, "
                                 f"got {tuple(t.shape)}")

    def forward(self, backbone: nn.Module, batch: dict) -> ObjectiveOutput:
        """Teacher-forced decoder loss on the target tokens (run ``prepare`` first, or pass ``SEQ2SEQ_KEYS``)."""
        require(batch, SEQ2SEQ_KEYS, f"{type(self).__name__}.forward (run prepare first)")
        self._check_batch(batch)
        self._ensure_attached(backbone)
        out = backbone(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                       batch["decoder_attention_mask"])
        h, labels = out.last_hidden_state, batch["labels"]
        sel = labels != -100
        hm, y = h[sel], labels[sel]
        loss, lse = linear_cross_entropy(hm, self.head.weight, y, bias=self.head.bias, return_lse=True)
        metrics = {"loss": loss.detach()}
        if self.log_accuracy:
            metrics["accuracy"] = head_accuracy(hm.detach(), self.head.weight, self.head.bias, y)
        metrics.update(self._extra_metrics(batch, sel, hm.detach(), y, lse))
        logits = self.head(h) if want_logits(batch, self.return_logits) else None
        return ObjectiveOutput(loss, metrics, logits, out.encoder_last_hidden_state)

    def _extra_metrics(self, batch, sel, hm, y, lse) -> dict:
        return {}

    def loss_weight(self, batch: dict) -> torch.Tensor | None:
        """The target tokens the loss averages over."""
        return None if batch.get("labels") is None else (batch["labels"] != -100).sum()

    def _shares(self) -> tuple[float, float]:
        """(encoder, decoder) tokens per raw token: span corruption at noise density d, mean span m keeps
        1 - d of the row plus a sentinel per span (d / m) for the encoder, the d noise plus as many
        sentinels for the decoder."""
        d, m = self.noise_density, self.mean_span_len
        return 1 - d + d / m, d + d / m

    def flops_weights(self, backbone: nn.Module, seq_len: int | None) -> dict[str, float]:
        """The encoder and the decoder (with the LM head) on their shares of a raw token (``_shares``)."""
        enc, dec = self._shares()
        return {"encoder": enc, "decoder": dec, "heads": dec}

    def tokens_in(self, batch: dict) -> int:
        """Encoder plus decoder tokens of a prepared batch (the raw batch's tokens before ``prepare``)."""
        n = super().tokens_in(batch)
        if batch.get("decoder_attention_mask") is not None:
            n += int(batch["decoder_attention_mask"].sum())
        return n


class T5SpanCorruption(_Seq2SeqLM):
    """T5's span-corruption objective.

    Args:
        hidden_size, vocab_size: the backbone's width D and vocabulary V.
        noise_density, mean_span_len: fraction of tokens corrupted and mean span length.
        sentinel_start_id: first sentinel id (``<extra_id_0>``), the next spans count down (None:
            ``vocab_size - 1``, where ``fastpt preprocess --sentinels`` puts it; ``build`` fills it from the
            tokenizer's ``special_ids["sentinel"]``: T5's is 32099 of 32128).
        eos_id, pad_id: EOS appended to inputs and targets, padding (T5: 1 and 0).
        decoder_start_id: first decoder input id (None: ``pad_id``, as T5).
        tie_word_embeddings: the LM head's matrix is ``backbone.shared`` (set by ``attach``); an untied one is
            drawn from normal(0, the backbone's ``initializer_range``), as the embedding is.
        return_logits: also return the decoder logits ``(B, T, V)``. log_accuracy: target-token accuracy.

    Batch: raw ``{"input_ids" (B, S), "attention_mask" (B, S) optional}``; ``prepare`` returns
    ``SEQ2SEQ_KEYS`` (input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels).
    """

    def __init__(self, *, hidden_size: int, vocab_size: int, noise_density: float = 0.15, mean_span_len: float = 3.0,
                 sentinel_start_id: int | None = None, eos_id: int = 1, pad_id: int = 0,
                 decoder_start_id: int | None = None, tie_word_embeddings: bool = True, return_logits: bool = False,
                 log_accuracy: bool = False):
        super().__init__(hidden_size, vocab_size, sentinel_start_id, eos_id, pad_id, decoder_start_id,
                         tie_word_embeddings, return_logits, log_accuracy)
        self.noise_density = fraction("noise_density", noise_density)
        if isinstance(mean_span_len, bool) or not isinstance(mean_span_len, (int, float)) or not mean_span_len >= 1:
            raise ValueError(f"mean_span_len: expected a number >= 1, got {mean_span_len!r}")
        self.mean_span_len = float(mean_span_len)

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Span-corrupt every row (a pure function of the ids and ``seed``)."""
        ids, seqlens = self._raw(batch, seed, "T5SpanCorruption.prepare")
        rates = dict(noise_density=self.noise_density, mean_span_len=self.mean_span_len)
        inputs, targets = span_corrupt(ids, seqlens, sentinel_start_id=self.sentinel_start_id, eos_id=self.eos_id,
                                           pad_id=self.pad_id, seed=seed, **rates)
        in_len, tgt_len = span_corrupt_lengths(seqlens, **rates)
        return seq2seq_batch(inputs, targets, in_len, tgt_len, self.decoder_start_id)


class UL2(_Seq2SeqLM):
    """UL2's mixture of denoisers (R: regular spans, X: extreme, S: prefix-LM), one per row.

    Args:
        hidden_size, vocab_size, sentinel_start_id, eos_id, pad_id, decoder_start_id,
        tie_word_embeddings, return_logits, log_accuracy: as ``T5SpanCorruption``.
        denoisers: ``(mode, mean_span_len, noise_density)`` triples (S: ``("S", None, None)``);
            default the paper's seven (``fastpt.UL2_DENOISERS``).
        weights: one non-negative weight per denoiser (None: uniform).
        mode_token_ids: paradigm token per mode, e.g. ``{"R": 5, "X": 6, "S": 7}`` ([NLU], [NLG],
            [S2S]), prepended to each row's inputs; None: no paradigm tokens.

    Batch: as ``T5SpanCorruption``; ``prepare`` also adds ``denoiser`` (int64 ``(B,)``, index into
    ``denoisers``). Metrics add ``loss_<mode>``, the target-token loss of the rows of each mode
    present in the batch.
    """

    batch_keys = _Seq2SeqLM.batch_keys + ("denoiser",)

    def __init__(self, *, hidden_size: int, vocab_size: int,
                 denoisers: tuple[tuple[str, float | None, float | None], ...] = UL2_DENOISERS,
                 weights: tuple[float, ...] | None = None, mode_token_ids: dict | None = None,
                 sentinel_start_id: int | None = None, eos_id: int = 1, pad_id: int = 0,
                 decoder_start_id: int | None = None, tie_word_embeddings: bool = True, return_logits: bool = False,
                 log_accuracy: bool = False):
        super().__init__(hidden_size, vocab_size, sentinel_start_id, eos_id, pad_id, decoder_start_id,
                         tie_word_embeddings, return_logits, log_accuracy)
        try:
            self.denoisers = tuple(Denoiser(*d) for d in denoisers)
        except TypeError:
            raise TypeError(f"denoisers: expected (mode, mean_span_len, noise_density) triples, "
                            f"got {denoisers!r}") from None
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.mode_token_ids = None if mode_token_ids is None else dict(mode_token_ids)
        self.modes = sorted({d.mode for d in self.denoisers})
        # Validate everything (denoisers, weights, mode tokens) once, on a one-row dummy batch.
        with torch.device("cpu"):  # data, not parameters: also when a meta / CUDA device is the default
            self._denoise(torch.full((1, 4), eos_id, dtype=torch.int64), None, 0)
        for mode, v in (self.mode_token_ids or {}).items():  # written into the inputs: inside the vocabulary
            check_token_id(f"mode_token_ids[{mode!r}]", v, vocab_size)

    def _shares(self) -> tuple[float, float]:
        """(encoder, decoder) tokens per raw token, averaged over the mixture (by its weights): R / X rows as
        span corruption, S rows split at a uniform point (half and half on average)."""
        weights = self.weights or (1.0,) * len(self.denoisers)
        enc = dec = 0.0
        for den, w in zip(self.denoisers, weights):
            if den.mode == "S":
                e, d = 0.5, 0.5
            else:
                nd, m = den.noise_density, den.mean_span_len
                e, d = 1 - nd + nd / m, nd + nd / m
            enc, dec = enc + w * e, dec + w * d
        total = sum(weights)
        return enc / total, dec / total

    def _denoise(self, ids, seqlens, seed):
        return ul2_denoise(ids, seqlens, sentinel_start_id=self.sentinel_start_id, eos_id=self.eos_id,
                               pad_id=self.pad_id, mode_token_ids=self.mode_token_ids, denoisers=self.denoisers,
                               weights=self.weights, seed=seed)

    def prepare(self, batch: dict, *, seed: int) -> dict:
        """Pick a denoiser per row and apply it (a pure function of the ids and ``seed``)."""
        ids, seqlens = self._raw(batch, seed, "UL2.prepare")
        out = self._denoise(ids, seqlens, seed)
        prepared = seq2seq_batch(out.inputs, out.targets, out.input_lengths, out.target_lengths, self.decoder_start_id)
        return {**prepared, "denoiser": out.denoiser}

    def _check_batch(self, batch: dict) -> None:
        super()._check_batch(batch)
        d = batch.get("denoiser")
        if d is None:
            return
        rows = batch["labels"].shape[0]
        d = check_ids("denoiser", d, ndim=(1,))
        if d.shape[0] != rows:
            raise ValueError(f"denoiser: expected shape ({rows},) (one denoiser index per row), got {tuple(d.shape)}")
        bad = (d < 0) | (d >= len(self.denoisers))
        if bool(bad.any()):
            raise ValueError(f"denoiser: expected indices into the {len(self.denoisers)} denoisers "
                             f"[0, {len(self.denoisers)}), found {int(d[bad][0])}")

    def _extra_metrics(self, batch, sel, hm, y, lse) -> dict:
        if batch.get("denoiser") is None:
            return {}
        with torch.no_grad():
            w = self.head.weight.detach()
            z = (hm * w[y]).sum(-1).float()
            if self.head.bias is not None:
                z = z + self.head.bias.detach()[y].float()
            token_loss = lse.float() - z
            mode_of = torch.tensor([self.modes.index(d.mode) for d in self.denoisers], device=y.device)
            row_mode = mode_of[batch["denoiser"].to(y.device)]
            token_mode = row_mode.unsqueeze(1).expand_as(sel)[sel]
            out = {}
            for i, mode in enumerate(self.modes):
                pick = token_mode == i
                if bool(pick.any()):
                    out[f"loss_{mode}"] = token_loss[pick].mean()
        return out
