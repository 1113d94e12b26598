"""CUDA C++ backend of ``fastpt.ops.attention``: the tensor-core FlashAttention-2
kernels of ``kernels/attention*.cu``, reached through ``fastpt._C``.

This module only speaks the normalised form of the attention spec (the Python
layer in ``ops/attention.py`` builds it and owns validation, dispatch and
autograd): ``q4`` ``(B, Sq, H, D)``, ``k4``/``v4`` ``(B, Sk, Hk, D)``, any strides
with a contiguous head dim, and ``docs`` ``(N, 4)`` int32 rows
``[batch, start, length, prefix]`` on the device. Query ``i`` of a document
attends key ``j`` iff ``j < L`` and ``j <= max(i, P - 1)``; tokens outside every
document come out as zeros.

What the kernels take, and how the rest is brought to it here:

- fp16 and bf16 (fp32 accumulation); compute capability 8.0 or newer.
- head dims with compiled kernels (``head_dims()``: 32, 64, 96, 128). Any other
  head dim up to 128 is zero-padded to the next one (scores and outputs are
  unchanged by zero columns) and the result sliced back; this costs a copy.
- 16-byte aligned rows (base pointer, and batch/sequence/head strides that are
  multiples of 8 elements), which every contiguous tensor and every
  ``transpose(1, 2)`` view of one with an aligned head dim has. Other layouts
  are copied first.
- the backward is always deterministic (no atomics anywhere; GQA sums run in
  order inside one block), so ``deterministic=True`` costs nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _native
from . import _rng

_DTYPE_CODES = {torch.float16: 5, torch.bfloat16: 6}  # csrc/dtypes.h


def head_dims() -> tuple[int, ...]:
    """Head dims the CUDA kernels were compiled for (empty when ``_C`` lacks them)."""
    c = _native._C
    if c is None or not hasattr(c, "attention_cuda_head_dims"):
        return ()
    return tuple(c.attention_cuda_head_dims())


def _kernel_dim(d: int) -> int | None:
    """The compiled head dim that serves head dim ``d`` (``d`` itself or the next larger one)."""
    for hd in head_dims():
        if hd >= d:
            return hd
    return None


def supports(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, dropout_p: float) -> str | None:
    """Why this backend cannot run these inputs, or None when it can.

    Args:
        q4: ``(B, Sq, H, D)``; k4, v4: ``(B, Sk, Hk, D)`` with ``H % Hk == 0``.
        dropout_p: attention dropout probability.
    """
    why = _native.cuda_unavailable()
    if why is not None:
        return why
    if not hasattr(_native._C, "attention_fwd_cuda"):
        return "fastpt._C was built without the CUDA attention kernels (rebuild it)"
    for name, t in (("q", q4), ("k", k4), ("v", v4)):
        if t.device.type != "cuda":
            return f"{name} is on {t.device}, not on a CUDA device"
        if t.dtype not in _DTYPE_CODES:
            return f"{name} is {t.dtype}: the CUDA kernels take float16 or bfloat16"
        if t.dim() != 4:
            return f"{name} has {t.dim()} dims, expected the normalised 4-d (B, S, H, D) form"
        if t.stride(-1) != 1:
            return f"{name}.stride(-1) is {t.stride(-1)}: the head dim must be contiguous"
    if k4.device != q4.device or v4.device != q4.device:
        return f"q, k, v on different devices ({q4.device}, {k4.device}, {v4.device})"
    if k4.dtype != q4.dtype or v4.dtype != q4.dtype:
        return f"q, k, v dtypes differ ({q4.dtype}, {k4.dtype}, {v4.dtype})"
    d = q4.shape[-1]
    if k4.shape[-1] != d or v4.shape[-1] != d:
        return f"head dims differ: q {d}, k {k4.shape[-1]}, v {v4.shape[-1]}"
    if _kernel_dim(d) is None:
        return f"head dim {d}: the CUDA kernels take head dims up to {max(head_dims(), default=0)}"
    h, hk = q4.shape[2], k4.shape[2]
    if hk == 0 or h % hk != 0 or v4.shape[2] != hk:
        return f"query heads {h} must be a multiple of key/value heads {hk} (v has {v4.shape[2]})"
    if h > 65535:
        return f"{h} heads: the CUDA kernels take at most 65535"
    if k4.shape[0] != q4.shape[0] or v4.shape[:2] != k4.shape[:2]:
        return f"batch/sequence sizes differ: q {tuple(q4.shape)}, k {tuple(k4.shape)}, v {tuple(v4.shape)}"
    major, minor = torch.cuda.get_device_capability(q4.device)
    if major < 8:
        return f"compute capability {major}.{minor}: the CUDA kernels need 8.0 (Ampere) or newer"
    if not 0.0 <= float(dropout_p) < 1.0:
        return f"dropout_p {dropout_p}: expected 0 <= p < 1"
    return None


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, sequence and head strides; 0 for a dim of size 1, which is only ever indexed at 0
    (torch leaves arbitrary strides there, e.g. after unsqueeze)."""
    return tuple(t.stride(i) if t.shape[i] > 1 else 0 for i in range(3))


