"""The ``cpu`` backend of fused attention (the contract and the reference are in ``attention.py``).

* Without dropout: torch's CPU flash-attention kernel once per group of documents that share a
  length and a mask kind (``forward`` / ``backward``, run inside the ``fastpt::attention_*`` custom
  ops); prefix-LM documents as three unmasked pieces merged by their log-sum-exps. No dense (S, S)
  mask, and no work outside the documents. Its backward (torch's) recomputes the probabilities from
  the saved log-sum-exp, so float32 gradients carry a relative error of ~1 ``ulp(max |score|)``:
  over the FlashAttention rule from max |score| ~ 17 (``attention.py``, Numerics).
* With dropout (torch's CPU kernel draws from its own generator, not the counter-based one):
  ``dropout_attention``, plain autograd on torch ops with the mask of ``attention.dropout_keep``
  applied by the C++ kernels of ``ops/dropout.py``: dense windows of the rows, or one dense
  attention per group of equal documents, whichever the cost model picks. Numerics as in
  FlashAttention: the two products in the inputs' dtype for bfloat16 (BLAS accumulates in
  float32; 18.6 -> 11.2 ms fwd+bwd against float32 products on 32 x 128 tokens, 4 heads of 64,
  2-core Zen 5), in float32 for float16 (no native float16 products on most CPUs) and float32;
  softmax and dropout in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch

from .. import _native
from . import _rng
from ._validate import acc_dtype as _acc_dtype
from .dropout import attention_dropout, attention_dropout_rows


# ----------------------------------------------------------------------------- torch's flash kernel, per document group

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def unavailable() -> str | None:
    if _FLASH_CPU is None or _FLASH_CPU_BWD is None:
        return f"torch {torch.__version__} lacks aten::_scaled_dot_product_flash_attention_for_cpu(_backward)"
    return None


def _mask_kind(length: int, prefix: int) -> int:
    """Canonical prefix: ``length`` for bidirectional, 0 for causal (a prefix of 1 is causal too),
    so documents that differ only in how their mask is spelled share one kernel call."""
    if prefix >= length:
        return length
    return 0 if prefix <= 1 else prefix


class _Group:
    """Documents of one (length, prefix) batched into one kernel call.

    ``take`` maps a ``(B, S, ...)`` tensor to ``(n, L, ...)``: a view when the documents are
    adjacent in one row (packed) or at the same offset of consecutive rows (a batch), a gather
    (copy) otherwise. ``put`` writes ``(n, L, ...)`` values back."""

    def __init__(self, length, prefix, members, device):
        self.length, self.prefix, self.n = length, prefix, len(members)
        b0, s0 = members[0]
        if all(b == b0 and s == s0 + i * length for i, (b, s) in enumerate(members)):
            self._view = lambda x: x[b0, s0:s0 + self.n * length].unflatten(0, (self.n, length))
        elif all(b == b0 + i and s == s0 for i, (b, s) in enumerate(members)):
            self._view = lambda x: x[b0:b0 + self.n, s0:s0 + length]
        else:
            self._view = None
            self._rows = torch.tensor([b for b, _ in members], device=device)[:, None]
            self._cols = torch.tensor([s for _, s in members], device=device)[:, None] + torch.arange(length,
                                                                                                       device=device)

    def take(self, x):
        return self._view(x) if self._view is not None else x[self._rows, self._cols]

    def put(self, dst, value):
        if self._view is not None:
            self._view(dst).copy_(value)
        else:
            dst[self._rows, self._cols] = value


def _cpu_plan(docs: torch.Tensor, b_count: int, s: int):
    """None when every row of the batch is one full-length document with one mask kind (one
    kernel call on the tensors as they are), else the list of groups."""
    rows = docs.tolist()  # a CPU tensor: no sync
    kinds = {_mask_kind(length, p) for _, _, length, p in rows}
    if len(rows) == b_count and len(kinds) == 1 and all(
            r[0] == i and r[1] == 0 and r[2] == s for i, r in enumerate(rows)):
        return None, kinds.pop()
    groups: dict[tuple[int, int], list] = {}
    for b, s0, length, p in rows:
        if length > 0:
            groups.setdefault((length, _mask_kind(length, p)), []).append((b, s0))
    return [_Group(length, p, members, docs.device) for (length, p), members in groups.items()], None


def _bhsd(x):
    return x.transpose(1, 2)  # (n, L, H, D) <-> (n, H, L, D): views, never copies


def _product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the dropout paths' products: bfloat16 stays, the rest ``acc_dtype``."""
    return dtype if dtype == torch.bfloat16 else _acc_dtype(dtype)


