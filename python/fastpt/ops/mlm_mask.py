"""BERT / RoBERTa masked-language-model masking.

A token is *selected* with probability ``mask_prob`` unless it is blocked
(special token, padding, or ``word_id < 0``); a selected token becomes the mask
token with probability ``replace_prob``, a uniformly random id in
``[0, vocab_size)`` with probability ``random_prob``, and stays itself
otherwise; ``labels`` holds the original id where selected and -100 elsewhere.
With ``word_ids`` (whole-word masking) the selection is drawn once per word id
and row, so all tokens of a row that share a word id are selected together,
wherever they are: the ids must be unique per row (raw ``Encoding.word_ids()``
restart at 0 in the second sequence of a pair and in each packed document, and
tie unrelated words; ``MLMCollator`` and the ``MLM`` objective renumber them).
The 80/10/10 choice stays per token, as in the original BERT whole-word masking
(Hugging Face's 5.x collator instead replaces every selected token of a word by
the mask token).

Randomness is counter-based (``ops/_rng.py``): the result is a pure function of
``(seed, row, position)`` and identical on every backend and device.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _dispatch, _native
from . import _rng, _validate

try:  # Triton is optional: a GPU backend, or the CPU interpreter in tests.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

MAX_SPECIAL_IDS = 64  # the kernels compare with at most this many ids; longer lists are folded into ``blocked``


def word_starts(ids: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
    """Bool tensor shaped like ``ids`` (int, (..., T)): True where the token begins a word by per-id tables
    (``data.tokenizer.word_boundary_tables``): ``starts[id]``, or ``ends`` of the id before it along the last
    dimension (None: no such table). Ids outside the tables are words of their own (and mlm_mask's error then
    names them). The MLM objective and ``MLMCollator`` both read their tables through it."""
    ids = torch.as_tensor(ids).long()
    inside = (ids >= 0) & (ids < starts.shape[0])
    safe = torch.where(inside, ids, 0)
    out = starts.to(ids.device)[safe] | ~inside
    if ends is not None:
        after = ends.to(ids.device)[safe] | ~inside
        out[..., 1:] |= after[..., :-1]
    return out


def number_words(word_start: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Word index per token for ``mlm_mask(word_ids=...)``: a new word begins at every position where
    ``word_start`` and ``inside`` are both true, runs are numbered 0, 1, ... along the last dimension,
    and tokens outside words (``inside`` false: special tokens, padding) get -1. Tokens inside a word
    before the row's first start also get -1 (no word has begun). The collator and the MLM objective
    both renumber their word ids with it, so ids that restart (pairs, packed documents) never tie two
    words together."""
    inside = inside.bool()
    words = torch.cumsum((word_start.bool() & inside).to(torch.int64), dim=-1) - 1
    return torch.where(inside & (words >= 0), words, torch.full_like(words, -1))


def _special_ids(special_token_ids) -> list[int]:
    """``special_token_ids`` as sorted distinct ints: None, an iterable of ints, or an integer tensor
    of at most one dimension. TypeError / ValueError naming the argument otherwise (a bare int, a
    string or floats were read as something else before: 0 as "none", "12" as ids 1 and 2)."""
    if special_token_ids is None:
        return []
    name = "special_token_ids"
    if isinstance(special_token_ids, torch.Tensor):
        if special_token_ids.dim() > 1 or special_token_ids.dtype not in _validate.INDEX_DTYPES:
            raise TypeError(f"{name}: expected a 1-d int32 / int64 tensor or a list of ints, got a "
                            f"{special_token_ids.dtype} tensor of shape {tuple(special_token_ids.shape)}")
        special_token_ids = special_token_ids.reshape(-1).tolist()
    elif isinstance(special_token_ids, (str, bytes)) or not hasattr(special_token_ids, "__iter__"):
        raise TypeError(f"{name}: expected an iterable of ints (e.g. [101, 102]), got {special_token_ids!r}")
    ids = []
    for i in special_token_ids:
        if isinstance(i, torch.Tensor) and i.numel() == 1 and i.dtype in _validate.INDEX_DTYPES:
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):  # ints, numpy ints
            raise TypeError(f"{name}: expected ints, got {i!r} ({type(i).__name__})")
        i = int(i)
        if not -2**63 <= i < 2**63:
            raise ValueError(f"{name}: expected int64 ids, got {i}")
        ids.append(i)
    return sorted(set(ids))


