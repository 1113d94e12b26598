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
  ``"offset_mapping"`` (Hugging Face's rule: tokens that touch are one word, so an
  unspaced Chinese run is one word), else from the tokenizer's vocabulary: WordPiece
  continuation pieces (``"##..."``), or for a fast byte-level BPE / SentencePiece
  tokenizer BERT's words (``data.tokenizer.word_boundary_tables``: each CJK ideograph
  and punctuation mark its own word, as ``fastpt pretrain`` masks shards). It keeps ``mask_replace_prob`` / ``random_replace_prob``
  (the 80/10/10 split per token, as in the original BERT whole-word masking)
  where Hugging Face 5.x forces every selected token to ``[MASK]``.
"""
from __future__ import annotations

import array
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from ..ops import mlm_mask
from ..ops.mlm_mask import number_words, word_starts

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
            lengths with a tokenizer that has no pad token, ``word_ids`` / ``offset_mapping`` /
            ``attention_mask`` / ``token_type_ids`` / ``special_tokens_mask`` that do not match
            ``input_ids`` (or are given for only some examples), an example without ``input_ids``, ids
            that are not 1-d (a ``(1, L)`` tensor, nested lists), or ids outside ``[0, len(tokenizer))``.
        TypeError: at construction for a tokenizer that is None (or lacks ``pad_token_id``); at call
            time for ``features`` that is not a list of examples (None, a dict of columns, one flat
            list of ids), dict and non-dict examples mixed, or ids / ``word_ids`` that are not integers
            (strings, floats: they are never truncated). All are checked before anything reaches
            ``tokenizer.pad``, and each message names the argument or key.
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
        if tok is None or not hasattr(tok, "pad_token_id"):
            raise TypeError(
                "tokenizer: expected a Hugging Face tokenizer (with pad_token_id, all_special_ids, padding_side, "
                f"and mask_token_id and len() for mlm=True), got {_describe(tok)}"
            )
        if self.mlm:
            if getattr(tok, "mask_token_id", None) is None:
                raise ValueError(
                    "tokenizer: has no mask token, which masked language modelling needs; "
                    "pass mlm=False for causal language modelling"
                )
            try:
                len(tok)
            except TypeError:
                raise TypeError(f"tokenizer: needs len() (the vocabulary size) for mlm=True, "
                                f"got {_describe(tok)}") from None
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
        self._special_key, self._special_list = None, []  # see _special_ids
        self._continuation = None  # (starts, ends) word tables (_boundary_tables), built on first whole-word call
        self._pid = os.getpid()
        # Shared with DataLoader workers (fork or spawn): counts how many processes have served
        # each worker id, so re-created workers start a fresh stream instead of repeating an epoch.
        self._generations = torch.zeros(_GENERATION_SLOTS, dtype=torch.int64).share_memory_()

    # ------------------------------------------------------------------ public

    def __call__(self, features, return_tensors: str | None = None):
        return_tensors = _check_return_tensors(return_tensors or self.return_tensors)
        features = _examples(features)  # checked up front: nothing malformed reaches tokenizer.pad
        if isinstance(features[0], Mapping):
            ids = _check_dict_examples(features)
            word_ids = self._pop_ragged(features, "word_ids", fill=-1)
            offsets = self._pop_ragged(features, "offset_mapping", fill=0)
            batch = self._pad_fast(features, ids)
            if batch is None:  # unusual keys or value types: let the tokenizer do exactly what HF does
                batch = dict(_tokenizer_pad(self.tokenizer, features, self.pad_to_multiple_of))
            batch = _batch_encoding(batch)
        else:
            ids = _check_ids(features, "input_ids")
            word_ids = offsets = None
            batch = {"input_ids": self._collate_ids(features, ids)}

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
        Hugging Face's collator, else the tokenizer's current ``all_special_ids``; padding is never
        masked either way. With ``whole_word_mask``, words come from ``word_ids`` ``(B, L)`` (``< 0`` =
        not a word), else ``offset_mapping`` ``(B, L, 2)``, else WordPiece ``##`` pieces.
        ``special_tokens_mask`` and ``offset_mapping`` may be tensors, arrays or nested lists. Unlike
        Hugging Face's method it returns new tensors and leaves ``inputs`` alone. Advances the seed counter.
        Raises ValueError / TypeError from :func:`fastpt.ops.mlm_mask` for bad ids or shapes, and
        ValueError naming ``special_tokens_mask`` / ``offset_mapping`` for a value that is no array.
        """
        # As Hugging Face's method: a list (of lists) or array is converted, not refused.
        device = inputs.device
        special_tokens_mask = _as_tensor("special_tokens_mask", special_tokens_mask, torch.bool, "(B, L)", device)
        offset_mapping = _as_tensor("offset_mapping", offset_mapping, torch.int64, "(B, L, 2)", device)
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

    @property
    def _special_ids(self) -> list[int]:
        """The tokenizer's ``all_special_ids`` and pad id, sorted: read at call time, as Hugging Face
        does, so special tokens added after construction are never masked (re-sorted only on change)."""
        tok = self.tokenizer
        key = (tuple(getattr(tok, "all_special_ids", ())), getattr(tok, "pad_token_id", None))
        if key != self._special_key:
            ids = {int(i) for i in key[0]}
            if key[1] is not None:
                ids.add(int(key[1]))
            self._special_key, self._special_list = key, sorted(ids)
        return self._special_list

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

    def _pad_fast(self, features, ids: torch.Tensor | None = None) -> dict | None:
        """``tokenizer.pad(features, return_tensors="pt")`` for examples made only of the standard
        keys holding integer lists / arrays / 1-D tensors; None for anything else. ``ids``: the
        examples' input_ids already concatenated (from :func:`_check_ids`), if they were lists."""
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
            flat[k] = ids if k == "input_ids" and ids is not None else _concat_ints(column)
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

    def _collate_ids(self, examples, flat: torch.Tensor | None = None) -> torch.Tensor:
        """Hugging Face's ``_torch_collate_batch``: lists become int64, tensors keep their dtype.

        ``flat``: the examples already concatenated (from :func:`_check_ids`, when all are lists)."""
        if flat is not None:
            pass
        elif isinstance(examples[0], torch.Tensor):
            dtype = examples[0].dtype
            flat = torch.cat([e.reshape(-1) if isinstance(e, torch.Tensor) else torch.as_tensor(e, dtype=dtype)
                              for e in examples]).to(dtype)
        else:
            flat = _concat_ints(examples)
            if flat is None:  # numpy / 0-d tensor scalars, or lists mixed with arrays and tensors
                flat = torch.cat([torch.as_tensor(e, dtype=torch.int64).reshape(-1) for e in examples])
        lengths = [len(e) for e in examples]
        valid, length = self._layout(lengths)
        return _place(flat, valid, len(examples), length, self.tokenizer.pad_token_id)

    def _pop_ragged(self, features, key: str, fill: int) -> torch.Tensor | None:
        """Remove ``key`` from every example and pad it like input_ids: ``(B, L)`` or ``(B, L, 2)``."""
        present = [key in f for f in features]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(f"{key}: example {present.index(True)} has it but example {present.index(False)} "
                             f"does not; give {key} for every example or for none")
        lengths = [len(f["input_ids"]) for f in features]
        values = []
        for i, f in enumerate(features):
            f = dict(f)
            v = f.pop(key)
            features[i] = f
            if not (isinstance(v, (list, tuple)) or isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim >= 1):
                what = "None or an integer word index" if key == "word_ids" else "an integer (start, end) pair"
                raise TypeError(f"{key}: example {i} is {_describe(v)}; expected a list with {what} per token")
            if len(v) != lengths[i]:
                raise ValueError(f"{key}: example {i} has {len(v)} entries for {lengths[i]} input_ids")
            values.append(v)
        if key == "word_ids":
            flat = _word_id_list(values)
        else:
            flat = torch.from_numpy(np.concatenate([_offset_pairs(v, i) for i, v in enumerate(values)]))
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
            special = torch.isin(ids, torch.tensor(self._special_ids, dtype=torch.int64, device=ids.device))
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
            new_word = word_starts(ids, *self._boundary_tables(ids.device))
            inside = ~special
        return number_words(new_word | prev_special, inside)

    def _boundary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(starts, ends): bool per vocabulary id, the token begins a word / the token after it does; rebuilt
        when tokens were added to the tokenizer since. A fast tokenizer's come from
        ``data.tokenizer.word_boundary_tables`` (WordPiece ``##`` pieces; byte-level BPE / SentencePiece:
        BERT's words, each CJK ideograph and punctuation its own: the same words ``fastpt pretrain`` masks on
        shards); a slow one's from its ``##`` pieces."""
        if self._continuation is None or len(self._continuation[0]) != len(self.tokenizer):
            n = len(self.tokenizer)
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            tables = None
            if backend is not None:
                from .tokenizer import word_boundary_tables

                try:
                    starts, ends = word_boundary_tables(backend)
                except Exception:  # noqa: BLE001 -- no rule fits (ValueError), or a custom Python pre-tokenizer
                    pass  # tokenizers cannot serialise (a bare Exception: RoFormer's jieba): the ## test decides
                else:
                    pad = torch.ones(max(n - len(starts), 0), dtype=torch.bool)  # added tokens: words of their own
                    tables = torch.cat([starts, pad])[:n], torch.cat([ends, pad])[:n]
            if tables is None:
                tokens = self.tokenizer.convert_ids_to_tokens(list(range(n)))
                cont = [t is not None and t.startswith("##") for t in tokens]
                if not any(cont):
                    raise ValueError(
                        "whole_word_mask: the tokenizer has no WordPiece '##' pieces to find word boundaries; "
                        "add 'word_ids' (Encoding.word_ids()) or 'offset_mapping' to the examples"
                    )
                tables = ~torch.tensor(cont, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
            self._continuation = tables
        return tuple(t.to(device) for t in self._continuation)

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


def _as_tensor(name: str, v, dtype: torch.dtype, shape: str, device) -> torch.Tensor | None:
    """``v`` (None, a tensor, an array or nested lists) as a tensor on ``device``; tensors pass unchanged."""
    if v is None or isinstance(v, torch.Tensor):
        return v
    try:
        return torch.as_tensor(np.asarray(v), dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: expected a {shape} tensor, array or nested list, got {_describe(v)}") from None


def _check_return_tensors(rt) -> str:
    if rt not in ("pt", "np"):
        raise ValueError(f"return_tensors: expected 'pt' or 'np', got {rt!r}")
    return rt


_EXPECTED = ("a list of examples, each a dict with 1-d integer input_ids (a list, numpy array or tensor of "
             "token ids) or itself a 1-d sequence of integer ids")


def _describe(v) -> str:
    """A short description of ``v`` for error messages."""
    if v is None:
        return "None"
    name = type(v).__name__
    a = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(v, torch.Tensor):
        return f"a {v.dim()}-d {v.dtype} tensor"
    if isinstance(v, np.ndarray):
        return f"a {v.ndim}-d {v.dtype} numpy array"
    if isinstance(v, (str, bytes)):
        return f"{a} {name} {v[:24]!r}"
    if isinstance(v, (bool, int, float, np.generic)):
        return f"{a} {name} ({v!r})"
    if isinstance(v, (list, tuple)) and len(v) and isinstance(v[0], (list, tuple)):
        return f"{a} {name} of {type(v[0]).__name__}s"
    return f"{a} {name}"


def _int_dtype(dtype) -> bool:
    """True for integer tensor / array dtypes (not bool, float or complex)."""
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.dtype(dtype).kind in "iu"


def _is_int_type(t: type) -> bool:
    """Python / numpy integer scalar types (bools are not ids)."""
    return issubclass(t, (int, np.integer)) and not issubclass(t, bool)


def _is_int_scalar(x) -> bool:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.ndim == 0 and _int_dtype(x.dtype)
    return _is_int_type(type(x))


def _examples(features) -> list:
    """``features`` as a non-empty list of examples, all dicts or all non-dicts; TypeError / ValueError naming it."""
    if isinstance(features, (torch.Tensor, np.ndarray)):
        if features.ndim != 2:  # a (batch, length) array is a batch of rows, as Hugging Face takes it
            raise TypeError(f"features: expected {_EXPECTED}, or a 2-d (batch, length) array of ids; "
                            f"got {_describe(features)}")
        features = list(features)
    elif isinstance(features, Sequence) and not isinstance(features, (str, bytes)):
        features = list(features)
    else:
        hint = ("; this looks like an already collated batch of columns, pass one dict per example instead"
                if isinstance(features, Mapping) else "")
        raise TypeError(f"features: expected {_EXPECTED}; got {_describe(features)}{hint}")
    if not features:
        raise ValueError("features: expected at least one example, got an empty batch")
    first = features[0]
    if _is_int_scalar(first):
        raise TypeError(f"features: example 0 is {_describe(first)}: a single example's flat list of ids? "
                        f"expected {_EXPECTED}; wrap one example in a list ([ids])")
    is_dict = isinstance(first, Mapping)
    for i, f in enumerate(features):
        if isinstance(f, Mapping) != is_dict:
            raise TypeError(f"features: example {i} is {_describe(f)} but example 0 is {_describe(first)}; "
                            f"expected {_EXPECTED}, all in the same form")
    return features


def _check_ids(values, what: str) -> torch.Tensor | None:
    """Check that every value is 1-d integer ids (a list / tuple of ints, a 1-d integer array or tensor);
    TypeError / ValueError naming ``what`` and the example otherwise.

    Lists are checked while they are converted (``array.fromlist`` accepts integers only, and is as fast
    as the ``np.fromiter`` it replaces): returns all values concatenated into an int64 tensor when every
    value is a list / tuple, else None."""
    buf, all_lists = array.array("q"), True
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)):
            try:
                buf.fromlist(v) if type(v) is list else buf.extend(v)
            except (TypeError, OverflowError):
                _check_int_list(v, i, what)
                raise
        elif isinstance(v, (torch.Tensor, np.ndarray)):
            all_lists = False
            if v.ndim != 1:
                raise ValueError(f"{what}: example {i} is {_describe(v)}; expected 1-d integer ids, one row per "
                                 f"example (not a (1, length) batch)")
            if not _int_dtype(v.dtype):
                raise TypeError(f"{what}: example {i} is {_describe(v)}; expected integer token ids "
                                f"(float ids are not rounded; convert them to integers first)")
        else:
            hint = "; tokenize the text first" if isinstance(v, (str, bytes)) else ""
            raise TypeError(f"{what}: example {i} is {_describe(v)}; expected 1-d integer ids (a list, numpy "
                            f"array or tensor){hint}")
    return torch.from_numpy(np.frombuffer(buf, dtype=np.int64)) if all_lists else None