def _flash(q, k, v, causal, scale):
    """torch's CPU flash kernel on (n, L, H, D) views: out (n, Lq, H, D), lse (n, H, Lq).

    A negative scale runs as ``(-q, -scale)``, the same scores: the kernel returns NaN for a
    negative scale under its causal mask (torch 2.13), and for a zero one, which runs as
    ``(0 * q, 1)`` (all scores 0)."""
    if scale < 0:
        q, scale = -q, -scale
    elif scale == 0:
        q, scale = torch.zeros_like(q), 1.0
    out, lse = _FLASH_CPU(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale)
    return _bhsd(out), lse


def _flash_bwd(dout, q, k, v, out, lse, causal, scale):
    flip, zero = scale < 0, scale == 0  # as in _flash; then dq is minus the gradient of -q, or 0
    if flip:
        q, scale = -q, -scale
    elif zero:
        q, scale = torch.zeros_like(q), 1.0
    dq, dk, dv = (_bhsd(g) for g in _FLASH_CPU_BWD(_bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse,
                                                   0.0, causal, scale=scale))
    return (-dq if flip else torch.zeros_like(dq) if zero else dq), dk, dv


def _docs_fwd(q, k, v, prefix, scale):
    """Documents of one length L and canonical prefix, batched: q (n, L, H, D), k / v (n, L, Hk, D).

    Prefix-LM (0 < prefix < L) runs as three unmasked calls instead of one with an (L, L) mask:
    prefix queries over prefix keys (bidirectional), the rest over the prefix keys, and the rest
    over themselves (causal); the last two merge through their log-sum-exps. That skips the
    masked upper triangle of the rest (a dense mask would compute it and throw it away) and
    allocates no mask.
    """
    length = q.shape[1]
    if prefix >= length or prefix == 0:
        return _flash(q, k, v, prefix == 0, scale)
    p = prefix
    out_head, lse_head = _flash(q[:, :p], k[:, :p], v[:, :p], False, scale)
    out_b, lse_b = _flash(q[:, p:], k[:, :p], v[:, :p], False, scale)
    out_c, lse_c = _flash(q[:, p:], k[:, p:], v[:, p:], True, scale)
    lse_tail = torch.logaddexp(lse_b, lse_c)
    wb, wc = (_bhsd(torch.exp(x - lse_tail))[..., None] for x in (lse_b, lse_c))  # (n, L - p, H, 1)
    acc = lse_tail.dtype  # merged in fp32 (fp64), rounded once
    out_tail = (out_b.to(acc) * wb + out_c.to(acc) * wc).to(q.dtype)
    return torch.cat([out_head, out_tail], 1), torch.cat([lse_head, lse_tail], 2)


def _docs_bwd(dout, q, k, v, out, lse, prefix, scale):
    """Gradients of ``_docs_fwd``. The kernel's backward takes the saved out and lse as given, so
    each piece of a prefix-LM document gets the merged (global) ones and yields its share."""
    length = q.shape[1]
    if prefix >= length or prefix == 0:
        return _flash_bwd(dout, q, k, v, out, lse, prefix == 0, scale)
    p = prefix
    head = _flash_bwd(dout[:, :p], q[:, :p], k[:, :p], v[:, :p], out[:, :p], lse[..., :p], False, scale)
    cross = _flash_bwd(dout[:, p:], q[:, p:], k[:, :p], v[:, :p], out[:, p:], lse[..., p:], False, scale)
    tail = _flash_bwd(dout[:, p:], q[:, p:], k[:, p:], v[:, p:], out[:, p:], lse[..., p:], True, scale)
    dq = torch.cat([head[0], cross[0] + tail[0]], 1)
    dk, dv = (torch.cat([head[i] + cross[i], tail[i]], 1) for i in (1, 2))
    return dq, dk, dv


def forward(q4, k4, v4, docs, *, scale, **_):
    b_count, s, h, _ = q4.shape
    if q4.numel() == 0:  # no token (torch's kernel dies of SIGFPE on a length of 0)
        return q4.new_zeros(q4.shape), torch.full((b_count, h, s), float("-inf"), dtype=_acc_dtype(q4.dtype))
    groups, kind = _cpu_plan(docs, b_count, s)
    if groups is None:
        out, lse = _docs_fwd(q4, k4, v4, kind, scale)
    else:
        out = q4.new_zeros(q4.shape)
        lse = torch.full((b_count, h, s), float("-inf"), dtype=_acc_dtype(q4.dtype), device=q4.device)
        for g in groups:
            o, lg = _docs_fwd(g.take(q4), g.take(k4), g.take(v4), g.prefix, scale)
            g.put(out, o)
            g.put(lse.transpose(1, 2), lg.transpose(1, 2))
    return _nan_rows(q4, out, lse, groups is None)


