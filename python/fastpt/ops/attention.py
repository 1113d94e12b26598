"""Fused attention for pre-training: padding, packed documents, prefix-LM, causal, GQA, dropout.

Every call is brought into one normal form, the contract all backends share:

* ``q4`` ``(B, S, H, D)``, ``k4`` / ``v4`` ``(B, S, Hk, D)``: any strides with ``stride(-1) == 1``
  (packed ``(T, H, D)`` input is passed as ``(1, T, H, D)``; ``sdpa`` passes transposed views);
* ``docs`` int32 ``(N, 4)`` on the device, one row per independent sequence:
  ``[batch row b, start s0 in that row, length L, prefix P]``. ``P`` encodes the mask kind
  (``P = L`` bidirectional, ``P = 0`` causal, in between prefix-LM) through one rule: local query
  ``i`` attends local key ``j`` iff ``j <= max(i, P - 1)``. Tokens outside every document are
  padding: never attended, output 0, gradient 0.
* ``lse`` ``(B, H, S)`` float32 (float64 for float64 inputs): the natural log-sum-exp of the
  scaled scores, taken before dropout (as FlashAttention does); saved for the backward.
* dropout: doc ``n``, query head ``h``, local query ``i``, local key ``j`` are dropped iff
  ``mix32(mix32(mix32(key ^ (n * H + h)) ^ colmix(i)) ^ colmix(j)) >> 8 < threshold24(p)`` (``ops/_rng.py``, key
  from ``stream_key(seed, STREAM_ATTN_DROPOUT)``); kept probabilities are scaled by ``1 / (1 - p)``.

Backends, in the order ``backend=None`` tries them:

* ``cpu`` (``ops/attention_cpu.py``): torch's CPU flash-attention kernel (the one ``F.scaled_dot_product_attention`` picks
  on CPU, called through its aten op because that also returns the log-sum-exp its backward
  needs), once per group of equal (length, prefix) documents, batched as a view or a gather.
  No mask tensor ever: causal documents use the kernel's ``is_causal``, prefix-LM documents run
  as three unmasked pieces merged by their log-sum-exps. With dropout (torch's CPU kernel draws
  from its own generator, not the counter-based one) the attention runs as dense float32 math
  with plain autograd, one of two ways (``attention_cpu._dense_window`` picks by a measured cost model): per
  group of equal documents over their own (L, L) blocks (the sum of L^2 over documents, but a
  dozen small ops per group), or over whole windows of the rows that no document crosses (more
  pairs, a few large ops: on the README demo's 32 rows of 128 tokens the attention runs 3-5x
  faster, a training step 1.8x, on 2 Zen 5 cores). The dropout mask is applied by the C++
  kernels of ``ops/dropout.py`` (``attention_dropout``, ``attention_dropout_rows``; the torch
  formula when fastpt._C is not built).
* ``triton`` (CUDA; CPU under TRITON_INTERPRET=1): ``ops/attention_triton.py``.
* ``cuda``: the CUDA C++ kernels of ``kernels/attention.cu`` through ``ops/attention_cuda.py``.
* ``reference``: dense masked softmax in float32 (float64 for float64 inputs) with plain
  autograd; the ground truth of every test and bench. Being dense it holds several
  ``(B, H, S, S)`` tensors: fine for tests and short rows.

Numerics: every backend sums in float32 (float64 for float64 inputs). The fused ones (``cpu`` without
dropout, ``triton``, ``cuda``) follow FlashAttention-2: the backward recomputes the probabilities as
``P = exp(s - lse)`` from the saved log-sum-exp instead of normalising a dense softmax. ``lse`` (row
max plus the log of the row sum) and the recomputed score ``s`` carry a float32 rounding of about
``ulp(max |s|)`` (``s`` the scaled score), which P inherits as a relative error; a dense softmax
(the reference) divides by its own sum, and its top entry, ``exp(0)``, is exact. So in float32
the gradients' error grows with the largest score. Measured against float64 (B 2, S 33, H 2, D 32,
q and k scaled up; triton under TRITON_INTERPRET=1): dv's error relative to max |dv| is 0.6-1.7
``ulp(max |s|)`` on ``cpu`` (torch's CPU flash-attention backward; 1.0e-5 at max |s| = 107,
1.7e-4 at 1714) and 0.25-0.5 ulp on ``triton`` (3.6e-6, 4.5e-5), against ~1e-6 for float32 dense
math at any size. Under the tests' rule (twice the float32 reference's error plus 8 ulps of the
largest value) the cpu backend's gradients go over from max |s| ~ 17 and triton's from ~ 70, by a
few ulps of the gradients' size at first. Where the softmax saturates the true dq, dk are tiny and
the error is large beside them: at max |s| ~ 4000 (true dq, dk ~1e-4, dv ~5) both backends are off
by 2.5-5e-5, 10-50% of dq's and dk's size; at softmax scale 1e3 (max |s| ~ 2e4, true dq, dk ~1e-30)
by 3-4e-3. bfloat16 and float16, whose own rounding dominates, keep the rule through max |s| ~ 4000
(bfloat16) and ~ 1000 (float16; 2.6x torch's fp16 dq error at ~ 4000), but not at the fully
saturated scale 1e3 (dq, dk ~1e-3 in every dtype). Scores of tens, as in training, are well inside
this for the half dtypes. ``backend="reference"`` runs torch's dense softmax math: in float32 its
errors are torch's own for such inputs, exactly (half inputs: float32 math, more accurate than
torch in their dtype). The cuda backend was not measured (no GPU at hand).

``cpu``, ``triton`` and ``cuda`` run inside the ``fastpt::attention_fwd`` / ``attention_bwd``
custom ops (fake implementations and an autograd formula registered), so ``torch.compile``
traces through them without a graph break, and the backward gets the saved ``(q, k, v, out,
lse, docs)`` of the forward, FlashAttention-2 style.

Under a ``torch.func`` transform (grad, vmap, jacrev, ``functional_call`` + grad) the dispatcher
runs torch's SDPA where it serves (plain or causal rows on CUDA; forward-mode transforms, which its
fused kernels cannot differentiate, fall back from it) and else the reference (the custom ops have
no functorch rule, ``_dispatch.transforms_active``); a
seed drawn there (``_rng.fresh_seed``) follows vmap's randomness mode. Meta tensors (shape
inference, as for torch's SDPA) also reach the reference: the kernels refuse them, the autocast
probe skips a device type autocast does not know, and the values of meta index tensors are not
checked (there are none).
"""
from __future__ import annotations