def _check_int_list(v, i: int, what: str) -> None:
    """Name the first entry of list ``v`` (example ``i``) that is not an integer id; ValueError / TypeError."""
    for j, x in enumerate(v):
        if not _is_int_scalar(x):
            if isinstance(x, (list, tuple, torch.Tensor, np.ndarray)):
                hint = "; nested one level too deep? each example's ids must be 1-d"
            elif isinstance(x, (str, bytes)):
                hint = "; tokenize the text first"
            else:
                hint = ""
            raise TypeError(f"{what}: example {i} holds {_describe(x)} at position {j}; expected 1-d integer "
                            f"token ids{hint}")
        if not -(2**63) <= int(x) < 2**63:
            raise ValueError(f"{what}: example {i} holds {int(x)} at position {j}, outside int64")


def _check_dict_examples(features) -> torch.Tensor | None:
    """Dict examples: each has 1-d integer input_ids, and the standard per-token keys match their length.
    Returns :func:`_check_ids`' concatenated input_ids (None unless all are lists)."""
    ids = []
    for i, f in enumerate(features):
        if "input_ids" not in f:
            raise ValueError(f"input_ids: example {i} has none (keys {list(f.keys())[:8]}); expected every "
                             f"example to be a dict with 1-d integer input_ids")
        ids.append(f["input_ids"])
    flat = _check_ids(ids, "input_ids")
    for k in _PADDABLE[1:]:
        for i, f in enumerate(features):
            if k not in f:
                continue
            v, n = f[k], len(ids[i])
            if isinstance(v, (torch.Tensor, np.ndarray)):
                ok = v.ndim == 1
            else:
                ok = isinstance(v, (list, tuple)) and not (
                    len(v) and isinstance(v[0], (list, tuple, str, bytes, Mapping, torch.Tensor, np.ndarray))
                    and not _is_int_scalar(v[0]))
            if not ok:
                raise TypeError(f"{k}: example {i} is {_describe(v)}; expected a 1-d list / array / tensor with "
                                f"one entry per input_id")
            if len(v) != n:
                raise ValueError(f"{k}: example {i} has {len(v)} entries for {n} input_ids; expected one per "
                                 f"input_id")
    return flat