def _nan_rows(q4, out, lse, whole):
    """NaN output and lse for the query rows holding a NaN (in a document), as every other backend
    gives. torch's CPU kernel does not: for such a row it returned output 0 and lse 0 on 13-token
    rows, NaN on 128- and 600-token ones (torch 2.13), so the rows are set here whatever it did.
    Padded rows (``whole`` False: lse -inf) keep their 0.

    First one sum of q (no tensor of its size): NaN anywhere in q makes it NaN. It also turns NaN on
    inputs without one (an inf and a -inf, or partial sums overflowing both ways), which only
    costs the exact per-row test below, never a wrong result. The per-row test alone (a (B, S, H)
    mask from a full read of q, then a host read) cost 20-85% on top of the kernel at ViT shapes;
    the forward with the sum first: (8, 50, 3, 64) 0.78 -> 0.51 ms, (32, 128, 4, 64) 10.6 -> 8.0
    ms (torch's SDPA 0.29 and 7.2; 1 thread, loaded Xeon)."""
    if not bool(torch.isnan(q4.sum())):
        return out, lse
    bad = q4.isnan().any(-1)  # (B, S, H)
    if not bool(bad.any()):
        return out, lse
    if not whole:
        bad = bad & (lse.transpose(1, 2) > float("-inf"))
    return out.masked_fill(bad[..., None], float("nan")), lse.masked_fill(bad.transpose(1, 2), float("nan"))


def backward(dout, q4, k4, v4, out, lse, docs, *, scale, **_):
    if q4.numel() == 0:
        return tuple(torch.zeros(x.shape, dtype=x.dtype) for x in (q4, k4, v4))
    if q4.dtype in (torch.float16, torch.bfloat16):
        # torch's CPU kernel keeps its dK / dV partial sums in the half dtype across query blocks:
        # on 1000-token documents that measured 3-4x the error of plain PyTorch in that dtype (the
        # tests' FlashAttention rule), and fp16 is emulated (slower) on most CPUs anyway. In fp32
        # the backward costs five (B, S, H, D) conversions and meets the rule.
        grads = _cpu_backward_native(*(x.float() for x in (dout, q4, k4, v4, out)), lse, docs, scale=scale)
        return tuple(g.to(q4.dtype) for g in grads)
    return _cpu_backward_native(dout, q4, k4, v4, out, lse, docs, scale=scale)


def _cpu_backward_native(dout, q4, k4, v4, out, lse, docs, *, scale):
    b_count, s, _, _ = q4.shape
    groups, kind = _cpu_plan(docs, b_count, s)
    if groups is None:
        return _docs_bwd(dout, q4, k4, v4, out, lse, kind, scale)
    # padding tokens get exactly zero gradient
    dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q4, k4, v4))
    lse_bsh = lse.transpose(1, 2)
    for g in groups:
        grads = _docs_bwd(*(g.take(x) for x in (dout, q4, k4, v4, out)), g.take(lse_bsh).transpose(1, 2), g.prefix,
                          scale)
        for dst, val in zip((dq, dk, dv), grads):
            g.put(dst, val)
    return dq, dk, dv


# ----------------------------------------------------------------------------- dropout


def dropout_attention(q4, k4, v4, docs, scale, p, key):
    """Attention with counter-based dropout on CPU tensors: the dense-window or the grouped path
    (``_dense_window`` decides), in the inputs' own dtypes whatever autocast says (module docstring)."""
    b_count, s = q4.shape[:2]
    width = _dense_window(docs.tolist(), b_count, s)
    with torch.autocast(q4.device.type, enabled=False):
        if width:
            return _dense_dropout_attention(q4, k4, v4, docs, scale, p, key, width)
        return _grouped_dropout_attention(q4, k4, v4, docs, scale, p, key)