import importlib
import math
import weakref

import torch
import torch.nn.functional as F

from .. import _dispatch
from . import _rng, _validate
from ._validate import FLOAT_DTYPES
from ._validate import acc_dtype as _acc_dtype
from . import attention_cpu as _cpu

# Head dims the reference and cpu backends serve; the triton and cuda kernels declare their own
# limits through their supports().
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- validation


def _check_qkv(q, k, v) -> bool:
    """Types, dtypes, devices and shapes of q, k, v; returns whether the input is packed (T, H, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected float16, bfloat16, float32 or float64, got dtype {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got {t.device}")
    if q.dim() not in (3, 4):
        raise ValueError(f"q: expected shape (B, S, H, D), or packed (T, H, D) with cu_seqlens, got {tuple(q.shape)}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        lead = "B, S" if q.dim() == 4 else "T"
        raise ValueError(f"k: expected shape ({lead}, Hk, D) with {lead} and D of q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    h, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if h < 1:
        raise ValueError(f"q: expected at least one head (H >= 1), got shape {tuple(q.shape)}")
    if hk < 1:
        raise ValueError(f"k: expected at least one head (Hk >= 1), got shape {tuple(k.shape)}")
    if h % hk:
        raise ValueError(f"k: its number of heads Hk={hk} must divide the H={h} heads of q (GQA/MQA)")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim D={d} is not supported (expected 1 <= D <= {MAX_HEAD_DIM})")
    return q.dim() == 3


def _index_arg(name, t, device, length=None, *, int32_only=False) -> torch.Tensor:
    """A 1-D integer tensor of ``length`` entries on ``device`` or the CPU."""
    if int32_only:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected an int32 tensor (as in FlashAttention), got dtype {t.dtype}")
    else:
        _validate.index_tensor(name, t)
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"({length},)" if length is not None else "(N + 1,)"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q) or on the CPU, got {t.device}")
    return t


def _host_values(*tensors) -> list[list[int]]:
    """The values of small index tensors as Python ints, with one device sync for all of them."""
    present = [t for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    flat = torch.cat([t.reshape(-1).to(present[0].device, torch.int64) for t in present]).tolist()
    out, at = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
        else:
            out.append(flat[at:at + t.numel()])
            at += t.numel()
    return out


# The last call's checked index tensors and result. A model passes the same cu_seqlens / seqlens /
# prefix_lens tensors to every layer: the checks (and their device sync, which drains the GPU's
# queue before each layer's attention) then run once per forward, not once per layer. A hit needs
# the very same live tensor objects (weak references: a freed tensor's successor at the same
# address is a miss) at the same version counter (an in-place change is a miss) and the same
# other arguments. Writes that bypass the version counter (through .numpy(), .data, DLPack) are
# invisible to it: index tensors on the CPU, whose checks need no sync, are therefore checked on
# every call; a device tensor refilled that way must be a new tensor (or bumped with an in-place op).
_LAST_CHECK: list = [None]  # [(key, result)], replaced whole (one assignment)
_REMEMBER_CPU = False  # remember the checks of CPU index tensors too (tests of the mechanism, on a machine without GPU)


def _check_values(cu, seqlens, prefix, s, t_total, max_seqlen, causal):
    """Value checks that need the host (skipped under torch.compile). Returns (max_len, causal_any)
    where causal_any tells whether some document has causal structure (P < L)."""
    key = _check_key(cu, seqlens, prefix, s, t_total, max_seqlen, causal)
    last = _LAST_CHECK[0]
    if key is not None and last is not None and _same_check(last[0], key):
        return last[1]
    result = _check_host_values(cu, seqlens, prefix, s, t_total, max_seqlen, causal)
    _LAST_CHECK[0] = None if key is None else (key, result)
    return result


def _check_key(cu, seqlens, prefix, s, t_total, max_seqlen, causal):
    """(weak references and versions of the index tensors, the other arguments), or None when
    there is nothing to remember (no index tensor) or a tensor has no version counter."""
    tensors = (cu, seqlens, prefix)
    if all(t is None or (t.device.type == "cpu" and not _REMEMBER_CPU) for t in tensors):
        return None
    try:
        refs = tuple(None if t is None else (weakref.ref(t), t._version) for t in tensors)
    except (RuntimeError, TypeError):  # inference tensors track no version
        return None
    return refs, (s, t_total, max_seqlen, causal)


def _same_check(old, new) -> bool:
    (old_refs, old_args), (new_refs, new_args) = old, new
    if old_args != new_args:
        return False
    for a, b in zip(old_refs, new_refs):
        if (a is None) != (b is None):
            return False
        if a is not None and (a[0]() is None or a[0]() is not b[0]() or a[1] != b[1]):
            return False
    return True


def _check_host_values(cu, seqlens, prefix, s, t_total, max_seqlen, causal):
    cu_v, len_v, pre_v = _host_values(cu, seqlens, prefix)
    if cu_v is not None:
        if cu_v[0] != 0:
            raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {cu_v[0]}")
        for i in range(len(cu_v) - 1):
            if cu_v[i + 1] < cu_v[i]:
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i}]={cu_v[i]} > "
                                 f"cu_seqlens[{i + 1}]={cu_v[i + 1]}")
        if cu_v[-1] != t_total:
            raise ValueError(f"cu_seqlens: expected the last offset to equal T={t_total} (the tokens of q), "
                             f"got {cu_v[-1]}")
        lengths = [b - a for a, b in zip(cu_v[:-1], cu_v[1:])]
        what = "document"
    elif len_v is not None:
        for i, n in enumerate(len_v):
            if not 0 <= n <= s:
                raise ValueError(f"seqlens: expected lengths in [0, S={s}], got seqlens[{i}]={n}")
        lengths, what = len_v, "row"
    else:
        lengths, what = None, "row"
    if pre_v is not None:
        for i, p in enumerate(pre_v):
            length = s if lengths is None else lengths[i]
            if p < 0:
                raise ValueError(f"prefix_lens: expected lengths >= 0, got prefix_lens[{i}]={p}")
            if p > length:
                raise ValueError(f"prefix_lens: prefix_lens[{i}]={p} is longer than its {what} "
                                 f"(length {length})")
    longest = (max(lengths) if lengths else 0) if lengths is not None else s
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen: expected at least the longest {what} ({longest}), got {max_seqlen}")
    if pre_v is not None:
        causal_any = any(p < (s if lengths is None else lengths[i]) for i, p in enumerate(pre_v))
    else:
        causal_any = causal and longest > 0
    return (longest if max_seqlen is None else max_seqlen), int(causal_any)


def _check_values_in_graph(cu, seqlens, prefix, s, max_seqlen) -> None:
    """The checks of ``_check_host_values`` as asserts inside a ``torch.compile`` graph
    (``torch._assert_async``): no host read, so no graph break and no device sync. A violation
    raises RuntimeError with the message on CPU tensors; on CUDA it is a device-side assert (the
    CUDA context is lost, as with an out-of-range index in torch's own kernels). The messages name
    the argument but hold no value: not the offending one (that would need the host), nor the
    sizes (formatting a dynamic size specialises the graph to it, a recompile per length)."""
    lengths, what = None, "row"
    if cu is not None:
        c = cu.to(torch.int64)
        torch._assert_async(c[0] == 0, "cu_seqlens: expected cu_seqlens[0] == 0")
        lengths = c[1:] - c[:-1]
        torch._assert_async((lengths >= 0).all(), "cu_seqlens: expected non-decreasing offsets")
        torch._assert_async(c[-1] == s, "cu_seqlens: expected the last offset to equal T (the tokens of q)")
        what = "document"
    elif seqlens is not None:
        lengths = seqlens.to(torch.int64)
        torch._assert_async(((lengths >= 0) & (lengths <= s)).all(),
                            "seqlens: expected lengths in [0, S] (S: the row length of q)")
    if prefix is not None:
        p = prefix.to(torch.int64)
        torch._assert_async((p >= 0).all(), "prefix_lens: expected lengths >= 0")
        longer = p > s if lengths is None else p.to(lengths.device) > lengths
        torch._assert_async(~longer.any(), f"prefix_lens: a prefix is longer than its {what}")
    if max_seqlen is not None:
        if lengths is None:
            if max_seqlen < s:
                raise ValueError("max_seqlen: expected at least the longest row (S, the row length of q)")
        else:
            torch._assert_async((lengths <= max_seqlen).all(),
                                f"max_seqlen: expected at least the longest {what}")


def _docs_tensor(b_count, s, device, *, cu=None, seqlens=None, prefix=None, causal=False) -> torch.Tensor:
    """The (N, 4) int32 ``[b, s0, L, P]`` table, built with tensor ops only (traceable, no sync)."""
    if cu is not None:
        cu = cu.to(device)
        s0 = cu[:-1]
        lengths = cu[1:] - s0
        rows = torch.zeros_like(s0)
    else:
        rows = torch.arange(b_count, dtype=torch.int32, device=device)
        s0 = torch.zeros_like(rows)
        lengths = seqlens.to(device, torch.int32) if seqlens is not None else torch.full_like(rows, s)
    if prefix is not None:
        p = prefix.to(device, torch.int32)
    else:
        p = torch.zeros_like(lengths) if causal else lengths
    return torch.stack([rows, s0, lengths, p], 1)


def check_mask_args(shape, device, *, causal: bool = False, prefix_lens=None, seqlens=None, cu_seqlens=None,
                    max_seqlen=None) -> None:
    """The checks ``attention`` makes of its mask arguments, for a model to make before its layers
    run (its embeddings index tables by position, which bad ``cu_seqlens`` would send out of
    range first). ``shape``: the token grid, ``(B, S)`` or packed ``(T,)`` (with ``cu_seqlens``).
    The host values are remembered as ``attention`` remembers them, so the layers' calls with the
    same tensors and ``causal`` sync no more. Raises what ``attention`` raises, naming the argument."""
    _mask_args(cu_seqlens is not None, tuple(shape), device, causal=bool(causal), prefix_lens=prefix_lens,
               seqlens=seqlens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def _mask_args(packed, shape, device, *, causal, prefix_lens, seqlens, cu_seqlens, max_seqlen):
    """Validate the mask arguments for q of ``shape`` ((B, S, ...) or packed (T, ...)); returns
    ``(b_count, s, max_len, causal_any)``."""
    if max_seqlen is not None:
        max_seqlen = _validate.positive_int("max_seqlen", max_seqlen, minimum=0)
    if packed:
        if cu_seqlens is None:
            raise ValueError(f"cu_seqlens: required for packed input of shape (T, ...) {tuple(shape)}")
        if seqlens is not None:
            raise ValueError("seqlens: only for (B, S, H, D) inputs; packed documents are given by cu_seqlens")
        _index_arg("cu_seqlens", cu_seqlens, device, int32_only=True)
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens: expected shape (N + 1,) with N >= 0, got an empty tensor")
        n_docs = cu_seqlens.shape[0] - 1
        b_count, s = 1, shape[0]
    else:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens: only with packed (T, H, D) inputs, got q of shape {tuple(shape)}")
        b_count, s = shape[0], shape[1]
        n_docs = b_count
        if seqlens is not None:
            _index_arg("seqlens", seqlens, device, b_count)
    if prefix_lens is not None:
        _index_arg("prefix_lens", prefix_lens, device, n_docs)

    compiling = torch.compiler.is_compiling()
    if compiling or (device.type == "meta" and any(t is not None and t.is_meta
                                                   for t in (cu_seqlens, seqlens, prefix_lens))):
        # The host checks would read the values (a graph break, and a device sync per call): the
        # graph checks them itself, and the kernels resolve what they need at run time. Meta index
        # tensors have no values to check: shape inference (the reference backend) needs none.
        if compiling:
            _check_values_in_graph(cu_seqlens, seqlens, prefix_lens, s, max_seqlen)
        max_len = s if cu_seqlens is None else (-1 if max_seqlen is None else max_seqlen)
        causal_any = -1 if prefix_lens is not None else int(causal)
    else:
        max_len, causal_any = _check_values(cu_seqlens, seqlens, prefix_lens, s, s, max_seqlen, causal)
    return b_count, s, max_len, causal_any


def _prepare(q, k, v, *, causal, prefix_lens, seqlens, cu_seqlens, max_seqlen, dropout_p, scale, seed,
             deterministic):
    """Validate the public arguments; return the backends' inputs and whether q was packed."""
    packed = _check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__}")
    dropout_p = _validate.probability("dropout_p", dropout_p)
    if dropout_p >= 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    seed = _rng.check_op_seed(seed)
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale: expected a float or None, got {scale!r}") from None
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite float, got {scale}")
    b_count, s, max_len, causal_any = _mask_args(packed, q.shape, q.device, causal=causal, prefix_lens=prefix_lens,
                                                 seqlens=seqlens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    q4, k4, v4 = (x.unsqueeze(0) if packed else x for x in (q, k, v))
    # Kernels take any strides but a unit stride along D (what a fused QKV projection produces).
    q4, k4, v4 = (x if x.stride(-1) == 1 else x.contiguous() for x in (q4, k4, v4))
    docs = _docs_tensor(b_count, s, q.device, cu=cu_seqlens, seqlens=seqlens, prefix=prefix_lens, causal=causal)
    # An int, or under torch.compile a 0-d tensor computed in the graph (read inside the custom op)
    key = _rng.op_key(seed, _rng.STREAM_ATTN_DROPOUT) if dropout_p > 0 else 0
    # rows: "none" / "causal" when every row is one whole sequence under one plain mask (what
    # torch's own SDPA kernels take without a mask tensor), None for any per-row structure
    plain = cu_seqlens is None and seqlens is None and prefix_lens is None
    rows = ("causal" if causal else "none") if plain else None
    return dict(q4=q4, k4=k4, v4=v4, docs=docs, scale=scale, dropout_p=dropout_p, dropout_key=key,
                max_len=max_len, causal_any=causal_any, deterministic=deterministic, rows=rows), packed


# ----------------------------------------------------------------------------- reference


def _token_layout(docs: torch.Tensor, b_count: int, s: int):
    """Per token of the (B, S) grid: its document (-1 for padding), local position and prefix."""
    d = docs.to(torch.int64)
    pos = torch.arange(s, device=docs.device)
    rows = torch.arange(b_count, device=docs.device)
    member = ((d[:, 0, None, None] == rows[None, :, None])
              & (pos[None, None, :] >= d[:, 1, None, None])
              & (pos[None, None, :] < (d[:, 1] + d[:, 2])[:, None, None]))  # (N, B, S)
    # documents never overlap, so at most one term of the sum is nonzero
    ids = torch.arange(1, d.shape[0] + 1, device=docs.device)
    doc_of = (member.to(torch.int64) * ids[:, None, None]).sum(0) - 1
    inside = doc_of >= 0
    safe = doc_of.clamp(min=0)
    start = d[:, 1].index_select(0, safe.reshape(-1)).reshape(b_count, s) if d.shape[0] else torch.zeros_like(safe)
    prefix = d[:, 3].index_select(0, safe.reshape(-1)).reshape(b_count, s) if d.shape[0] else torch.zeros_like(safe)
    return doc_of, inside, pos[None, :] - start, prefix


def dropout_keep(docs: torch.Tensor, heads: int, s: int, key: int, p: float, b_count: int | None = None):
    """The kept entries of the dropout mask, bool ``(B, H, S, S)`` over (row, query head, query, key).

    Entries that do not pair a query with a key of its own document are meaningless (and never
    used). This is the contract every backend reproduces: see the module docstring.
    """
    b_count = int(docs[:, 0].max()) + 1 if b_count is None else b_count
    doc_of, _, local, _ = _token_layout(docs, b_count, s)
    h = torch.arange(heads, device=docs.device)
    rk = _rng.mix32(key ^ (doc_of.clamp(min=0)[:, None, :] * heads + h[None, :, None]))  # (B, H, S)
    r = _rng.mix32(_rng.mix32(rk ^ _rng.colmix(local[:, None, :]))[..., None] ^ _rng.colmix(local[:, None, None, :]))
    return (r >> 8) >= _rng.threshold24(p)


def reference(q4, k4, v4, docs, *, scale, dropout_p=0.0, dropout_key=0, compute_dtype=None):
    """Ground truth on the normal form, with plain autograd.

    q4 ``(B, S, H, D)``, k4 / v4 ``(B, S, Hk, D)`` (any float dtype), docs int32 ``(N, 4)``.
    The math (scores, softmax, dropout, the product with V) runs densely over each batch row
    with the documents' mask, in ``compute_dtype`` (default float32, float64 for float64 inputs;
    tests pass a half dtype to measure what plain PyTorch loses in it). Returns ``(out, lse)``:
    out ``(B, S, H, D)`` in the dtype of q (0 outside every document) and the detached lse
    ``(B, H, S)`` in float32 (float64 for float64 inputs), ``-inf`` outside every document.
    """
    with _validate.autocast_off(q4.device.type):  # the math runs in compute_dtype, not autocast's
        return _reference(q4, k4, v4, docs, scale, dropout_p, dropout_key, compute_dtype)


def _reference(q4, k4, v4, docs, scale, dropout_p, dropout_key, compute_dtype):
    b_count, s, h, _ = q4.shape
    group = h // k4.shape[2]
    acc = _acc_dtype(q4.dtype)
    cd = compute_dtype or acc
    doc_of, inside, local, prefix = _token_layout(docs, b_count, s)
    allowed = ((doc_of[:, :, None] == doc_of[:, None, :]) & inside[:, :, None]
               & (local[:, None, :] <= torch.maximum(local, prefix - 1)[:, :, None]))  # (B, S, S)
    # Zero the padding first: it may hold anything (tests poison it with NaN), and 0 * NaN = NaN.
    pad = ~inside[:, :, None, None]
    qc, kc, vc = (x.to(cd).masked_fill(pad, 0.0) for x in (q4, k4, v4))
    kc, vc = (x.repeat_interleave(group, dim=2) if group > 1 else x for x in (kc, vc))
    scores = torch.einsum("bihd,bjhd->bhij", qc, kc) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    # Padding rows have no key at all: give them finite scores (so softmax and its gradient stay
    # finite) and zero their probabilities afterwards.
    empty = ~inside[:, None, :, None]
    scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores.detach(), dim=-1).masked_fill(~inside[:, None, :], float("-inf"))
    if dropout_p > 0:
        keep = dropout_keep(docs, h, s, dropout_key, dropout_p, b_count)
        probs = probs * (keep.to(cd) * (1.0 / (1.0 - dropout_p)))
    out = torch.einsum("bhij,bjhd->bihd", probs, vc)
    return out.to(q4.dtype).contiguous(), lse.to(acc)  # the layout every backend returns


