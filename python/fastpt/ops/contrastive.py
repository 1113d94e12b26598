"""Contrastive losses (InfoNCE / SupCon, MoCo, SimCLR NT-Xent, CLIP) without the N x M similarity matrix.

Definitions (``^`` marks L2-normalised rows when ``normalize=True``; ``s = 1 / temperature``)::

    S[i, j]   = s * q^_i . k^_j      for the M keys, then the K queue rows (columns M .. M+K-1)
    P(i)      = keys j with key_label[j] == query_label[i]       (default: {i}, needs N == M)
    loss_i    = logsumexp_j S[i, :] - mean_{j in P(i)} S[i, j]   (= -mean over P(i) of log softmax)
    loss      = mean_i loss_i
    symmetric:  loss = (mean_i loss_i + mean_j loss'_j) / 2,  loss'_j = logsumexp_i S[:, j] - mean_{i in P'(j)} S[i, j]

This is supervised-contrastive loss ("L_out" of Khosla et al.) with keys as the other view: a row's
positives stay in its denominator, queue rows are never positives, the key->query direction
(CLIP) ignores the queue. With unique labels it is plain InfoNCE / cross-entropy.

How it is computed. The log-sum-exp terms are the op ``contrastive``: tiled kernels walk (query
block x key block) tiles of S with an online max / sum per row (and per column when symmetric, in
the same pass), keeping O(N + M) statistics; the backward recomputes each tile to produce
``dS @ keys`` and ``dS^T @ queries`` (and ``d loss / d s``). With one positive per row (no labels;
NT-Xent's other view) the op also returns the positives' scores, and its backward adds their
gradient to dS: the Triton kernels do it in float32 before dS is rounded for the tensor cores (the
positive's term nearly cancels the softmax's once the views agree), multiply by the scale and write
the gradients in the inputs' dtype, so a bf16 fwd + bwd allocates the two bf16 gradients and O(N)
float32 statistics, nothing else of size N x D. The other backends return float32 products that a
chunked torch epilogue finishes. With labels the positive term needs only per-class sums of keys:
``mean_{j in P(i)} S[i, j] = s * q^_i . (sum of keys of i's class) / |P(i)|``, O((N + M) * D) work
done with torch ops (so autograd differentiates it). ``normalize=True`` normalises in row chunks and
keeps only the inputs and their norms for the backward. Memory is O((N + M + K) * D) in every backend
but ``reference``, which materialises S (it is the fallback for float64).

Backends of ``contrastive``: ``cpu`` (csrc/contrastive_cpu.cpp: register-blocked fp32 GEMM tiles,
AVX-512 / AVX2 / baseline chosen at run time, fp16 / bf16 converted to padded fp32 copies while
packing: about 4 * (N + 2 (M + K)) * D bytes, plus one fp32 (M, D) gradient buffer per thread in the
backward), ``triton`` (contrastive_triton.py, GPU or TRITON_INTERPRET=1), ``cuda``
(kernels/contrastive.cu: wmma tensor-core tiles for fp16 / bf16, fp32 FMA tiles for fp32; scratch
O(SMs * 64 * D) plus O(N + M) statistics per split) and ``reference``.

Numerics: fp32, fp16 and bf16 inputs accumulate in fp32; the loss is returned as a float32 scalar
(float64 for float64 inputs); gradients have the dtype of the embeddings they belong to.
``normalize=True`` normalises in fp32 and rounds the unit vectors to the input dtype; its gradient
is the usual projection, O(N * D). A NaN in any embedding makes the loss and the gradients NaN, as
in eager PyTorch; an infinite one gives an inf or NaN loss (NaN once normalised). Neither raises
(checking would cost a device sync) and neither can stall a kernel.

Distributed (``gather=True``): keys (and for a symmetric loss with labels, queries) are all-gathered
across the process group. Every rank returns the loss of the concatenated global batch (the value
a single process would compute on ``torch.cat`` of all ranks' inputs, in rank order), and the
backward gives each rank's *local* embeddings exactly the gradient of that global loss: the
gather's backward sums the contributions of all ranks. Replicated inputs (temperature,
``logit_scale``) receive this rank's share; the shares sum over ranks to the global gradient. DDP
*averages* gradients over ranks, so under DDP multiply the loss by the world size for the
global-batch gradient (or keep it as is: that is the global gradient / world size). Every rank
must call the loss and its backward (they contain collectives). Queues are not gathered: in MoCo
the queue is already global and identical on every rank. Without labels, pair i of a rank is its
query i and key i, so each rank needs as many queries as keys; ranks may hold different counts.
A symmetric loss does one pass per rank over (local queries x all keys): the column statistics of
all ranks are merged by two all-reduces of M floats, and the column gradients summed by one.

The losses are plain autograd compositions around one op, ``fastpt::contrastive_lse`` (the tiled
log-sum-exp), registered with ``torch.library.custom_op`` together with a fake implementation and
its backward op ``fastpt::contrastive_lse_backward``, so ``torch.compile`` traces ``info_nce``,
``nt_xent`` and ``clip_loss`` without graph breaks. Under tracing the value checks that would read
a tensor on the host (temperature / logit_scale finite and positive) are skipped; labels still
graph-break (their checks and the class compaction depend on the label values). A temperature or
``logit_scale`` tensor on a GPU (a learnable one) is never read on the host either (that would wait for
the GPU on every call): a bad value there makes the loss NaN instead of raising ValueError.

Under a ``torch.func`` transform (grad, vmap, jacrev, ...; ``_dispatch.transforms_active``) the
custom op and the ``autograd.Function`` helpers cannot run (no functorch rules): the losses are
then composed of plain torch ops with the reference backend's math (``_plain_lse``), in float32
(float64) as everywhere, materialising the (N, M + K) scores; the temperature / logit_scale value
checks are skipped under vmap when the value is batched (it cannot be read), as under compile. ``gather=True`` is not
supported under the transforms (its collectives are autograd Functions too).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _dispatch, _native
from . import _validate
from ._validate import FLOAT_DTYPES
from ._validate import acc_dtype as _acc_dtype
from . import contrastive_blas as _blas
from . import contrastive_triton as _triton

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100

# Instruction set forced on the C++ kernels: 0 = widest the CPU supports (tests set 1, 2, 3).
_CPU_ISA = 0


# ----------------------------------------------------------------------------- validation


def _embeddings(name: str, t, like: torch.Tensor | None = None, like_name: str = "", min_rows: int = 1) -> torch.Tensor:
    """A float (rows, D) tensor; with ``like``, of the same D, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got dtype {t.dtype}")
    if t.dim() != 2 or t.shape[1] < 1 or t.shape[0] < min_rows:
        raise ValueError(f"{name}: expected shape (rows >= {min_rows}, D >= 1), got {tuple(t.shape)}")
    if like is not None:
        if t.shape[1] != like.shape[1]:
            raise ValueError(f"{name}: expected D={like.shape[1]} (the D of {like_name}), got shape {tuple(t.shape)}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name}: expected a tensor on {like.device} (the device of {like_name}), got {t.device}")
    return t