def _prepare(input_ids, *, mask_token_id, vocab_size, mask_prob, replace_prob, random_prob,
             special_tokens_mask, special_token_ids, attention_mask, word_ids, seed):
    """Validate the public arguments and bring them into the backend-neutral form."""
    ids = _validate.index_tensor("input_ids", input_ids)
    vocab_size = _validate.positive_int("vocab_size", vocab_size)
    if vocab_size >= 2**31:
        raise ValueError(f"vocab_size: expected < 2**31, got {vocab_size}")
    mask_token_id = _validate.positive_int("mask_token_id", mask_token_id, minimum=0)
    if mask_token_id >= vocab_size:
        raise ValueError(f"mask_token_id: expected an id in [0, vocab_size={vocab_size}), got {mask_token_id}")
    mask_prob = _validate.probability("mask_prob", mask_prob)
    replace_prob = _validate.probability("replace_prob", replace_prob)
    random_prob = _validate.probability("random_prob", random_prob)
    if replace_prob + random_prob > 1.0 + 1e-12:
        raise ValueError(
            f"replace_prob + random_prob: expected <= 1, got {replace_prob} + {random_prob} = {replace_prob + random_prob}"
        )
    seed = _rng.check_seed(seed)
    # The id range is checked by each runner: the C++ kernel checks it in its own pass
    # over the ids, the others call _validate.ids_in_range before launching.

    blocked = None
    for name, m, invert in (("special_tokens_mask", special_tokens_mask, False), ("attention_mask", attention_mask, True)):
        if m is None:
            continue
        m = _validate.mask_tensor(name, m, ids, "input_ids")
        m = ~m if invert else m
        blocked = m if blocked is None else blocked | m
    if word_ids is not None:
        word_ids = _validate.index_tensor("word_ids", word_ids)
        _validate.same_shape_device("word_ids", word_ids, ids, "input_ids")
    # An id no token of this dtype can equal blocks nothing; dropped here because the cpu kernel
    # compares in the id dtype (2**32 + 3 would block 3 in an int32 row), the others in int64.
    info = torch.iinfo(ids.dtype)
    special = _dispatch.device_constant(tuple(i for i in _special_ids(special_token_ids)
                                              if info.min <= i <= info.max), torch.int64, ids.device)
    if special.numel() > MAX_SPECIAL_IDS:  # rare (many added special tokens): one isin pass instead
        m = torch.isin(ids, special)
        blocked = m if blocked is None else blocked | m
        special = special[:0]

    shape = ids.shape
    rows = math.prod(shape[:-1])
    flat = lambda t: None if t is None else t.reshape(rows, shape[-1]).contiguous()  # noqa: E731
    return dict(
        ids=flat(ids),
        blocked=flat(blocked),
        word_ids=flat(word_ids),
        special_ids=special,
        keys=tuple(_rng.stream_key(seed, s) for s in (_rng.STREAM_MLM_SELECT, _rng.STREAM_MLM_ACTION, _rng.STREAM_MLM_TOKEN)),
        thresholds=(_rng.threshold24(mask_prob), _rng.threshold24(replace_prob), _rng.threshold24(replace_prob + random_prob)),
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
    ), shape


# ----------------------------------------------------------------------------- reference


def reference(ids, blocked, word_ids, special_ids, keys, thresholds, mask_token_id, vocab_size):
    """Pure-PyTorch ground truth on (rows, cols) inputs; returns (masked_ids, labels)."""
    k_sel, k_act, k_tok = keys
    t_sel, t_mask, t_rand = thresholds
    rows = torch.arange(ids.shape[0], device=ids.device, dtype=torch.int64).unsqueeze(1)
    cols = torch.arange(ids.shape[1], device=ids.device, dtype=torch.int64).unsqueeze(0)
    eligible = ~torch.isin(ids, special_ids)
    if blocked is not None:
        eligible &= ~blocked
    sel_cols = cols
    if word_ids is not None:
        eligible &= word_ids >= 0
        sel_cols = word_ids.to(torch.int64) & _rng.M32
    selected = eligible & ((_rng.bits(k_sel, rows, sel_cols) >> 8) < t_sel)
    action = _rng.bits(k_act, rows, cols) >> 8
    random_ids = _rng.uniform_int(_rng.bits(k_tok, rows, cols), vocab_size).to(ids.dtype)
    replaced = torch.where(action < t_mask, torch.full_like(ids, mask_token_id), torch.where(action < t_rand, random_ids, ids))
    masked = torch.where(selected, replaced, ids)
    labels = torch.where(selected, ids.to(torch.int64), torch.full_like(ids, -100, dtype=torch.int64))
    return masked, labels


# ----------------------------------------------------------------------------- native (cpu, cuda)