def _run_reference(q4, k4, v4, docs, scale, dropout_p, dropout_key, **_):
    return reference(q4, k4, v4, docs, scale=scale, dropout_p=dropout_p, dropout_key=dropout_key)


# ----------------------------------------------------------------------------- kernels: custom ops


_KERNEL_MODULES: dict = {}  # name -> (module, None) or (None, why it cannot be imported)


def _kernel_module(name: str):
    """(module, None) or (None, why it cannot be imported). Imported on first use, not at import
    time: the kernel modules may import this one (its reference), and a missing one must only
    make its backend refuse. A plain dict cache, which torch.compile traces (dispatch asks for it
    inside compiled code; Dynamo refuses importlib and warns on functools.lru_cache)."""
    if name not in _KERNEL_MODULES:
        _import_kernel_module(name)
    return _KERNEL_MODULES[name]


@torch.compiler.assume_constant_result
def _import_kernel_module(name: str) -> bool:
    """Import a kernel module into ``_KERNEL_MODULES``; run as plain Python even while Dynamo traces
    (its result is a constant to the graph), so a first use inside compiled code does not break it."""
    try:
        _KERNEL_MODULES[name] = (importlib.import_module(f"fastpt.ops.{name}"), None)
    except ImportError as exc:
        _KERNEL_MODULES[name] = (None, f"fastpt.ops.{name} is not available ({exc})")
    return True