def _host_value(t: torch.Tensor) -> float | None:
    """``float(t)``, or None where it cannot be read: under ``torch.func.vmap`` a batched value (one per
    sample) has no single host value, and its checks are skipped as under torch.compile."""
    try:
        return float(t)
    except RuntimeError:
        if not _dispatch.transforms_active():
            raise
        return None


def _nan_unless(t: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``t`` where ``ok``, else NaN: a scalar checked on its GPU (no host read) makes the loss NaN when bad."""
    return torch.where(ok, t, torch.full_like(t, math.nan))


def _positive_scalar(name: str, value, device, acc) -> tuple[torch.Tensor, float]:
    """A finite number > 0 (float or one-element float tensor, possibly requiring grad) as a 0-dim tensor, and
    its value (NaN where it was not read on the host: traced, or a GPU tensor, whose bad value gives a NaN
    loss instead of the ValueError)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float or a one-element float tensor, "
                            f"got {value.dtype} {tuple(value.shape)}")
        t = value.reshape(()).to(device=device, dtype=acc)
        if torch.compiler.is_compiling():  # reading the value would sync and break the graph
            return t, math.nan
        if value.device.type != "cpu":  # reading it would wait for the GPU on every call: checked there instead
            return _nan_unless(t, torch.isfinite(t) & (t > 0)), math.nan
        v = _host_value(value.detach().reshape(()))
        if v is None:
            return t, math.nan
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        t = _dispatch.device_constant(v, acc, device)
    else:
        raise TypeError(f"{name}: expected a float or a one-element float tensor, got {type(value).__name__}")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a finite value > 0, got {v}")
    return t, v


def _scale_from_temperature(temperature, device, acc) -> torch.Tensor:
    t, v = _positive_scalar("temperature", temperature, device, acc)
    info = torch.finfo(acc)
    if not math.isnan(v) and not info.tiny <= 1.0 / v <= info.max:  # NaN: traced, not read
        raise ValueError(f"temperature: expected 1 / temperature in {acc}'s normal range "
                         f"[{info.tiny:.3g}, {info.max:.3g}] (the math runs in {acc}), got temperature={v:g}")
    return 1.0 / t


def _scale_from_logit_scale(logit_scale, device, acc) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1 or not logit_scale.dtype.is_floating_point:
            raise TypeError(f"logit_scale: expected a float or a one-element float tensor, got "
                            f"{logit_scale.dtype} {tuple(logit_scale.shape)}")
        ls = logit_scale.reshape(()).to(device=device, dtype=acc)
    elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        ls = _dispatch.device_constant(float(logit_scale), acc, device)
    else:
        raise TypeError(f"logit_scale: expected a float or a one-element float tensor, "
                        f"got {type(logit_scale).__name__}")
    if torch.compiler.is_compiling():  # no host read while tracing
        v = 0.0
    elif isinstance(logit_scale, torch.Tensor) and logit_scale.device.type != "cpu":
        # CLIP's learnable scale lives on the GPU: reading it would wait for the GPU on every call; a
        # non-finite value gives a NaN loss there instead of the ValueError (exp(inf) would clamp to 100)
        ls = _nan_unless(ls, torch.isfinite(ls))
        v = None
    elif isinstance(logit_scale, torch.Tensor):  # on the host: read where it is, for free
        v = _host_value(logit_scale.detach().reshape(()))
    else:
        v = float(logit_scale)
    if v is not None and not math.isfinite(v):
        raise ValueError(f"logit_scale: expected a finite value, got {v}")
    # below: exp() of a very negative logit_scale underflows to 0; the smallest normal scale gives
    # the same loss (uniform logits) and, as the gradient through exp() there, ~0
    return ls.exp().clamp(min=torch.finfo(acc).tiny, max=MAX_LOGIT_SCALE)


def _label_tensor(name: str, t, n: int, device) -> torch.Tensor:
    t = _validate.index_tensor(name, t)
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the embeddings), got {t.device}")
    if n and int(t.min()) < 0:
        raise ValueError(f"{name}: class labels must be >= 0, found {int(t.min())}")
    return t.to(torch.int64)


def _labels(labels, n: int, m: int, device):
    """None, or (query_labels (N,), key_labels (M,)) int64 from a tensor (N == M) or a pair."""
    if labels is None:
        return None
    if isinstance(labels, (tuple, list)):
        if len(labels) != 2:
            raise ValueError(f"labels: expected a tensor or a pair (query_labels, key_labels), got {len(labels)} items")
        return _label_tensor("labels[0] (query labels)", labels[0], n, device), _label_tensor(
            "labels[1] (key labels)", labels[1], m, device)
    if n != m:
        raise ValueError(f"labels: a single label tensor labels queries and keys alike, so it needs N == M; "
                         f"got N={n}, M={m} (pass a pair (query_labels, key_labels))")
    t = _label_tensor("labels", labels, n, device)
    return t, t


def _require_positives(anchor_labels, candidate_labels, what: str) -> None:
    has = torch.isin(anchor_labels, candidate_labels)
    if not bool(has.all()):
        i = int((~has).nonzero()[0, 0])
        raise ValueError(f"labels: {what} row {i} (label {int(anchor_labels[i])}) has no positive: "
                         f"no {'key' if what == 'query' else 'query'} carries its label")


# ----------------------------------------------------------------------------- ground truth


def _materialised_loss(logits, queue_logits, pos, symmetric):
    """SupCon-style loss from an explicit (N, M) logit matrix and (N, M) positive mask."""
    full = logits if queue_logits is None else torch.cat([logits, queue_logits], dim=1)
    logp = torch.log_softmax(full, dim=1)[:, : logits.shape[1]]
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    row = -torch.where(pos, logp, zero).sum(1) / pos.sum(1)
    if not symmetric:
        return row.mean()
    col = -torch.where(pos, torch.log_softmax(logits, dim=0), zero).sum(0) / pos.sum(0)
    return (row.mean() + col.mean()) / 2