def _aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in _strides(t))


def _kernel_view(t: torch.Tensor, dk: int) -> torch.Tensor:
    """``t`` as the kernels take it: head dim ``dk`` (zero-padded), contiguous head dim and
    16-byte aligned rows. Copies only when it must (an expanded dout from autograd, a view at
    an odd offset, a head dim without its own kernels)."""
    if t.shape[-1] != dk:
        return F.pad(t, (0, dk - t.shape[-1]))
    if not _aligned(t):
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _params(q, k, v, out, lse, docs, *, scale, dropout_p, dropout_key, max_len, causal_any):
    c = _native._C
    p = c.AttentionParams()
    p.q, p.k, p.v, p.out, p.lse, p.docs = (t.data_ptr() for t in (q, k, v, out, lse, docs))
    p.q_sb, p.q_ss, p.q_sh = _strides(q)
    p.k_sb, p.k_ss, p.k_sh = _strides(k)
    p.v_sb, p.v_ss, p.v_sh = _strides(v)
    p.o_sb, p.o_ss, p.o_sh = _strides(out)
    p.B, p.Sq, p.H, p.D = q.shape
    p.Sk, p.Hk = k.shape[1], k.shape[2]
    p.num_docs = docs.shape[0]
    # max_seqlen is an upper bound (FlashAttention's meaning): the kernel refuses one past the sequence
    p.max_len = min(int(max_len), p.Sq, p.Sk)
    p.scale = float(scale)
    threshold = _rng.threshold24(dropout_p) if dropout_p > 0.0 else 0
    if threshold:  # a rate under 2^-25 drops nothing: no dropout (the backward would skip keep_scale)
        p.dropout_threshold24 = threshold
        p.dropout_key = int(dropout_key) & 0xFFFFFFFF
        p.keep_scale = 1.0 / (1.0 - float(dropout_p))
    p.dtype = _DTYPE_CODES[q.dtype]
    p.flags = c.ATTN_CAUSAL_ANY if causal_any else 0
    return p


def _docs_and_len(docs: torch.Tensor, device, max_len) -> tuple[torch.Tensor, int]:
    docs = docs.to(device=device, dtype=torch.int32).contiguous()
    if docs.dim() != 2 or docs.shape[1] != 4:
        raise ValueError(f"docs: expected an (N, 4) tensor, got shape {tuple(docs.shape)}")
    if max_len is None:  # a device sync; the Python layer normally knows it
        max_len = int(docs[:, 2].max()) if docs.shape[0] else 0
    return docs, int(max_len)


def _nothing_to_do(q: torch.Tensor, docs: torch.Tensor, max_len: int) -> bool:
    """No document holds a token (or q holds none): the zero outputs are the answer, as the
    Triton and CPU backends return them."""
    return q.numel() == 0 or docs.shape[0] == 0 or max_len <= 0