def _word_id_list(values) -> torch.Tensor:
    """word_ids of all examples concatenated, None (special tokens) as -1; TypeError naming word_ids otherwise."""
    rows = []
    for i, v in enumerate(values):
        if isinstance(v, (torch.Tensor, np.ndarray)):
            if not _int_dtype(v.dtype):
                raise TypeError(f"word_ids: example {i} is {_describe(v)}; expected integer word indices")
            v = v.tolist()
        rows.append(v)
    buf = array.array("q")
    try:  # integers only (not floats, strings, ...): checked by the conversion itself
        buf.fromlist([-1 if w is None else w for w in chain.from_iterable(rows)])
    except (TypeError, OverflowError):
        for i, v in enumerate(rows):
            for j, w in enumerate(v):
                if w is not None and not (_is_int_scalar(w) and -(2**63) <= int(w) < 2**63):
                    raise TypeError(f"word_ids: example {i} holds {_describe(w)} at position {j}; expected None "
                                    f"(special token) or an integer word index per token") from None
        raise
    return torch.from_numpy(np.frombuffer(buf, dtype=np.int64))


def _offset_pairs(v, i: int) -> np.ndarray:
    """One example's offset_mapping as an (n, 2) int64 array; ValueError naming offset_mapping otherwise."""
    if len(v) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    try:
        a = np.asarray(v)
    except (TypeError, ValueError, RuntimeError):
        a = None
    if a is None or a.ndim != 2 or a.shape[1] != 2 or not _int_dtype(a.dtype):
        raise ValueError(f"offset_mapping: example {i} is not {len(v)} integer (start, end) pairs, one per "
                         f"input_id (got {_describe(v) if a is None else _describe(a)})")
    return a.astype(np.int64, copy=False)


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
        if not _is_int_type(type(sample)):  # bools / floats: tokenizer.pad keeps their dtype
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