def info_nce_reference(query, key, *, temperature=0.07, labels=None, symmetric=False, normalize=False, queue=None):
    """Ground truth of :func:`info_nce`: materialises the (N, M + K) logits, computes in the input dtype."""
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
        queue = F.normalize(queue, dim=1) if queue is not None else None
    logits = query @ key.T / temperature
    q_logits = query @ queue.detach().T / temperature if queue is not None else None
    if labels is None:
        pos = torch.eye(query.shape[0], key.shape[0], dtype=torch.bool, device=query.device)
    else:
        ql, kl = labels if isinstance(labels, (tuple, list)) else (labels, labels)
        pos = ql[:, None] == kl[None, :]
    return _materialised_loss(logits, q_logits, pos, symmetric)


def nt_xent_reference(z1, z2, *, temperature=0.5, normalize=True):
    """Ground truth of :func:`nt_xent`: SimCLR's (2N, 2N) cosine-similarity matrix, self masked."""
    z = torch.cat([z1, z2])
    if normalize:
        z = F.normalize(z, dim=1)
    n = z1.shape[0]
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(sim, target)


def clip_loss_reference(image_emb, text_emb, logit_scale, *, normalize=True):
    """Ground truth of :func:`clip_loss` (OpenAI CLIP / open_clip ClipLoss)."""
    if normalize:
        image_emb, text_emb = F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * image_emb @ text_emb.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ----------------------------------------------------------------------------- op: tiled log-sum-exp
# Every backend: forward(q, k, queue, scale, symmetric, self_offset) -> (row_lse (N,), col_lse (M,) or empty);
# backward(..., row_lse, col_lse, g_row, g_col, ...) -> (G_q = dS @ [k; queue], G_k = dS[:, :M]^T @ q),
# not multiplied by scale. self_offset >= 0 excludes key column i + self_offset from row i (NT-Xent).


def _ref_scores(q, k, queue, scale, self_offset):
    acc = _acc_dtype(q.dtype)
    keys = k if queue is None else torch.cat([k, queue])
    s = (q.to(acc) @ keys.to(acc).T) * scale.to(acc)
    if self_offset >= 0:  # a mask, not an indexed write: vmap traces it
        i = torch.arange(q.shape[0], device=q.device)
        j = torch.arange(keys.shape[0], device=q.device)
        own = (j[None, :] == i[:, None] + self_offset) & (j < k.shape[0])[None, :]  # key columns only
        s.masked_fill_(own, float("-inf"))  # s is a fresh product: in place
    return s, keys.to(acc)


def _ref_forward(q, k, queue, scale, symmetric, self_offset):
    s, _ = _ref_scores(q, k, queue, scale, self_offset)
    col = torch.logsumexp(s[:, : k.shape[0]], dim=0) if symmetric else s.new_empty(0)
    return torch.logsumexp(s, dim=1), col


def _ref_backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, symmetric, self_offset):
    s, keys = _ref_scores(q, k, queue, scale, self_offset)
    m = k.shape[0]
    ds = torch.exp(s - row_lse[:, None]) * g_row[:, None]
    if symmetric:
        ds[:, :m] += torch.exp(s[:, :m] - col_lse[None, :]) * g_col[None, :]
    return ds @ keys, ds[:, :m].T @ q.to(ds.dtype)


def _plain_lse(q, k, queue, scale, symmetric, self_offset, pos_shift=0, pos_wrap=0, pos_base=0):
    """``_lse_op``'s three outputs in plain PyTorch ops (the reference backend's math), differentiated
    by autograd: what runs under a ``torch.func`` transform (module docstring of ``_dispatch``),
    where the custom op's autograd formula cannot. Holds the (N, M + K) scores for the backward."""
    s, _ = _ref_scores(q, k, queue, scale, self_offset)
    row = torch.logsumexp(s, dim=1)
    col = torch.logsumexp(s[:, : k.shape[0]], dim=0) if symmetric else row.new_zeros(0)
    pos = _positives(pos_shift, pos_wrap, pos_base)
    if pos is None:
        return row, col, row.new_zeros(0)
    t = pos.targets(q.shape[0], q.device)
    return row, col, (q.to(s.dtype) * k[t].to(s.dtype)).sum(1) * scale.to(s.dtype)  # as _pos_scores


def _params(q, k, queue, symmetric, self_offset):
    """csrc/contrastive.h's ContrastiveParams: inputs and options (outputs are set by the caller)."""
    p = _native._C.ContrastiveParams()
    p.q, p.k = q.data_ptr(), k.data_ptr()
    if queue is not None and queue.shape[0]:
        p.queue, p.n_queue = queue.data_ptr(), queue.shape[0]
    p.n, p.d = q.shape
    p.m = k.shape[0]
    p.dtype = _native.dtype_code(q.dtype)
    p.symmetric = symmetric
    p.exclude_self, p.self_offset = self_offset >= 0, max(self_offset, 0)
    return p


def _cpu_params(q, k, queue, scale, symmetric, self_offset):
    p = _params(q, k, queue, symmetric, self_offset)
    p.scale = float(scale)
    p.isa = _CPU_ISA
    return p


def _cpu_forward(q, k, queue, scale, symmetric, self_offset):
    p = _cpu_params(q, k, queue, scale, symmetric, self_offset)
    row = torch.empty(q.shape[0], dtype=torch.float32)
    col = torch.empty(k.shape[0] if symmetric else 0, dtype=torch.float32)
    p.row_lse, p.col_lse = row.data_ptr(), col.data_ptr()
    _native._C.contrastive_forward_cpu(p, _native.num_threads())
    return row, col


def _cpu_backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, symmetric, self_offset):
    p = _cpu_params(q, k, queue, scale, symmetric, self_offset)
    gq = torch.empty(q.shape, dtype=torch.float32)
    gk = torch.empty(k.shape, dtype=torch.float32)
    g_row = g_row.to(torch.float32).contiguous()
    p.row_lse, p.grad_row, p.grad_q, p.grad_k = row_lse.data_ptr(), g_row.data_ptr(), gq.data_ptr(), gk.data_ptr()
    if symmetric:
        g_col = g_col.to(torch.float32).contiguous()
        p.col_lse, p.grad_col = col_lse.data_ptr(), g_col.data_ptr()
    _native._C.contrastive_backward_cpu(p, _native.num_threads())
    return gq, gk


def _cpu_supports(q, **_):
    if q.device.type != "cpu":
        return f"needs cpu tensors, got {q.device.type}"
    return _dispatch.kernel_dtype_refusal(q.dtype)


def _triton_forward(q, k, queue, scale, symmetric, self_offset):
    return _triton.forward(q, k, queue, scale.to(device=q.device, dtype=torch.float32), symmetric, self_offset)