def _native_params(ids, blocked, word_ids, special_ids, keys, thresholds, mask_token_id, vocab_size):
    masked = torch.empty_like(ids)
    labels = torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    p = _native._C.MLMParams()
    p.ids, p.out, p.labels = ids.data_ptr(), masked.data_ptr(), labels.data_ptr()
    p.rows, p.cols = ids.shape
    p.id_dtype = _native.dtype_code(ids.dtype)
    if blocked is not None:
        p.blocked = blocked.data_ptr()
    if word_ids is not None:
        p.word_ids, p.word_dtype = word_ids.data_ptr(), _native.dtype_code(word_ids.dtype)
    p.special_ids, p.n_special = special_ids.data_ptr(), special_ids.numel()
    p.key_select, p.key_action, p.key_token = keys
    p.t_select, p.t_mask, p.t_random = thresholds
    p.mask_token_id, p.vocab_size = mask_token_id, vocab_size
    return p, masked, labels


CPU_SPECIAL_SLOTS = 8  # csrc/mlm_mask_cpu.cpp compares each token with at most 8 ids


def _checked(run):
    """Wrap a runner whose kernel does not check the id range itself."""

    def wrapped(**inputs):
        _validate.ids_in_range("input_ids", inputs["ids"], inputs["vocab_size"], "vocab_size")
        return run(**inputs)

    return wrapped


def _run_cpu(**inputs):
    special = inputs["special_ids"]
    if special.numel() > CPU_SPECIAL_SLOTS:  # rare: fold the long list into the blocked mask
        blocked = torch.isin(inputs["ids"], special)
        if inputs["blocked"] is not None:
            blocked |= inputs["blocked"]
        inputs = {**inputs, "blocked": blocked, "special_ids": special[:0]}
    p, masked, labels = _native_params(**inputs)
    if not _native._C.mlm_mask_cpu(p, _native.num_threads()):
        _validate.ids_in_range("input_ids", inputs["ids"], inputs["vocab_size"], "vocab_size")
        raise AssertionError("mlm_mask_cpu reported an id outside [0, vocab_size) that aminmax did not find")
    return masked, labels


def _run_cuda(**inputs):
    p, masked, labels = _native_params(**inputs)
    with torch.cuda.device(inputs["ids"].device):
        _native._C.mlm_mask_cuda(p, _native.cuda_stream(inputs["ids"].device))
    return masked, labels


# ----------------------------------------------------------------------------- triton