def _kernels(backend: str):
    """The module-like object with the backend's ``forward`` and ``backward``."""
    if backend == "cpu":
        return _cpu
    module, why = _kernel_module({"triton": "attention_triton", "cuda": "attention_cuda"}[backend])
    if module is None:
        raise _dispatch.BackendError(f"attention: backend {backend!r} cannot run: {why}")
    return module


def _resolve(docs: torch.Tensor, max_len: int, causal_any: int) -> tuple[int, bool]:
    """Fill in what the caller could not know without a device sync (-1: unknown)."""
    if max_len < 0:
        max_len = int(docs[:, 2].max()) if docs.shape[0] else 0
    if causal_any < 0:
        causal_any = int(bool((docs[:, 3] < docs[:, 2]).any())) if docs.shape[0] else 0
    return max_len, bool(causal_any)


@torch.library.custom_op("fastpt::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor, scale: float,
                   dropout_p: float, dropout_key: int, max_len: int, causal_any: int, deterministic: bool,
                   backend: str, key_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, S, H, D) in q's dtype, lse (B, H, S) float32 / float64), both contiguous.

    ``key_t``: the dropout key as a 0-d integer tensor (what a seed drawn under torch.compile
    becomes), read here on the host; None: ``dropout_key`` is the key."""
    dropout_key = _rng.key_value(dropout_key, key_t)
    max_len, causal = _resolve(docs, max_len, causal_any)
    with torch.autocast(q.device.type, enabled=False):
        out, lse = _kernels(backend).forward(q, k, v, docs, scale=scale, dropout_p=dropout_p,
                                             dropout_key=dropout_key, max_len=max_len, causal_any=causal)
    return out.contiguous(), lse.contiguous()


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, docs, scale, dropout_p, dropout_key, max_len, causal_any, deterministic, backend,
                        key_t):
    b_count, s, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b_count, h, s), dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("fastpt::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, docs: torch.Tensor, scale: float, dropout_p: float, dropout_key: int,
                   max_len: int, causal_any: int, deterministic: bool, backend: str,
                   key_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, shaped like q, k, v, in their dtype."""
    dropout_key = _rng.key_value(dropout_key, key_t)
    # An upstream gradient may be a broadcast (out.sum().backward() hands in stride-0 ones): give
    # the kernels the unit inner stride and real rows they are promised.
    if dout.stride(-1) != 1 or 0 in dout.stride():
        dout = dout.contiguous()
    max_len, causal = _resolve(docs, max_len, causal_any)
    with torch.autocast(q.device.type, enabled=False):
        dq, dk, dv = _kernels(backend).backward(dout, q, k, v, out, lse, docs, scale=scale, dropout_p=dropout_p,
                                                dropout_key=dropout_key, max_len=max_len, causal_any=causal,
                                                deterministic=deterministic)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, docs, scale, dropout_p, dropout_key, max_len, causal_any,
                        deterministic, backend, key_t):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, docs, *args, key_t = inputs
    out, lse = output
    ctx.args = args  # scale, dropout_p, dropout_key, max_len, causal_any, deterministic, backend
    ctx.save_for_backward(q, k, v, out, lse, docs, key_t)