def _triton_backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, g_pos, symmetric, self_offset, pos,
                     need_scale):
    """Fused: the kernels add the positives, multiply by the scale and write the input dtype."""
    f32 = dict(device=q.device, dtype=torch.float32)
    return _triton.backward(q, k, queue, scale.to(**f32), row_lse, col_lse, g_row.to(**f32),
                            g_col.to(**f32) if symmetric else None, symmetric, self_offset,
                            g_pos=g_pos.to(**f32) if pos is not None else None, pos=pos, need_scale=need_scale)


@torch.compiler.assume_constant_result
def _cuda_unavailable() -> str | None:
    """Why kernels/contrastive.cu cannot run here, or None. A constant to torch.compile: the check calls
    into fastpt._C, which Dynamo cannot trace, and its answer does not change within a process."""
    why = _native.cuda_unavailable()
    if why is None and not hasattr(_native._C, "contrastive_forward_cuda"):
        why = "fastpt._C was built without the contrastive CUDA kernels (rebuild with CUDA)"
    return why


def _cuda_supports(q, **_):
    if q.device.type != "cuda":
        return f"needs cuda tensors, got {q.device.type}"
    return _dispatch.kernel_dtype_refusal(q.dtype)


def _cuda_run(entry, q, p, scale, backward):
    """Run a kernels/contrastive.cu entry point on q's device and current stream. The scale is read on the
    device (no host sync); the scratch comes from torch's caching allocator, which keeps it valid for the
    kernels queued on this stream after it is released here."""
    scale = scale.to(device=q.device, dtype=torch.float32).reshape(1).contiguous()
    p.scale_ptr = scale.data_ptr()
    with torch.cuda.device(q.device):
        ws = torch.empty(_native._C.contrastive_cuda_workspace(p, backward), dtype=torch.uint8, device=q.device)
        p.workspace, p.workspace_bytes = ws.data_ptr(), ws.numel()
        entry(p, _native.cuda_stream(q.device))


def _cuda_forward(q, k, queue, scale, symmetric, self_offset):
    p = _params(q, k, queue, symmetric, self_offset)
    f32 = dict(device=q.device, dtype=torch.float32)
    row = torch.empty(q.shape[0], **f32)
    col = torch.empty(k.shape[0] if symmetric else 0, **f32)
    p.row_lse, p.col_lse = row.data_ptr(), col.data_ptr() if symmetric else 0
    _cuda_run(_native._C.contrastive_forward_cuda, q, p, scale, False)
    return row, col


def _cuda_backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, symmetric, self_offset, pos=None,
                   g_pos=None):
    f32 = dict(device=q.device, dtype=torch.float32)
    g_row = g_row.to(**f32)
    g_col = g_col.to(**f32) if symmetric else None
    g_pos = g_pos.to(**f32) if pos is not None else None
    gmax = None
    if q.dtype != torch.float32:
        # fp16 / bf16 round dS to the input dtype for the tensor-core product: scale the incoming
        # gradients to a maximum of 1 so that dS = g * softmax stays representable (as for Triton).
        gmax = _validate.grad_unit(g_row, g_col, g_pos)
        g_row = g_row / gmax
        g_col = g_col / gmax if symmetric else None
        g_pos = g_pos / gmax if pos is not None else None
    g_row, row_lse = g_row.contiguous(), row_lse.to(**f32).contiguous()
    gq, gk = torch.empty(q.shape, **f32), torch.empty(k.shape, **f32)
    p = _params(q, k, queue, symmetric, self_offset)
    p.row_lse, p.grad_row, p.grad_q, p.grad_k = row_lse.data_ptr(), g_row.data_ptr(), gq.data_ptr(), gk.data_ptr()
    if symmetric:
        g_col, col_lse = g_col.contiguous(), col_lse.to(**f32).contiguous()
        p.col_lse, p.grad_col = col_lse.data_ptr(), g_col.data_ptr()
    if pos is not None:  # added to dS in the kernels, before its rounding
        g_pos = g_pos.contiguous()
        p.grad_pos, p.pos_shift, p.pos_wrap, p.pos_base = g_pos.data_ptr(), pos.shift, pos.wrap, pos.base
    _cuda_run(_native._C.contrastive_backward_cuda, q, p, scale, True)
    return (gq, gk) if gmax is None else (gq * gmax, gk * gmax)


def _blas_supports(q, **_):
    if q.device.type != "cuda":
        return f"needs cuda tensors, got {q.device.type} (the cpu backend serves CPU tensors)"
    why = _dispatch.kernel_dtype_refusal(q.dtype)
    if why is not None:
        return why
    if q.dtype != torch.float32 and "out_dtype" not in (torch.mm.__doc__ or ""):
        return f"fp16 / bf16 products with float32 output need torch >= 2.8 (torch.mm out_dtype), this is {torch.__version__}"
    return None


def _blas_forward(q, k, queue, scale, symmetric, self_offset):
    return _blas.forward(q, k, queue, scale.to(device=q.device, dtype=torch.float32), symmetric, self_offset)


def _blas_backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, symmetric, self_offset, pos=None,
                   g_pos=None):
    targets = pos.targets(q.shape[0], q.device) if pos is not None else None
    return _blas.backward(q, k, queue, scale.to(device=q.device, dtype=torch.float32), row_lse, col_lse, g_row,
                          g_col, symmetric, self_offset, targets=targets, g_pos=g_pos)


# GPU priority: blas, triton, cuda. Measured on an H200 (2026-11-26, N = 16384, D = 512,
# benches/results/contrastive-gpu.md): the tiled Triton kernel ran 5.6x (bf16) / 8x (fp32) slower
# than eager matmul + cross_entropy, the CUDA wmma kernel 21x; four chunked cuBLAS products do
# the same work at the matrix units' rate in bounded memory. Triton and cuda serve on request.
# The Triton backward measured there added every tile's product into float32 rows in global memory;
# it now keeps them on chip (contrastive_triton.py), unmeasured: the kernel bench's fastpt-triton
# rows decide whether it takes blas's place (it is the one that holds no chunk of scores and, since it
# writes bf16 gradients itself, no float32 (N, D) buffer either).
OP = _dispatch.Op("contrastive", [
    _dispatch.backend("cpu", _cpu_supports, _cpu_forward),
    _dispatch.backend("blas", _blas_supports, _blas_forward),
    _dispatch.backend("triton", lambda q, **_: _triton.supports(q), _triton_forward),
    _dispatch.Backend("cuda", _cuda_unavailable, _cuda_supports, _cuda_forward),
    _dispatch.backend("reference", lambda **_: None, _ref_forward),
], probe=lambda device: dict(q=torch.zeros(4, 8, device=device), k=torch.zeros(4, 8, device=device), queue=None,
                             scale=torch.ones((), device=device), symmetric=False, self_offset=-1))