def _dense_window(rows: list, b_count: int, s: int) -> int | None:
    """Which dropout path pays: the window width W of the dense path, or None for the grouped one.

    The dense path cuts the (B, S) rows into (B * S / W, W) windows, W the shortest divisor of S
    that no document crosses (the README demo hands in its 32 rows of 128 tokens as one packed
    4096-token row: W = 128), and computes all B * S * W (query, key) pairs of every head in a few
    large ops. The grouped path computes only the documents' own sum(L^2) pairs, at about the same
    cost per pair, but runs a dozen small ops (gathers, scatters, copies) per group of equal
    (length, mask kind) documents, forward and backward. Both pay one such set, so dense when
    ``B * S * W < sum(L^2) + 24576 * (groups - 1)`` (a tie goes to grouped: fewer pairs held).

    Measured (2-core Zen 5, torch 2.13, 2 threads, fwd + bwd, H = 4, D = 64, float32 and bfloat16
    inputs, documents cut at random): dense 42-51 ns per pair; a group 1.0-1.5 ms (~24k pairs)
    on top of its pairs. 32 x 128 tokens, 2-8 documents per row: dense 18-30 ms, grouped 56-113 ms;
    8 x 512, 2-16 per row: dense 96-121 ms, grouped 52-90 ms; 2 x 2048, 4-30 per row: dense
    400-426 ms, grouped 58-240 ms. The rule picks the faster path in all 34 cases of that sweep
    that are not ties. At H = 12 (D = 64) or H = 8 (D = 128) a group costs more pairs' worth and
    the rule errs towards grouped (by up to 1.6x on 8 x 512 with 16 documents per row), the path
    that also holds less memory: the dense one keeps two (B * S / W, H, W, W) float32 tensors per
    layer for the backward.
    """
    kinds = {(length, _mask_kind(length, pre)) for _, _, length, pre in rows if length > 0}
    if not kinds:
        return None
    width = _shortest_window(rows, s)
    return width if b_count * s * width < sum(r[2] ** 2 for r in rows) + 24576 * (len(kinds) - 1) else None