def forward(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, docs: torch.Tensor, *, scale: float,
            dropout_p: float = 0.0, dropout_key: int = 0, max_len: int | None = None,
            causal_any: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward on the current CUDA stream.

    Args:
        q4: ``(B, Sq, H, D)`` fp16/bf16; k4, v4: ``(B, Sk, Hk, D)``, same dtype and device.
        docs: ``(N, 4)`` int32 ``[batch, start, length, prefix]`` rows (see the module docstring).
        scale: softmax scale. dropout_p, dropout_key: the spec's dropout (key = stream key of the seed).
        max_len: largest document length (computed from ``docs`` with a sync when None).
        causal_any: some document has prefix < length (only orders the blocks; any value is correct).

    Returns:
        ``out`` ``(B, Sq, H, D)`` in q's dtype (zeros outside the documents) and
        ``lse`` ``(B, H, Sq)`` float32, the natural-log log-sum-exp of the scaled scores
        (entries outside the documents undefined).
    """
    d = q4.shape[-1]
    dk = _kernel_dim(d)
    q, k, v = (_kernel_view(t, dk) for t in (q4, k4, v4))
    docs, max_len = _docs_and_len(docs, q.device, max_len)
    b, sq, h = q.shape[:3]
    # Zeros: the kernels never write rows outside the documents (csrc/attention.h).
    out = torch.zeros((b, sq, h, dk), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if _nothing_to_do(q, docs, max_len):  # empty tensors have null data pointers, which the kernels refuse
        return (out if dk == d else out[..., :d]), lse
    p = _params(q, k, v, out, lse, docs, scale=scale, dropout_p=dropout_p, dropout_key=dropout_key,
                max_len=max_len, causal_any=causal_any)
    with torch.cuda.device(q.device):
        _native._C.attention_fwd_cuda(p, _native.cuda_stream(q.device))
    return (out if dk == d else out[..., :d]), lse


def backward(dout: torch.Tensor, q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, docs: torch.Tensor, *, scale: float, dropout_p: float = 0.0, dropout_key: int = 0,
             max_len: int | None = None, causal_any: bool = True,
             deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention backward on the current CUDA stream (FlashAttention-2, recomputing P from ``lse``).

    Args:
        dout, out: ``(B, Sq, H, D)`` like q4; lse: ``(B, H, Sq)`` float32 from ``forward``;
        the rest as in ``forward``, with the same values.
        deterministic: accepted for the common interface; these kernels are always deterministic.

    Returns:
        ``dq`` ``(B, Sq, H, D)``, ``dk`` and ``dv`` ``(B, Sk, Hk, D)`` in q's dtype, zeros outside
        the documents; for GQA, dk/dv sum the query heads of each group.
    """
    del deterministic  # no atomics: every run gives the same bits
    d = q4.shape[-1]
    dk_dim = _kernel_dim(d)
    q, k, v, o, do = (_kernel_view(t, dk_dim) for t in (q4, k4, v4, out, dout))
    docs, max_len = _docs_and_len(docs, q.device, max_len)
    b, sq, h = q.shape[:3]
    lse = lse.to(device=q.device, dtype=torch.float32).contiguous()
    if tuple(lse.shape) != (b, h, sq):
        raise ValueError(f"lse: expected shape {(b, h, sq)}, got {tuple(lse.shape)}")
    dq = torch.zeros((b, sq, h, dk_dim), dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape[:3] + (dk_dim,), dtype=q.dtype, device=q.device)
    dv = torch.zeros_like(dk)
    if _nothing_to_do(q, docs, max_len):
        return (dq, dk, dv) if dk_dim == d else (dq[..., :d], dk[..., :d], dv[..., :d])
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)  # scratch: rowsum(dout * out)
    p = _params(q, k, v, o, lse, docs, scale=scale, dropout_p=dropout_p, dropout_key=dropout_key,
                max_len=max_len, causal_any=causal_any)
    p.dout, p.dq, p.dk, p.dv, p.delta = (t.data_ptr() for t in (do, dq, dk, dv, delta))
    p.do_sb, p.do_ss, p.do_sh = _strides(do)
    p.dq_sb, p.dq_ss, p.dq_sh = _strides(dq)
    p.dk_sb, p.dk_ss, p.dk_sh = _strides(dk)
    p.dv_sb, p.dv_ss, p.dv_sh = _strides(dv)
    with torch.cuda.device(q.device):
        _native._C.attention_bwd_cuda(p, _native.cuda_stream(q.device))
    if dk_dim != d:
        dq, dk, dv = dq[..., :d], dk[..., :d], dv[..., :d]
    return dq, dk, dv