# Backward entries: float32 (G_q, G_k) before the positives and the scale (finished by ``_finish``), or
# (in _FUSED_BACKWARD) the finished gradients.
_BACKWARD = {"cpu": _cpu_backward, "blas": _blas_backward, "cuda": _cuda_backward, "reference": _ref_backward}
_FUSED_BACKWARD = {"triton": _triton_backward}
# Backends that add the positives' gradient to dS themselves (given ``pos`` and ``g_pos``), before
# rounding it for fp16 / bf16 products; ``_finish`` adds them for the others (the CPU kernel and the
# reference, whose products are float32 / float64), in float32 after their products.
_POSITIVES_IN_DS = {"blas", "cuda"}


# ----------------------------------------------------------------------------- custom ops + autograd


CHUNK_ELEMENTS = 1 << 20  # of the row chunks below: 4 MiB of float32


def _row_chunks(x: torch.Tensor) -> list[slice]:
    """Row ranges of ~CHUNK_ELEMENTS for the O(N * D) float32 work done in torch (normalisation, positives,
    the non-fused epilogue), so that no (N, D) float32 copy is held; one range under torch.compile
    (Inductor fuses the upcasts into its kernels)."""
    n, d = x.shape
    step = n if torch.compiler.is_compiling() else max(1, CHUNK_ELEMENTS // max(d, 1))
    return [slice(r, r + step) for r in range(0, n, step)]


def _positives(pos_shift: int, pos_wrap: int, pos_base: int) -> Optional[_triton.Positives]:
    return _triton.Positives(pos_shift, pos_wrap, pos_base) if pos_wrap > 0 else None


def _pos_scores(q, k, targets, scale):
    """(N,) scale * q_i . k[targets[i]] in the accumulation dtype: the positives' scores."""
    acc = _acc_dtype(q.dtype)
    out = torch.empty(q.shape[0], dtype=acc, device=q.device)
    for rows in _row_chunks(q):
        out[rows] = (q[rows].to(acc) * k[targets[rows]].to(acc)).sum(1)
    return out * scale.to(acc)


def _finish(q, k, scale, gq, gk, g_pos, targets, need_scale):
    """The non-fused backends' epilogue: float32 (or float64) G_q, G_k (modified in place) plus the
    positives' terms, the scale's gradient sum(q * G_q), then G * scale in the inputs' dtypes."""
    acc = gq.dtype
    g_scale = torch.zeros((), dtype=acc, device=q.device)
    for rows in _row_chunks(q):
        if targets is not None:
            t, g = targets[rows], g_pos[rows, None].to(acc)
            gq[rows] += g * k[t].to(acc)
            gk.index_put_((t,), g * q[rows].to(acc), accumulate=True)  # sorted, deterministic on CUDA
        if need_scale:
            g_scale += (q[rows].to(acc) * gq[rows]).sum()
    s = scale.to(acc)
    return gq.mul_(s).to(q.dtype), gk.mul_(s).to(k.dtype), g_scale.to(scale.dtype)


@torch.library.custom_op("fastpt::contrastive_lse", mutates_args=())
def _lse_op(q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor], scale: torch.Tensor, backend: str,
            symmetric: bool, self_offset: int, pos_shift: int = 0, pos_wrap: int = 0,
            pos_base: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_lse (N,), col_lse (M,) or (0,), pos (N,) or (0,)) of S = scale * q @ [k; queue]^T through one
    backend; pos[i] = S[i, (i + pos_shift) % pos_wrap + pos_base], the positives' scores (pos_wrap > 0)."""
    row, col = OP.backends[backend].run(q=q, k=k, queue=queue, scale=scale, symmetric=symmetric,
                                        self_offset=self_offset)
    pos = _positives(pos_shift, pos_wrap, pos_base)
    if pos is None:
        return row, col, row.new_empty(0)
    return row, col, _pos_scores(q, k, pos.targets(q.shape[0], q.device), scale).to(row.dtype)


@_lse_op.register_fake
def _lse_fake(q, k, queue, scale, backend, symmetric, self_offset, pos_shift=0, pos_wrap=0, pos_base=0):
    acc = _acc_dtype(q.dtype)  # every kernel backend returns float32 statistics; float64 runs on the reference
    return (q.new_empty(q.shape[0], dtype=acc), q.new_empty(k.shape[0] if symmetric else 0, dtype=acc),
            q.new_empty(q.shape[0] if pos_wrap > 0 else 0, dtype=acc))