def _shortest_window(rows: list, s: int) -> int:
    """The shortest divisor W of S such that no document of ``rows`` crosses a multiple of W."""
    longest = max(r[2] for r in rows)
    widths = sorted({w for i in range(1, math.isqrt(s) + 1) if s % i == 0 for w in (i, s // i) if w >= longest})
    return next(w for w in widths if all(s0 // w == (s0 + n - 1) // w for _, s0, n, _ in rows if n > 0))


def _row_layout(docs: torch.Tensor, b_count: int, s: int):
    """Per position of the (B, S) rows, int64 (B, S) each: its document's index in ``docs`` (-1
    outside every document), its local position (0 outside) and the last local key it may attend,
    ``max(i, P - 1)`` (S outside: padding queries see the padding keys, so that their softmax stays
    finite). One scatter over the documents' tokens, no (N, B, S) membership tensor."""
    d = docs.to(torch.int64)
    lengths = d[:, 2]
    doc = torch.repeat_interleave(torch.arange(d.shape[0], device=d.device), lengths)  # per document token
    local = torch.arange(doc.shape[0], device=d.device) - (lengths.cumsum(0) - lengths)[doc]
    layout = torch.tensor([[-1], [0], [s]], device=d.device).repeat(1, b_count * s)
    layout[:, d[doc, 0] * s + d[doc, 1] + local] = torch.stack([doc, local, torch.maximum(local, d[doc, 3] - 1)])
    return tuple(x.view(b_count, s) for x in layout)


def _dense_dropout_attention(q4, k4, v4, docs, scale, p, key, width):
    """Attention with counter-based dropout, dense over windows of ``width`` tokens (a divisor of S
    that no document crosses; S itself for whole rows): the (B * S / W, H, W, W) scores of every
    window (products in ``_product_dtype``, softmax and dropout in float32, float64 for float64
    inputs), masked to same-document pairs under the causal / prefix rule, and the dropout of
    ``attention_dropout_rows`` (the mask of ``dropout_keep``), so the result is the reference's. A few large torch ops instead of the
    grouped path's dozen per group; plain autograd. Padding outputs 0 and gets zero gradient."""
    b_count, s, h, d = q4.shape
    group, rows = h // k4.shape[2], b_count * s // width
    cd, md = _acc_dtype(q4.dtype), _product_dtype(q4.dtype)
    doc, local, reach = (x.reshape(rows, width) for x in _row_layout(docs, b_count, s))

    def heads_first(x):  # (B, S, Hx, D) -> (rows, Hx, W, D): a contiguous copy in another dtype, else a view
        return x.reshape(rows, width, -1, d).transpose(1, 2).to(md, memory_format=torch.contiguous_format)

    q, k, v = heads_first(q4) * scale, heads_first(k4), heads_first(v4)
    pad = doc < 0
    if bool(pad.any()):  # padding may hold anything (inf, NaN), and 0 * NaN = NaN
        q, k, v = (x.masked_fill(pad[:, None, :, None], 0.0) for x in (q, k, v))
    k, v = (x.repeat_interleave(group, dim=1) if group > 1 else x for x in (k, v))
    allowed = (doc[:, :, None] == doc[:, None, :]) & (local[:, None, :] <= reach[:, :, None])  # (rows, W, W)
    bias = torch.zeros(allowed.shape, dtype=md, device=q4.device).masked_fill_(~allowed, float("-inf"))[:, None]
    # in place: the product's backward does not read its output, and adding a constant needs none
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).add_(bias), dim=-1, dtype=cd)
    out = torch.matmul(attention_dropout_rows(probs, doc, local, key, p).to(md), v)  # (rows, H, W, D)
    return _contiguous_as(out.transpose(1, 2), q4.dtype).reshape(q4.shape)


def _contiguous_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, contiguous, in one copy at most (``Tensor.to(dtype, memory_format=...)`` returns
    ``x`` itself, strides and all, when the dtype already matches)."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


def _grouped_dropout_attention(q4, k4, v4, docs, scale, p, key):
    """Attention with counter-based dropout, one dense ``(n, H, L, L)`` product per group of
    equal-length, equal-mask documents (plain autograd; numerics as the dense path's). The kept
    entries are ``dropout_keep``'s for the same (document, head, query, key), so the result is the
    reference's; only the documents' own blocks are computed."""
    b_count, s, h, _ = q4.shape
    group = h // k4.shape[2]
    cd, md = _acc_dtype(q4.dtype), _product_dtype(q4.dtype)
    rows = docs.tolist()
    members: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, length, pre) in enumerate(rows):
        if length > 0:
            members.setdefault((length, _mask_kind(length, pre)), []).append(i)
    out = q4.new_zeros(q4.shape, dtype=md)  # padding outside every document stays 0
    if not members:  # no token in any document: zeros that still reach q, k, v (zero gradients, as the reference)
        out = out + sum(torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0).sum() for x in (q4, k4, v4))
    for (length, pre), idx in members.items():
        g = _Group(length, pre, [(rows[i][0], rows[i][1]) for i in idx], q4.device)
        q, k, v = (g.take(x).to(md) for x in (q4, k4, v4))  # (n, L, H(k), D)
        k, v = (x.repeat_interleave(group, dim=2) if group > 1 else x for x in (k, v))
        scores = torch.einsum("nihd,njhd->nhij", q, k) * scale
        if pre < length:  # causal or prefix-LM: key j is visible from query i iff j <= max(i, pre - 1)
            pos = torch.arange(length, device=q4.device)
            allowed = pos[None, :] <= torch.maximum(pos, torch.tensor(pre - 1, device=q4.device))[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = _drop_probs(torch.softmax(scores, dim=-1, dtype=cd), torch.tensor(idx, dtype=torch.int64), key, p)
        g.put(out, torch.einsum("nhij,njhd->nihd", probs.to(md), v))
    return out.to(q4.dtype)


def _drop_probs(probs, doc, key, p):
    """``dropout_keep``'s mask on probs ``(n, H, L, L)`` of the documents numbered ``doc`` (n,), kept
    entries scaled by ``1 / (1 - p)``: the C++ kernel (``ops/dropout.py``; one pass, 0.4 ms against
    20 ms for the torch formula on (32, 4, 128, 128) float32, 2-core Zen 5), else the torch formula."""
    if probs.device.type == "cpu" and _native.cpu_unavailable() is None:
        return attention_dropout(probs, doc, probs.shape[1], key, p)
    return _drop_probs_torch(probs, doc, key, p)


def _drop_probs_torch(probs, doc, key, p):
    """The same in torch int64 arithmetic (six elementwise ops on the (n, H, L, L) grid)."""
    _, h, length, _ = probs.shape
    doc, heads = doc.to(probs.device), torch.arange(h, device=probs.device)
    pos = torch.arange(length, device=probs.device, dtype=torch.int64)
    rk = _rng.mix32(key ^ (doc[:, None] * h + heads[None, :]))  # (n, H): as dropout_keep
    r = _rng.mix32(_rng.mix32(rk[..., None] ^ _rng.colmix(pos))[..., None] ^ _rng.colmix(pos))  # (n, H, L, L)
    keep = (r >> 8) >= _rng.threshold24(p)
    return probs * (keep.to(_acc_dtype(probs.dtype)) * (1.0 / (1.0 - p)))