if triton is not None:
    _mix32, _colmix = _rng.mix32_tl, _rng.colmix_tl

    @triton.jit
    def _mlm_kernel(ids_ptr, out_ptr, labels_ptr, blocked_ptr, words_ptr, special_ptr, cols, n_special,
                    k_sel, k_act, k_tok, t_sel, t_mask, t_rand, mask_id, vocab,
                    HAS_BLOCKED: tl.constexpr, HAS_WORDS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = c < cols
        offs = row.to(tl.int64) * cols + c
        tok = tl.load(ids_ptr + offs, mask=inside, other=0)
        eligible = inside
        if HAS_BLOCKED:
            eligible &= tl.load(blocked_ptr + offs, mask=inside, other=1) == 0
        for s in range(n_special):
            eligible &= tok.to(tl.int64) != tl.load(special_ptr + s)
        c32 = c.to(tl.uint32)
        sel_col = c32
        if HAS_WORDS:
            w = tl.load(words_ptr + offs, mask=inside, other=-1)
            eligible &= w >= 0
            sel_col = w.to(tl.uint32)
        r32 = row.to(tl.uint32)
        rk_sel = _mix32(k_sel.to(tl.uint32, bitcast=True) ^ r32)
        rk_act = _mix32(k_act.to(tl.uint32, bitcast=True) ^ r32)
        rk_tok = _mix32(k_tok.to(tl.uint32, bitcast=True) ^ r32)
        selected = eligible & ((_mix32(rk_sel ^ _colmix(sel_col)) >> 8) < t_sel.to(tl.uint32))
        action = _mix32(rk_act ^ _colmix(c32)) >> 8
        rnd = ((_mix32(rk_tok ^ _colmix(c32)).to(tl.uint64) * vocab.to(tl.uint64)) >> 32).to(tok.dtype)
        replaced = tl.where(action < t_mask.to(tl.uint32), mask_id.to(tok.dtype),
                            tl.where(action < t_rand.to(tl.uint32), rnd, tok))
        tl.store(out_ptr + offs, tl.where(selected, replaced, tok), mask=inside)
        tl.store(labels_ptr + offs, tl.where(selected, tok.to(tl.int64), -100), mask=inside)


def gpu_block(cols: int) -> int:
    """Columns of a row each Triton program takes (grid: rows x blocks of columns)."""
    return min(1024, triton.next_power_of_2(cols))


def _run_triton(ids, blocked, word_ids, special_ids, keys, thresholds, mask_token_id, vocab_size):
    masked = torch.empty_like(ids)
    labels = torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    rows, cols = ids.shape
    if rows == 0 or cols == 0:
        return masked, labels
    block = gpu_block(cols)
    grid = (rows, triton.cdiv(cols, block))
    _mlm_kernel[grid](
        ids, masked, labels, blocked if blocked is not None else ids, word_ids if word_ids is not None else ids,
        special_ids, cols, special_ids.numel(), *(_rng.signed32(k) for k in keys), *thresholds, mask_token_id, vocab_size,
        HAS_BLOCKED=blocked is not None, HAS_WORDS=word_ids is not None, BLOCK=block,
    )
    return masked, labels


# ----------------------------------------------------------------------------- dispatch


def _on(kind):
    check = _dispatch.device_is(kind)
    return lambda ids, **_: check(ids.device)


def _triton_supports(ids, **_):
    why = _dispatch.triton_device_refusal(ids.device)
    if why is not None:
        return why
    return None


OP = _dispatch.Op("mlm_mask", [
    _dispatch.backend("cuda", _on("cuda"), _checked(_run_cuda)),
    _dispatch.backend("cpu", _on("cpu"), _run_cpu),
    _dispatch.backend("triton", _triton_supports, _checked(_run_triton)),
    _dispatch.backend("reference", lambda **_: None, _checked(reference)),
], probe=lambda device: _prepare(torch.zeros(2, 8, dtype=torch.int64, device=device), mask_token_id=1, vocab_size=8,
                                  mask_prob=0.15, replace_prob=0.8, random_prob=0.1, special_tokens_mask=None,
                                  special_token_ids=None, attention_mask=None, word_ids=None, seed=0)[0])


def mlm_mask(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, mask_prob: float = 0.15,
             replace_prob: float = 0.8, random_prob: float = 0.1, special_tokens_mask: torch.Tensor | None = None,
             special_token_ids=None, attention_mask: torch.Tensor | None = None, word_ids: torch.Tensor | None = None,
             seed: int = 0, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``input_ids`` for masked-language-model pre-training.

    Args:
        input_ids: int32/int64 ``(..., S)`` token ids in ``[0, vocab_size)``; the last dim is the sequence.
        mask_token_id: id written for replaced tokens (in ``[0, vocab_size)``).
        vocab_size: random replacements are drawn uniformly from ``[0, vocab_size)``.
        mask_prob: probability that an eligible token (or word) is selected.
        replace_prob, random_prob: fractions of selected tokens replaced by the mask token / a random id
            (the rest keep their id). Default 80/10/10.
        special_tokens_mask: optional bool/int ``(..., S)``; nonzero marks tokens never to mask.
        special_token_ids: optional iterable of ids never to mask, e.g. CLS, SEP, PAD (any number; ids outside
            the range of the ``input_ids`` dtype match no token).
        attention_mask: optional ``(..., S)``; 0 marks padding, never masked.
        word_ids: optional int ``(..., S)`` word id per token for whole-word masking; ``< 0`` never masked.
            All tokens of a row with the same id are one word (selected together, wherever they are), so
            the ids must be unique per row, not restart per sequence of a pair or per packed document.
        seed: int in ``[0, 2**64)``; the masks are a pure function of (seed, row, position).
        backend: None (fastest that fits) or one of "cuda", "cpu", "triton", "reference".

    Returns:
        ``(masked_ids, labels)``: masked ids with the dtype of ``input_ids``, and int64 labels
        holding the original id at selected positions and -100 elsewhere, both shaped like ``input_ids``.

    Raises:
        TypeError / ValueError naming the argument for wrong dtypes, shapes, devices, ids out of
        vocabulary or probabilities outside [0, 1]; ``BackendError`` if the forced backend cannot serve.
    """
    inputs, shape = _prepare(
        input_ids, mask_token_id=mask_token_id, vocab_size=vocab_size, mask_prob=mask_prob,
        replace_prob=replace_prob, random_prob=random_prob, special_tokens_mask=special_tokens_mask,
        special_token_ids=special_token_ids, attention_mask=attention_mask, word_ids=word_ids, seed=seed,
    )
    masked, labels = OP(backend, **inputs)
    return masked.reshape(shape), labels.reshape(shape)