@torch.library.custom_op("fastpt::contrastive_lse_backward", mutates_args=())
def _lse_backward_op(q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor], scale: torch.Tensor,
                     row_lse: torch.Tensor, col_lse: torch.Tensor, g_row: torch.Tensor, g_col: torch.Tensor,
                     g_pos: torch.Tensor, backend: str, symmetric: bool, self_offset: int, pos_shift: int,
                     pos_wrap: int, pos_base: int, need_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k in the inputs' dtypes, d loss / d scale (0 unless need_scale)) of
    sum(g_row * row_lse) + sum(g_col * col_lse) + sum(g_pos * pos)."""
    pos = _positives(pos_shift, pos_wrap, pos_base)
    if backend in _FUSED_BACKWARD:
        gq, gk, g_scale = _FUSED_BACKWARD[backend](q, k, queue, scale, row_lse, col_lse, g_row,
                                                   g_col if symmetric else None, g_pos, symmetric, self_offset, pos,
                                                   need_scale)
        return gq, gk, (g_scale if need_scale else torch.zeros((), device=q.device)).to(scale.dtype)
    args = (q, k, queue, scale, row_lse, col_lse, g_row, g_col if symmetric else None, symmetric, self_offset)
    if backend in _POSITIVES_IN_DS and pos is not None:
        gq, gk = _BACKWARD[backend](*args, pos=pos, g_pos=g_pos)
        pos = None
    else:
        gq, gk = _BACKWARD[backend](*args)
    targets = pos.targets(q.shape[0], q.device) if pos is not None else None
    return _finish(q, k, scale, gq, gk, g_pos, targets, need_scale)


@_lse_backward_op.register_fake
def _lse_backward_fake(q, k, queue, scale, row_lse, col_lse, g_row, g_col, g_pos, backend, symmetric, self_offset,
                       pos_shift, pos_wrap, pos_base, need_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), scale.new_empty(())


def _lse_setup_context(ctx, inputs, output):
    q, k, queue, scale, backend, symmetric, self_offset, pos_shift, pos_wrap, pos_base = inputs
    ctx.save_for_backward(q, k, queue, scale, output[0], output[1])
    ctx.config = (backend, symmetric, self_offset, pos_shift, pos_wrap, pos_base)
    ctx.n_pos = output[2].shape[0]


def _lse_backward(ctx, g_row, g_col, g_pos):
    q, k, queue, scale, row, col = ctx.saved_tensors
    backend, symmetric, self_offset, pos_shift, pos_wrap, pos_base = ctx.config
    g_row = torch.zeros_like(row) if g_row is None else g_row.contiguous()
    g_col = torch.zeros_like(col) if g_col is None else g_col.contiguous()
    g_pos = row.new_zeros(ctx.n_pos) if g_pos is None else g_pos.contiguous()
    need = ctx.needs_input_grad
    gq, gk, g_scale = _lse_backward_op(q, k, queue, scale, row, col, g_row, g_col, g_pos, backend, symmetric,
                                       self_offset, pos_shift, pos_wrap, pos_base, need[3])
    return (gq if need[0] else None, gk if need[1] else None, None, g_scale if need[3] else None,
            None, None, None, None, None, None)


_lse_op.register_autograd(_lse_backward, setup_context=_lse_setup_context)


# ----------------------------------------------------------------------------- distributed


def _group(group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather=True needs an initialised torch.distributed process group "
                           "(call torch.distributed.init_process_group first)")
    return group if group is not None else dist.group.WORLD


def _sizes(n: int, group, device) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(x) for x in out]


def _gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold different counts: padded to the largest)."""
    import torch.distributed as dist

    pad = max(sizes) - x.shape[0]
    xp = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))]) if pad else x
    parts = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(parts, xp.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered rows and returns this
    rank's slice: the exact gradient of the sum of all ranks' losses w.r.t. the local rows."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        import torch.distributed as dist

        ctx.sizes, ctx.group, ctx.rank = sizes, group, dist.get_rank(group)
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        off = sum(ctx.sizes[: ctx.rank])
        return g[off: off + ctx.sizes[ctx.rank]], None, None


class _AllReduceLSE(torch.autograd.Function):
    """Column statistics of a symmetric loss merged over ranks: log(sum over ranks of exp(lse)).

    Every rank's loss reads the merged value, so backward first sums the incoming gradient over
    ranks, then hands each rank its share exp(lse - merged) (the softmax weight of its rows). The
    kernel's backward turns that into g_merged * exp(S - merged) on this rank's rows."""

    @staticmethod
    def forward(ctx, lse, group):
        out = _all_reduce_lse(lse, group)
        ctx.save_for_backward(lse, out)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        lse, out = ctx.saved_tensors
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g * torch.exp(lse - out), None


def _all_reduce_lse(lse: torch.Tensor, group) -> torch.Tensor:
    """log(sum over ranks of exp(lse)) element-wise."""
    import torch.distributed as dist

    mx = lse.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = torch.exp(lse - mx)
    dist.all_reduce(s, group=group)
    return mx + torch.log(s)


def _global_value(share: torch.Tensor, group) -> torch.Tensor:
    """The sum of all ranks' shares as the value, this rank's share as the gradient."""
    import torch.distributed as dist

    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total - share.detach())


# ----------------------------------------------------------------------------- assembly


NORM_EPS = 1e-12  # F.normalize's


class _Normalize(torch.autograd.Function):
    """``F.normalize(x.float(), dim=1).to(x.dtype)`` row chunk by row chunk: autograd keeps x and the (N,)
    norms instead of float32 copies of x (2 x 32 MiB at N = 16384, D = 512), and the backward recomputes
    the unit vectors. Not twice differentiable (neither is the contrastive op)."""

    @staticmethod
    def forward(ctx, x):
        acc = _acc_dtype(x.dtype)
        den = torch.empty(x.shape[0], 1, dtype=acc, device=x.device)
        y = torch.empty_like(x)
        for rows in _row_chunks(x):
            xf = x[rows].to(acc)
            den[rows] = torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(NORM_EPS)
            y[rows] = (xf / den[rows]).to(x.dtype)
        ctx.save_for_backward(x, den)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, den = ctx.saved_tensors
        dx = torch.empty_like(x)
        for rows in _row_chunks(x):
            xf, gf = x[rows].to(den.dtype), g[rows].to(den.dtype)
            y = xf / den[rows]
            # d(x / max(|x|, eps)) = (g - y (y . g)) / |x|, or g / eps where eps holds (no norm gradient)
            free = torch.linalg.vector_norm(xf, dim=1, keepdim=True) >= NORM_EPS
            dx[rows] = (torch.where(free, gf - y * (y * gf).sum(1, keepdim=True), gf) / den[rows]).to(x.dtype)
        return dx


def _normalize(x: torch.Tensor, plain: bool = False) -> torch.Tensor:
    """``_Normalize``; with ``plain`` (under a torch.func transform, which cannot run an autograd.Function
    without setup_context) the same math in differentiable torch ops."""
    if plain:
        return F.normalize(x.to(_acc_dtype(x.dtype)), dim=1, eps=NORM_EPS).to(x.dtype)
    return _Normalize.apply(x)


def _class_sums(x, cls, n_cls, acc, weight=None):
    """(n_cls, D) sums of x's rows (times ``weight`` (rows,) when given) by class, in ``acc``, row chunk
    by row chunk. Bit-reproducible on both devices: on CUDA ``index_add`` adds with float atomics, so
    the sums go through ``index_put(accumulate=True)`` (it sorts the indices and adds in order); on the
    CPU, where that one is the parallel one, through ``index_add``."""
    out = torch.zeros(n_cls, x.shape[1], dtype=acc, device=x.device)
    for rows in _row_chunks(x):
        xs = x[rows].to(acc) if weight is None else x[rows].to(acc) * weight[rows, None]
        if x.is_cuda:
            out.index_put_((cls[rows],), xs, accumulate=True)
        else:
            out.index_add_(0, cls[rows], xs)
    return out