def _backward(ctx, dout, _dlse):
    # lse is an auxiliary output (the public functions never return it): only out has a gradient
    q, k, v, out, lse, docs, key_t = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, docs, *ctx.args, key_t)
    return (dq, dk, dv) + (None,) * 9


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _run_kernel(name: str):
    def run(q4, k4, v4, docs, scale, dropout_p, dropout_key, max_len, causal_any, deterministic, **_):
        key, key_t = _rng.split_key(dropout_key)
        return _attention_fwd(q4, k4, v4, docs, scale, dropout_p, key, max_len, causal_any, deterministic, name,
                              key_t)
    return run


_run_cpu_kernel = _run_kernel("cpu")


# ----------------------------------------------------------------------------- dispatch


def _cpu_supports(q4, dropout_p, **_):
    if q4.device.type != "cpu":
        return f"needs cpu tensors, got {q4.device.type}"
    return None


def _cpu_run(q4, k4, v4, docs, scale, dropout_p, dropout_key, **kw):
    if dropout_p > 0:  # torch's CPU kernel has no counter-based dropout: plain autograd on torch ops
        if isinstance(dropout_key, torch.Tensor) or torch.compiler.is_compiling():
            # Under torch.compile (a key computed in the graph, or an int): the grouped path reads the
            # documents on the host (a graph break per layer); the dense reference traces whole and
            # Inductor fuses it.
            return _run_reference(q4, k4, v4, docs, scale, dropout_p, dropout_key)
        return _cpu.dropout_attention(q4, k4, v4, docs, scale, dropout_p, dropout_key), None
    return _run_cpu_kernel(q4, k4, v4, docs, scale, dropout_p, dropout_key, **kw)


