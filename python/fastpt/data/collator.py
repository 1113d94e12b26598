"""``MLMCollator``: a drop-in for transformers' ``DataCollatorForLanguageModeling`` on fastpt's masking kernel.

Same constructor arguments, input forms and output keys as the Hugging Face
collator (transformers 5.x), same distribution of masks; the work is one call of
:func:`fastpt.ops.mlm_mask` instead of several ``torch.bernoulli`` passes and a
Python loop over rows for the special-tokens mask.

What differs, on purpose:

* Randomness is counter-based. With ``seed=s`` the masks of the ``n``-th call in
  a process are a pure function of ``(s, worker, epoch of that worker, n)``: every
  call differs, every DataLoader worker differs, workers re-created for a new
  epoch continue instead of repeating the previous epoch, and rerunning the same
  program reproduces every batch. With ``seed=None`` each call draws its seed
  from torch's global generator, so ``torch.manual_seed`` governs it (as it does
  Hugging Face's collator, and DataLoader workers get distinct streams).
* ``whole_word_mask=True`` takes word boundaries from a ``"word_ids"`` key in the
  examples (``Encoding.word_ids()``, ``None`` for special tokens), else from
  ``"offset_mapping"`` (Hugging Face's rule), else from WordPiece continuation
  pieces (``"##..."``). It keeps ``mask_replace_prob`` / ``random_replace_prob``
  (the 80/10/10 split per token, as in the original BERT whole-word masking)
  where Hugging Face 5.x forces every selected token to ``[MASK]``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from ..ops import mlm_mask

# The keys tokenizer.pad knows how to pad. Examples made only of these are padded here instead
# (same result, ~15x faster than tokenizer.pad on 256 x 512 lists of ids).
_PADDABLE = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")
_M64 = (1 << 64) - 1
# Per-worker-id epoch counters live in one shared tensor; ids beyond this share slots
# (their seeds still differ because the worker id itself is hashed in).
_GENERATION_SLOTS = 1024


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: spreads a 64-bit counter into an independent-looking 64-bit seed."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@dataclass(eq=False)
class MLMCollator:
    """Collate tokenised examples into a padded batch with MLM (or causal-LM) labels.

    Args (as transformers' ``DataCollatorForLanguageModeling``):
        tokenizer: a Hugging Face tokenizer (needs ``pad_token_id`` to pad, ``mask_token_id`` for MLM,
            ``all_special_ids``, ``padding_side``, ``len()``).
        mlm: True for masked-LM labels; False for causal-LM labels (a copy of ``input_ids`` with
            padding set to -100, no masking).
        whole_word_mask: select whole words instead of single tokens (see the module docstring for
            where word boundaries come from).
        mlm_probability: probability that a non-special token (or word) is selected for prediction.
        mask_replace_prob: fraction of selected tokens replaced by the mask token.
        random_replace_prob: fraction of selected tokens replaced by a uniformly random id in
            ``[0, len(tokenizer))``; the rest keep their id. Both fractions are of *all* selected
            tokens, as Hugging Face's arguments mean (it rescales the second to the remainder).
        pad_to_multiple_of: pad the sequence length up to a multiple of this.
        return_tensors: "pt" (torch tensors) or "np" (numpy arrays).
        seed: None (draw from torch's global RNG) or an int in ``[0, 2**64)`` for a reproducible,
            counter-based stream of masks.
        backend: the ``mlm_mask`` backend (None picks the fastest for the batch's device).

    Call with a list of examples: dicts holding ``input_ids`` (lists, numpy arrays or 1-D tensors)
    and optionally ``attention_mask``, ``token_type_ids``, ``special_tokens_mask``, ``word_ids``,
    ``offset_mapping`` or other keys tokenizer.pad accepts; or plain lists / 1-D tensors of ids.

    Returns:
        For dict examples a ``BatchEncoding`` with the padded keys of the examples (``(B, L)``
        int64), ``attention_mask`` if the tokenizer uses one, and ``labels`` ``(B, L)`` int64 (-100
        where there is nothing to predict); ``special_tokens_mask``, ``offset_mapping`` and
        ``word_ids`` are consumed. For list examples a dict with ``input_ids`` and ``labels``.
        Selected tokens and labels never fall on special tokens or padding.

    Raises:
        ValueError: at construction for probabilities outside [0, 1], ``mask_replace_prob +
            random_replace_prob > 1``, a tokenizer without mask token when ``mlm=True``,
            ``whole_word_mask`` without ``mlm``, an unknown ``return_tensors``, a bad
            ``pad_to_multiple_of`` or seed; at call time for an empty batch, examples of different
            lengths with a tokenizer that has no pad token, ``word_ids`` / ``offset_mapping`` that do
            not match ``input_ids``, or ids outside ``[0, len(tokenizer))``.
    """

    tokenizer: object
    mlm: bool = True
    whole_word_mask: bool = False
    mlm_probability: float | None = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    seed: int | None = None
    backend: str | None = None
    _calls: int = field(default=0, init=False, repr=False)
    _pid: int = field(default=0, init=False, repr=False)
    _generation: int = field(default=0, init=False, repr=False)
    _stream: int = field(default=0, init=False, repr=False)
    _generations: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        tok = self.tokenizer
        if self.mlm:
            if getattr(tok, "mask_token_id", None) is None:
                raise ValueError(
                    "tokenizer: has no mask token, which masked language modelling needs; "
                    "pass mlm=False for causal language modelling"
                )
            self.mlm_probability = _probability("mlm_probability", self.mlm_probability)
        elif self.whole_word_mask:
            raise ValueError("whole_word_mask: needs mlm=True")
        self.mask_replace_prob = _probability("mask_replace_prob", self.mask_replace_prob)
        self.random_replace_prob = _probability("random_replace_prob", self.random_replace_prob)
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-12:
            raise ValueError(
                "mask_replace_prob + random_replace_prob: expected <= 1, got "
                f"{self.mask_replace_prob} + {self.random_replace_prob}"
            )
        if self.pad_to_multiple_of is not None and (
            isinstance(self.pad_to_multiple_of, bool) or not isinstance(self.pad_to_multiple_of, int)
            or self.pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of: expected None or an int >= 1, got {self.pad_to_multiple_of!r}")
        _check_return_tensors(self.return_tensors)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed: expected None or an int in [0, 2**64), got {self.seed!r}")
        ids = set(int(i) for i in getattr(tok, "all_special_ids", ()))
        if getattr(tok, "pad_token_id", None) is not None:
            ids.add(int(tok.pad_token_id))
        self._special_ids = sorted(ids)
        self._continuation = None  # WordPiece "##" table, built on first whole-word call
        self._pid = os.getpid()
        # Shared with DataLoader workers (fork or spawn): counts how many processes have served
        # each worker id, so re-created workers start a fresh stream instead of repeating an epoch.
        self._generations = torch.zeros(_GENERATION_SLOTS, dtype=torch.int64).share_memory_()

    # ------------------------------------------------------------------ public

    def __call__(self, features, return_tensors: str | None = None):
        return_tensors = _check_return_tensors(return_tensors or self.return_tensors)
        if len(features) == 0:
            raise ValueError("features: expected at least one example, got an empty batch")
        if isinstance(features[0], Mapping):
            features = list(features)
            word_ids = self._pop_ragged(features, "word_ids", fill=-1)
            offsets = self._pop_ragged(features, "offset_mapping", fill=0)
            batch = self._pad_fast(features)
            if batch is None:  # unusual keys or value types: let the tokenizer do exactly what HF does
                batch = dict(_tokenizer_pad(self.tokenizer, features, self.pad_to_multiple_of))
            batch = _batch_encoding(batch)
        else:
            word_ids = offsets = None
            batch = {"input_ids": self._collate_ids(features)}

        special_tokens_mask = batch.pop("special_tokens_mask", None)
        if self.mlm:
            batch["input_ids"], batch["labels"] = self.torch_mask_tokens(
                batch["input_ids"], special_tokens_mask=special_tokens_mask, offset_mapping=offsets, word_ids=word_ids
            )
        else:
            labels = batch["input_ids"].clone()
            if self.tokenizer.pad_token_id is not None:
                labels[labels == self.tokenizer.pad_token_id] = -100
            batch["labels"] = labels
        if return_tensors == "np":
            for k, v in batch.items():
                if isinstance(v, torch.Tensor):
                    batch[k] = v.numpy()
        return batch

    def torch_mask_tokens(self, inputs: torch.Tensor, special_tokens_mask: torch.Tensor | None = None,
                          offset_mapping: torch.Tensor | None = None, *, word_ids: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a padded ``(B, L)`` id tensor; returns ``(masked_ids, labels)`` (labels int64, -100 unmasked).

        Special tokens are ``special_tokens_mask`` ``(B, L)`` (nonzero = never mask) when given, as in
        Hugging Face's collator, else the tokenizer's ``all_special_ids``; padding is never masked
        either way. With ``whole_word_mask``, words come from ``word_ids`` ``(B, L)`` (``< 0`` = not a
        word), else ``offset_mapping`` ``(B, L, 2)``, else WordPiece ``##`` pieces. Unlike Hugging
        Face's method it returns new tensors and leaves ``inputs`` alone. Advances the seed counter.
        Raises ValueError / TypeError from :func:`fastpt.ops.mlm_mask` for bad ids or shapes.
        """
        words = self._word_ids(inputs, special_tokens_mask, word_ids, offset_mapping) if self.whole_word_mask else None
        if special_tokens_mask is not None:
            pad = self.tokenizer.pad_token_id
            special_ids = [pad] if pad is not None else None
        else:
            special_ids = self._special_ids
        if inputs.dtype not in (torch.int32, torch.int64):
            inputs = inputs.long()
        return mlm_mask(
            inputs, mask_token_id=self.tokenizer.mask_token_id, vocab_size=len(self.tokenizer),
            mask_prob=self.mlm_probability, replace_prob=self.mask_replace_prob,
            random_prob=self.random_replace_prob, special_tokens_mask=special_tokens_mask,
            special_token_ids=special_ids, word_ids=words, seed=self._next_seed(), backend=self.backend,
        )

    # ------------------------------------------------------------------ seeds

    def _next_seed(self) -> int:
        """The seed of this call: a hash of (seed, worker, worker generation, call counter)."""
        if self.seed is None:
            # Draw from torch's global generator: torch.manual_seed governs it, and DataLoader
            # seeds each worker's generator differently.
            return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        pid = os.getpid()
        if pid != self._pid:  # first call in a new process (a DataLoader worker, or a fork)
            self._pid, self._calls = pid, 0
            info = torch.utils.data.get_worker_info()
            if info is None:
                # Not a DataLoader worker: nothing identifies it reproducibly, but it must not
                # repeat its parent's stream.
                self._stream = (1 << 63) | pid
            else:
                slot = info.id % _GENERATION_SLOTS
                self._generation = int(self._generations[slot])
                self._generations[slot] += 1
                self._stream = (info.id + 1) | (self._generation << 32)
        n = self._calls
        self._calls += 1
        return _splitmix64(_splitmix64(_splitmix64(self.seed) ^ self._stream) ^ n)

    # ------------------------------------------------------------------ padding

    def _pad_fast(self, features) -> dict | None:
        """``tokenizer.pad(features, return_tensors="pt")`` for examples made only of the standard
        keys holding integer lists / arrays / 1-D tensors; None for anything else."""
        tok = self.tokenizer
        keys = list(features[0].keys())
        if "input_ids" not in keys or any(k not in _PADDABLE for k in keys):
            return None
        if getattr(tok, "model_input_names", ["input_ids"])[0] != "input_ids":
            return None
        wants_mask = "attention_mask" in getattr(tok, "model_input_names", ())
        if "attention_mask" in keys and not wants_mask:
            return None  # tokenizer.pad would leave it unpadded
        if any(f.keys() != features[0].keys() for f in features):
            return None
        lengths = [len(f["input_ids"]) for f in features]
        flat = {}
        for k in keys:
            column = [f[k] for f in features]
            if k != "input_ids" and [len(v) for v in column] != lengths:
                return None
            flat[k] = _concat_ints(column)
            if flat[k] is None:
                return None
        valid, length = self._layout(lengths)
        pad_values = {"input_ids": tok.pad_token_id, "attention_mask": 0,
                      "token_type_ids": getattr(tok, "pad_token_type_id", 0), "special_tokens_mask": 1}
        out = {k: _place(flat[k], valid, len(features), length, pad_values[k]) for k in keys}
        if wants_mask and "attention_mask" not in out:
            out["attention_mask"] = (torch.ones(len(features), length, dtype=torch.int64) if valid is None
                                     else valid.to(torch.int64))
        return out

    def _layout(self, lengths: list[int]) -> tuple[torch.Tensor | None, int]:
        """(B, L) bool of real positions after padding (None when nothing is padded), and L.

        Raises ValueError when padding is needed and the tokenizer has no pad token."""
        length = max(lengths)
        m = self.pad_to_multiple_of
        if m is not None and length % m:
            length = (length // m + 1) * m
        if all(n == length for n in lengths):
            return None, length
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer: has no pad token, so examples of different lengths "
                             f"{sorted(set(lengths))[:5]} cannot be padded (set tokenizer.pad_token)")
        pos = torch.arange(length)
        lens = torch.tensor(lengths).unsqueeze(1)
        valid = pos >= length - lens if self.tokenizer.padding_side == "left" else pos < lens
        return valid, length

    def _collate_ids(self, examples) -> torch.Tensor:
        """Hugging Face's ``_torch_collate_batch``: lists become int64, tensors keep their dtype."""
        if isinstance(examples[0], torch.Tensor):
            flat = torch.cat([e.reshape(-1) for e in examples]).to(examples[0].dtype)
        else:
            flat = _concat_ints(examples)
            if flat is None:
                flat = torch.tensor(list(chain.from_iterable(examples)), dtype=torch.int64)
        lengths = [len(e) for e in examples]
        valid, length = self._layout(lengths)
        return _place(flat, valid, len(examples), length, self.tokenizer.pad_token_id)

    def _pop_ragged(self, features, key: str, fill: int) -> torch.Tensor | None:
        """Remove ``key`` from every example and pad it like input_ids: ``(B, L)`` or ``(B, L, 2)``."""
        if key not in features[0]:
            return None
        lengths = [len(f["input_ids"]) for f in features]
        values = []
        for i, f in enumerate(features):
            f = dict(f)
            v = f.pop(key)
            features[i] = f
            if len(v) != lengths[i]:
                raise ValueError(f"{key}: example {i} has {len(v)} entries for {lengths[i]} input_ids")
            values.append(v)
        if key == "word_ids":
            flat = torch.tensor([-1 if w is None else int(w) for w in chain.from_iterable(values)], dtype=torch.int64)
        else:
            flat = torch.from_numpy(np.concatenate([np.asarray(v, dtype=np.int64).reshape(-1, 2) for v in values]))
        valid, length = self._layout(lengths)
        return _place(flat, valid, len(features), length, fill)

    # ------------------------------------------------------------------ whole words

    def _word_ids(self, ids, special_tokens_mask, word_ids, offsets) -> torch.Tensor:
        """``(B, L)`` int64 word index per token, -1 on special tokens and padding.

        Consecutive tokens with the same given word id form one word; runs are renumbered so that
        pair inputs (whose ``word_ids()`` restart at 0 in the second sequence) and padding never
        tie two different words together.
        """
        if special_tokens_mask is not None:  # the examples' own mask replaces all_special_ids, as in HF
            special = special_tokens_mask.bool()
            if self.tokenizer.pad_token_id is not None:
                special = special | (ids == self.tokenizer.pad_token_id)
        else:
            special = torch.isin(ids, torch.tensor(self._special_ids, dtype=ids.dtype, device=ids.device))
        prev_special = torch.ones_like(special)
        prev_special[:, 1:] = special[:, :-1]
        if word_ids is not None:
            w = word_ids
            prev = torch.full_like(w, -1)
            prev[:, 1:] = w[:, :-1]
            new_word = w != prev
            inside = (w >= 0) & ~special
        elif offsets is not None:
            # Hugging Face's rule: a token starts a word when it does not touch the previous one.
            prev_end = torch.full_like(offsets[..., 1], -1)
            prev_end[:, 1:] = offsets[:, :-1, 1]
            new_word = offsets[..., 0] != prev_end
            inside = ~special
        else:
            cont = self._continuation_table(ids.device)
            # clamped so that out-of-vocabulary ids reach mlm_mask, whose error names input_ids
            new_word = ~cont[ids.long().clamp(0, len(cont) - 1)]
            inside = ~special
        new_word = inside & (new_word | prev_special)
        words = torch.cumsum(new_word.to(torch.int64), dim=1) - 1
        return torch.where(inside & (words >= 0), words, torch.full_like(words, -1))

    def _continuation_table(self, device) -> torch.Tensor:
        """Bool per vocabulary id: the token is a WordPiece continuation (``##...``)."""
        if self._continuation is None:
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            cont = [t is not None and t.startswith("##") for t in tokens]
            if not any(cont):
                raise ValueError(
                    "whole_word_mask: the tokenizer has no WordPiece '##' pieces to find word boundaries; "
                    "add 'word_ids' (Encoding.word_ids()) or 'offset_mapping' to the examples"
                )
            self._continuation = torch.tensor(cont, dtype=torch.bool)
        return self._continuation.to(device)

    def __getstate__(self):
        # The continuation table is rebuilt on demand; everything else travels (the generation
        # counters as shared memory when torch's multiprocessing pickler carries them).
        state = dict(self.__dict__)
        state["_continuation"] = None
        return state


# ---------------------------------------------------------------------- helpers


def _probability(name: str, p) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a float in [0, 1], got {p!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
    return p


def _check_return_tensors(rt) -> str:
    if rt not in ("pt", "np"):
        raise ValueError(f"return_tensors: expected 'pt' or 'np', got {rt!r}")
    return rt


def _concat_ints(column) -> torch.Tensor | None:
    """All examples' values of one key, concatenated into a flat int64 tensor; None if not plain ints."""
    first = column[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) and v.dim() == 1 and v.device.type == "cpu"
                   and not v.dtype.is_floating_point and v.dtype != torch.bool for v in column):
            return None
        return torch.cat(column).to(torch.int64)
    if isinstance(first, np.ndarray):
        if not all(isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu" for v in column):
            return None
        return torch.from_numpy(np.concatenate(column).astype(np.int64, copy=False))
    if isinstance(first, (list, tuple)):
        sample = next((v[0] for v in column if len(v)), 0)
        if type(sample) is not int:  # bools / floats: tokenizer.pad keeps their dtype
            return None
        total = sum(len(v) for v in column)
        # np.fromiter over the chained lists is ~8x faster than torch.tensor on the nested lists.
        return torch.from_numpy(np.fromiter(chain.from_iterable(column), dtype=np.int64, count=total))
    return None


def _place(flat: torch.Tensor, valid: torch.Tensor | None, rows: int, length: int, pad) -> torch.Tensor:
    """Scatter the concatenated rows ``flat`` ``(T, ...)`` into a ``(rows, length, ...)`` tensor."""
    if valid is None:
        return flat.reshape(rows, length, *flat.shape[1:])
    out = torch.full((rows, length, *flat.shape[1:]), pad, dtype=flat.dtype)
    out[valid] = flat
    return out


def _tokenizer_pad(tokenizer, features, pad_to_multiple_of):
    """``tokenizer.pad`` as Hugging Face's collator calls it, without the fast-tokenizer warning."""
    warnings = getattr(tokenizer, "deprecation_warnings", None)
    if warnings is None:
        return tokenizer.pad(features, return_tensors="pt", pad_to_multiple_of=pad_to_multiple_of)
    state = warnings.get("Asking-to-pad-a-fast-tokenizer", False)
    warnings["Asking-to-pad-a-fast-tokenizer"] = True
    try:
        return tokenizer.pad(features, return_tensors="pt", pad_to_multiple_of=pad_to_multiple_of)
    finally:
        warnings["Asking-to-pad-a-fast-tokenizer"] = state


def _batch_encoding(batch: dict):
    """Wrap in transformers' BatchEncoding (what HF's collator returns, with ``.to(device)``) when available."""
    try:
        from transformers import BatchEncoding
    except ImportError:  # a tokenizer-like object without transformers: a plain dict is the same data
        return batch
    return batch if isinstance(batch, BatchEncoding) else BatchEncoding(batch)