class _ClassMeanLogit(torch.autograd.Function):
    """s * anchor_i . (mean of the candidates of anchor i's class): the SupCon positive term, (rows,).

    Autograd keeps the inputs, the (classes, D) class means and the (rows,) dot products; the (rows, D)
    float32 work runs in row chunks (no float32 copy of the embeddings is held). Not twice
    differentiable (neither is the contrastive op)."""

    @staticmethod
    def forward(ctx, anchors, anchor_cls, cands, cand_cls, n_cls, scale):
        acc = scale.dtype
        count = torch.bincount(cand_cls, minlength=n_cls).to(acc).clamp_min_(1)  # 0: a class no anchor uses
        mean = _class_sums(cands, cand_cls, n_cls, acc).div_(count[:, None])
        dots = torch.empty(anchors.shape[0], dtype=acc, device=anchors.device)
        for rows in _row_chunks(anchors):
            dots[rows] = (anchors[rows].to(acc) * mean[anchor_cls[rows]]).sum(1)
        ctx.save_for_backward(anchors, anchor_cls, cands, cand_cls, scale, mean, count, dots)
        ctx.n_cls = n_cls
        return scale * dots

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        anchors, anchor_cls, cands, cand_cls, scale, mean, count, dots = ctx.saved_tensors
        need = ctx.needs_input_grad
        gs = g.to(mean.dtype) * scale  # d loss / d dots
        g_anchors = g_cands = g_scale = None
        if need[0]:
            g_anchors = torch.empty_like(anchors)
            for rows in _row_chunks(anchors):
                g_anchors[rows] = (gs[rows, None] * mean[anchor_cls[rows]]).to(anchors.dtype)
        if need[2]:  # candidate j gets the sum over its class's anchors of gs_i * anchor_i, / count
            per_class = _class_sums(anchors, anchor_cls, ctx.n_cls, mean.dtype, gs).div_(count[:, None])
            g_cands = torch.empty_like(cands)
            for rows in _row_chunks(cands):
                g_cands[rows] = per_class[cand_cls[rows]].to(cands.dtype)
        if need[5]:
            g_scale = (g.to(mean.dtype) * dots).sum().to(scale.dtype)
        return g_anchors, None, g_cands, None, None, g_scale


def _class_mean_logit(anchors, anchor_cls, cands, cand_cls, n_cls, scale, acc, plain=False):
    """s * anchor_i . mean of the candidates of its class (the SupCon positive term), (rows,); with
    ``plain`` (under a torch.func transform) ``_ClassMeanLogit``'s forward in differentiable torch ops."""
    if plain:
        count = torch.bincount(cand_cls, minlength=n_cls).to(acc).clamp_min(1)
        sums = torch.zeros(n_cls, cands.shape[1], dtype=acc, device=cands.device).index_add(0, cand_cls,
                                                                                            cands.to(acc))
        return scale.to(acc) * (anchors.to(acc) * (sums / count[:, None])[anchor_cls]).sum(1)
    return _ClassMeanLogit.apply(anchors, anchor_cls, cands, cand_cls, n_cls, scale.to(acc))


def _loss(q, k, queue, scale, labels, *, symmetric, normalize, gather, group, backend):
    """The loss of the module docstring; q (N, D), k (M, D), labels None or (query (N,), key (M,)).

    Under a torch.func transform (``_dispatch.transforms_active``: only the reference backend runs)
    the same loss is composed of plain torch ops (``_plain_lse`` and the ``plain`` helpers), which
    the transforms differentiate and batch."""
    acc = _acc_dtype(q.dtype)
    plain = _dispatch.transforms_active()
    if normalize:
        q, k = _normalize(q, plain), _normalize(k, plain)
        queue = _normalize(queue, plain) if queue is not None else None
    q, k = q.contiguous(), k.contiguous()
    queue = queue.detach().contiguous() if queue is not None and queue.shape[0] else None
    name = OP.select(backend, q=q, k=k, queue=queue, scale=scale, symmetric=symmetric, self_offset=-1).name
    lse_op = _plain_lse if plain else functools.partial(_lse_op, backend=name)
    n, m = q.shape[0], k.shape[0]
    if gather:
        group = _group(group)
        import torch.distributed as dist

        n_sizes, m_sizes = _sizes(n, group, q.device), _sizes(m, group, q.device)
        k_all = _AllGather.apply(k, m_sizes, group)
        k_off = sum(m_sizes[: dist.get_rank(group)])
        n_tot, m_tot = sum(n_sizes), sum(m_sizes)
    else:
        group, k_all, k_off, n_tot, m_tot = None, k, 0, n, m
    pos_wrap = 0
    if labels is None:
        pos_wrap = n  # query i's positive is key i (k_off + i of the gathered keys), scored by the op
    else:
        ql, kl = labels
        kl_all = _gather_rows(kl, m_sizes, group) if gather else kl
        ql_all = _gather_rows(ql, n_sizes, group) if gather and symmetric else ql
        _require_positives(ql, kl_all, "query")
        classes = torch.unique(torch.cat([kl_all, ql_all]))
        cls = lambda t: torch.searchsorted(classes, t)  # noqa: E731
        pos_row = _class_mean_logit(q, cls(ql), k_all, cls(kl_all), classes.numel(), scale, acc, plain)
        if symmetric:
            _require_positives(kl, ql_all, "key")
            q_all = _AllGather.apply(q, n_sizes, group) if gather else q
            pos_col = _class_mean_logit(k, cls(kl), q_all, cls(ql_all), classes.numel(), scale, acc, plain)
    row_lse, col_lse, pos = lse_op(q, k_all, queue, scale, symmetric=symmetric, self_offset=-1, pos_shift=0,
                                   pos_wrap=pos_wrap, pos_base=k_off)
    if labels is None:
        pos_row = pos_col = pos.to(acc)  # query i and key i: the same pair both ways
    if symmetric and gather:  # this rank's rows x all keys: merge the column statistics of every rank
        col_lse = _AllReduceLSE.apply(col_lse, group)
    loss = (row_lse.to(acc) - pos_row).sum() / n_tot
    if symmetric:
        loss = (loss + (col_lse[k_off: k_off + m].to(acc) - pos_col).sum() / m_tot) / 2
    return _global_value(loss, group) if gather else loss