def _module_supports(name: str, device_ok):
    def supports(q4, k4, v4, dropout_p, **_):
        why = device_ok(q4.device)
        if why is not None:
            return why
        module, why = _kernel_module(name)
        if module is None:
            return why
        return module.supports(q4, k4, v4, dropout_p)
    return supports


def _sdpa_supports(q4, k4, dropout_p, deterministic, rows, **_):
    if q4.device.type != "cuda":
        return f"needs cuda tensors, got {q4.device.type} (the cpu backend serves CPU tensors)"
    if rows is None:
        return "serves whole rows under no mask or a causal one; seqlens, cu_seqlens and prefix_lens go to fastpt's kernels"
    if dropout_p > 0:
        return "dropout_p > 0 needs fastpt's counter-based dropout RNG, which torch's kernels do not draw from"
    if deterministic:
        return "deterministic=True: torch's flash / cuDNN backward may accumulate with atomics"
    if q4.dtype not in (torch.float16, torch.bfloat16):
        return f"serves float16 and bfloat16 (torch's fused kernels), got {q4.dtype}"
    if k4.shape[2] != q4.shape[2] and not _SDPA_GQA:
        return f"GQA needs torch >= 2.5 (enable_gqa), this is {torch.__version__}"
    return None


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _sdpa_run(q4, k4, v4, scale, rows, **kw):
    """torch's own SDPA (cuDNN / flash on Hopper, picked by torch): on a plain or causal mask it
    measured 1.5-2x faster than fastpt's Triton kernel on an H200 (benches/results/attention-gpu.md),
    so the dispatcher takes it there; fastpt's kernels serve every per-row / per-document mask."""
    gqa = dict(enable_gqa=True) if k4.shape[2] != q4.shape[2] else {}
    try:
        out = F.scaled_dot_product_attention(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2),
                                             is_causal=rows == "causal", scale=scale, **gqa)
    except NotImplementedError:
        # torch.func's forward-mode transforms (jvp, jacfwd, hessian): torch's flash / cuDNN kernels have no
        # forward-AD formula, and SDPA picks them without asking; the reference's plain ops have one
        if not _dispatch.transforms_active():
            raise
        return _run_reference(q4, k4, v4, scale=scale, **kw)
    return out.transpose(1, 2).contiguous(), None