def info_nce(query: torch.Tensor, key: torch.Tensor, *, temperature=0.07, labels=None, symmetric: bool = False,
             normalize: bool = False, queue: torch.Tensor | None = None, gather: bool = False, group=None,
             backend: str | None = None) -> torch.Tensor:
    """InfoNCE / supervised-contrastive loss of queries against keys, never materialising the N x M logits.

    Args:
        query: ``(N, D)`` float16 / bfloat16 / float32 / float64 embeddings.
        key: ``(M, D)`` keys, same dtype and device.
        temperature: float or one-element tensor (may require grad) > 0; logits are ``q . k / temperature``.
        labels: None (query i's positive is key i; needs N == M), an int ``(N,)`` tensor of class ids
            labelling queries and keys alike (N == M), or a pair ``(query_labels (N,), key_labels (M,))``.
            Ids are >= 0; every query needs at least one key of its class (and, if symmetric, every key
            one query). Rows with several positives average their log-probabilities (SupCon).
        symmetric: add the key->query direction (CLIP), averaged with query->key.
        normalize: L2-normalise query, key and queue rows first (cosine similarity), gradient included.
        queue: optional ``(K, D)`` extra negatives (MoCo), same dtype and device; gets no gradient.
        gather: all-gather keys over ``group`` (torch.distributed); see the module docstring for
            the value and gradient convention.
        group: the process group for ``gather`` (default: the world).
        backend: None (fastest that fits) or "cpu", "blas" (chunked cuBLAS products, CUDA), "triton", "cuda",
            "reference".

    Returns:
        0-dim loss, float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError naming the argument: non-tensor or non-float embeddings, shapes other
        than (rows >= 1, D), mismatched D / dtype / device, temperature not finite and > 0 (a temperature
        tensor on a GPU is checked there: a bad one gives a NaN loss), labels
        of the wrong dtype, shape or device, negative ids, a row without a positive.
        ``BackendError`` when the forced backend cannot serve the inputs; RuntimeError when
        ``gather=True`` without an initialised process group.
    """
    q = _embeddings("query", query)
    k = _embeddings("key", key, q, "query")
    if queue is not None:
        queue = _embeddings("queue", queue, q, "query", min_rows=0)
    lab = _labels(labels, q.shape[0], k.shape[0], q.device)
    if lab is None and q.shape[0] != k.shape[0]:
        raise ValueError(f"key: without labels query i's positive is key i, so N == M is needed; "
                         f"got query {tuple(q.shape)} and key {tuple(k.shape)}")
    scale = _scale_from_temperature(temperature, q.device, _acc_dtype(q.dtype))
    return _loss(q, k, queue, scale, lab, symmetric=_validate.flag("symmetric", symmetric), normalize=_validate.flag("normalize", normalize),
                 gather=_validate.flag("gather", gather),
                 group=group, backend=backend)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature=0.5, normalize: bool = True, gather: bool = False,
            group=None, backend: str | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent: 2N views, each against the other 2N - 1 (self excluded, 2N - 2 negatives).

    ``z = cat(z1, z2)``; the positive of view i is view ``(i + N) mod 2N``; the loss is the mean
    cross-entropy of the 2N rows of ``cos(z, z) / temperature`` with the diagonal masked.

    Args:
        z1, z2: ``(N, D)`` embeddings of the two augmentations, same dtype and device (any float dtype).
        temperature: float or one-element tensor > 0.
        normalize: cosine similarity (SimCLR); False uses raw dot products.
        gather, group, backend: as in :func:`info_nce` (with gather, every rank's views are negatives).

    Returns:
        0-dim loss, float32 (float64 for float64 inputs). For N = 1 there are no negatives: loss 0 (to rounding).

    Raises:
        TypeError / ValueError naming the argument (as in :func:`info_nce`), ``BackendError``, RuntimeError.
    """
    a = _embeddings("z1", z1)
    b = _embeddings("z2", z2, a, "z1")
    if b.shape != a.shape:
        raise ValueError(f"z2: expected shape {tuple(a.shape)} (the shape of z1), got {tuple(b.shape)}")
    acc = _acc_dtype(a.dtype)
    scale = _scale_from_temperature(temperature, a.device, acc)
    normalize, gather = _validate.flag("normalize", normalize), _validate.flag("gather", gather)
    z = torch.cat([a, b])
    plain = _dispatch.transforms_active()  # under a torch.func transform: plain torch ops, as in _loss
    if normalize:
        z = _normalize(z, plain)
    name = OP.select(backend, q=z, k=z, queue=None, scale=scale, symmetric=False, self_offset=0).name
    lse_op = _plain_lse if plain else functools.partial(_lse_op, backend=name)
    n = a.shape[0]
    if gather:
        group = _group(group)
        import torch.distributed as dist

        sizes = _sizes(2 * n, group, z.device)
        z_all = _AllGather.apply(z, sizes, group)
        off, total = sum(sizes[: dist.get_rank(group)]), sum(sizes)
    else:
        group, z_all, off, total = None, z, 0, 2 * n
    # view i's positive is view (i + n) mod 2n, column off + that of the gathered views
    row_lse, _, pos = lse_op(z, z_all, None, scale, symmetric=False, self_offset=off, pos_shift=n, pos_wrap=2 * n,
                             pos_base=off)
    # per row, then summed: the two sums (each of size ~N * |logit|) cancelled to ~1e-6 error when views agree
    loss = (row_lse.to(acc) - pos.to(acc)).sum() / total
    return _global_value(loss, group) if gather else loss


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale, *, labels=None, normalize: bool = True,
              gather: bool = False, group=None, backend: str | None = None) -> torch.Tensor:
    """CLIP's symmetric image-text loss: ``(CE(image -> text) + CE(text -> image)) / 2``.

    Args:
        image_emb: ``(N, D)`` image embeddings (any float dtype); pair i is (image i, text i).
        text_emb: ``(N, D)`` text embeddings (``(M, D)`` with a labels pair), same dtype and device.
        logit_scale: float or one-element tensor (a learnable parameter): the logits are
            ``min(exp(logit_scale), 100) * cos``; its gradient is 0 while clamped, as in CLIP.
        labels: optional, as in :func:`info_nce` (several captions per image, duplicates).
        normalize: L2-normalise both (CLIP compares unit vectors); False if they already are.
        gather, group, backend: as in :func:`info_nce`.

    Returns:
        0-dim loss, float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError naming the argument (logit_scale must be finite; a logit_scale tensor on a GPU is
        checked there: a non-finite one gives a NaN loss), ``BackendError``, RuntimeError.
    """
    img = _embeddings("image_emb", image_emb)
    txt = _embeddings("text_emb", text_emb, img, "image_emb")
    lab = _labels(labels, img.shape[0], txt.shape[0], img.device)
    if lab is None and img.shape[0] != txt.shape[0]:
        raise ValueError(f"text_emb: without labels image i pairs with text i, so equal counts are needed; "
                         f"got image_emb {tuple(img.shape)} and text_emb {tuple(txt.shape)}")
    scale = _scale_from_logit_scale(logit_scale, img.device, _acc_dtype(img.dtype))
    return _loss(img, txt, None, scale, lab, symmetric=True, normalize=_validate.flag("normalize", normalize),
                 gather=_validate.flag("gather", gather),
                 group=group, backend=backend)