def _probe(device):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, h, 32, generator=g).to(device) for h in (4, 2, 2))
    return _prepare(q, k, v, causal=True, prefix_lens=None, seqlens=torch.tensor([16, 9]), cu_seqlens=None,
                    max_seqlen=None, dropout_p=0.0, scale=None, seed=0, deterministic=False)[0]


# Order: the cpu backend accepts only CPU tensors, so on CUDA the order is sdpa (plain / causal
# rows only), triton, then cuda, then the reference. Measured on an H200 (2026-11-26,
# benches/results/attention-gpu.md): torch's cuDNN SDPA beats fastpt's Triton kernel 1.5-2x where
# it needs no mask; Triton beats torch 1.5-3x on packed documents and prefix-LM; the CUDA C++
# mma.sync kernel runs at about half of Triton's rate, so it stays behind it. cpu comes first so
# that CPU tensors never land on the Triton interpreter (a test device) when TRITON_INTERPRET=1 is set.
OP = _dispatch.Op("attention", [
    _dispatch.Backend("cpu", _cpu.unavailable, _cpu_supports, _cpu_run),  # torch's kernel, not _C
    _dispatch.backend("sdpa", _sdpa_supports, _sdpa_run, transform_safe=True),  # torch's own op
    _dispatch.backend("triton", _module_supports("attention_triton", _dispatch.triton_device_refusal), _run_kernel("triton")),
    _dispatch.backend("cuda", _module_supports("attention_cuda", _dispatch.device_is("cuda")), _run_kernel("cuda")),
    _dispatch.backend("reference", lambda **_: None, _run_reference),
], probe=_probe)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(q, k, v):
    """What torch's SDPA does under autocast: the attention runs in the autocast dtype (float64 is left
    alone, as autocast leaves it). Tensors on a device type autocast does not know (meta) are left as
    they are (``torch.is_autocast_enabled`` raises for those)."""
    device = q.device.type if isinstance(q, torch.Tensor) else None
    if device is not None and _validate.autocast_known(device) and torch.is_autocast_enabled(device):
        dt = torch.get_autocast_dtype(device)
        return tuple(x.to(dt) if isinstance(x, torch.Tensor) and x.dtype in _AUTOCAST_ELIGIBLE else x
                     for x in (q, k, v))
    return q, k, v


# ----------------------------------------------------------------------------- public API


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              prefix_lens: torch.Tensor | None = None, seqlens: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, dropout_p: float = 0.0,
              scale: float | None = None, seed: int = 0, deterministic: bool = False,
              backend: str | None = None) -> torch.Tensor:
    """Softmax attention over padded rows or packed documents, with every pre-training mask.

    Args:
        q: ``(B, S, H, D)`` as a QKV projection produces it, or packed ``(T, H, D)`` with
            ``cu_seqlens``; float16, bfloat16, float32 (float64 on the cpu and reference backends).
        k, v: ``(B, S, Hk, D)`` / ``(T, Hk, D)``, dtype and device of q; ``Hk`` divides ``H``
            (GQA / MQA: query head ``h`` reads kv head ``h // (H // Hk)``).
        causal: each token attends to itself and earlier tokens of its row / document.
        prefix_lens: int ``(B,)`` or ``(N,)``: bidirectional over the first ``prefix_lens[n]``
            tokens of row / document n, causal after (prefix-LM); overrides ``causal``.
        seqlens: int ``(B,)`` valid length of each right-padded row ((B, S, H, D) input only).
            Padded query rows output 0; padded keys are never attended.
        cu_seqlens: int32 ``(N + 1,)`` document boundaries of packed input: 0, ..., T. Tokens
            attend only inside their document.
        max_seqlen: optional longest document (as in FlashAttention); computed when None.
        dropout_p: attention-probability dropout in [0, 1), counter-based: a pure function of
            ``(seed, document, head, query, key)``, identical on every backend that supports it.
        scale: score scale, default ``1 / sqrt(D)``.
        seed: int in ``[0, 2**64)`` for the dropout mask (change it every step), or a one-element
            integer tensor: read once on the host in eager code; under ``torch.compile`` (where a
            host read breaks the graph) its key is computed in the graph and read inside the
            custom op, and a CPU backend call with dropout runs the dense reference math, which
            Inductor fuses. ``fastpt.nn`` layers draw it with ``ops._rng.fresh_seed``.
        deterministic: the backward uses no floating-point atomics (kernels that have them).
        backend: None (fastest that fits) or "cpu", "sdpa" (torch's own fused kernels on CUDA,
            plain or causal rows only), "triton", "cuda", "reference". Under a ``torch.func``
            transform None runs "sdpa" where it serves, else "reference"; "cpu", "triton" and
            "cuda" raise ``fastpt.BackendError`` there.

    Returns:
        ``out`` shaped like q, in q's dtype (fp32 accumulation). Differentiable in q, k, v.
        Under ``torch.autocast`` the inputs are cast to the autocast dtype first.

    Raises:
        TypeError / ValueError naming the argument: non-tensors, mismatched dtypes, devices or
        shapes, ``H % Hk != 0``, a head dim outside [1, 256], cu_seqlens that is not int32, does
        not start at 0, decreases or does not end at T, seqlens outside [0, S], a negative prefix
        or one longer than its row / document, ``max_seqlen`` below the longest document,
        dropout_p outside [0, 1); ``fastpt.BackendError`` when the forced backend cannot serve
        (with every backend's reason). Under ``torch.compile`` the checks of the values of
        cu_seqlens / seqlens / prefix_lens (against each other and max_seqlen) run inside the
        graph instead: RuntimeError naming the argument on CPU tensors, a device-side assert on
        CUDA (no graph break and no device sync either way).
    """
    q, k, v = _autocast(q, k, v)
    inputs, packed = _prepare(q, k, v, causal=causal, prefix_lens=prefix_lens, seqlens=seqlens,
                              cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, scale=scale,
                              seed=seed, deterministic=deterministic)
    out, _ = OP(backend, **inputs)
    return out[0] if packed else out


def _sdpa_fallback(query, key, value, attn_mask, dropout_p, enable_gqa) -> str | None:
    """Why ``sdpa`` hands these inputs to torch's SDPA unchanged (the kernels do not express them), or None."""
    if attn_mask is not None:
        return "a general attn_mask"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return "inputs that are not 4-D (B, H, S, D) tensors"
    if (key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2] or key.shape[3] != query.shape[3]
            or value.shape != key.shape):
        return (f"key / value of shapes {tuple(key.shape)} / {tuple(value.shape)}, not (B, Hk, S, D) with the "
                f"B, S and D of query {tuple(query.shape)}")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        return f"Hk={key.shape[1]} key heads for H={query.shape[1]} query heads without enable_gqa"
    if 0 in (query.shape[1], key.shape[1], query.shape[3]):
        return f"no heads or an empty head dim (query {tuple(query.shape)}, key {tuple(key.shape)})"
    if query.shape[3] > MAX_HEAD_DIM:
        return f"head dim D={query.shape[3]} over {MAX_HEAD_DIM}"
    if isinstance(dropout_p, (int, float)) and dropout_p == 1.0:
        return "dropout_p=1 (all zeros)"
    return None


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
         seed: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on ``(B, H, S, D)``.

    query ``(B, H, S, D)``, key / value ``(B, Hk, S, D)`` (``Hk < H`` needs ``enable_gqa=True``,
    as in torch). The kernels get ``transpose(1, 2)`` views, never copies, and the output is
    returned as a ``(B, H, S, D)`` view. What the kernels do not express falls back to torch's
    SDPA unchanged: a general ``attn_mask``, inputs that are not 4-D, query and key lengths or
    head dims that differ, head dims over 256, ``dropout_p=1`` (zeros), or ``Hk != H`` without
    ``enable_gqa`` (torch then raises its error), no heads or an empty head dim (torch's empty
    result). A forced ``backend`` raises ``fastpt.BackendError`` for such inputs (none of fastpt's
    backends serves them), and an unknown name raises ValueError whatever the inputs.
    Dropout uses the counter-based RNG with ``seed``; when None, a seed is drawn from torch's
    default generator (so ``torch.manual_seed`` makes it reproducible). Raises what
    ``attention`` raises.
    """
    is_causal, enable_gqa = _validate.flag("is_causal", is_causal), _validate.flag("enable_gqa", enable_gqa)
    OP.check_name(backend)  # also where torch's SDPA runs: a misspelt name is an error either way
    why = _sdpa_fallback(query, key, value, attn_mask, dropout_p, enable_gqa)
    if why is not None:
        if backend is not None:
            raise _dispatch.BackendError(
                f"sdpa: forced backend {backend!r} cannot serve these inputs ({why}); sdpa hands them to "
                f"torch.nn.functional.scaled_dot_product_attention, none of fastpt's backends (backend=None runs it)")
        kw = dict(enable_gqa=True) if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **kw)
    if dropout_p and seed is None:
        seed = _rng.fresh_seed()
    try:
        out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=bool(is_causal),
                        dropout_p=dropout_p, scale=scale, seed=0 if seed is None else seed, backend=backend)
    except (TypeError, ValueError) as exc:  # name sdpa's own arguments, as torch's errors do
        msg = str(exc)
        for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
            if msg.startswith(f"{short}:"):
                raise type(exc)(name + msg[len(short):]) from exc
        raise
    return out.transpose(1, 2)
