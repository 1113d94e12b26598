"""Contrastive log-sum-exp statistics by chunked matrix products (the ``blas`` backend).

The similarity matrix ``S = scale * q @ [k; queue]^T`` is never held whole: rows go through in
chunks of ``C`` rows, each chunk's ``(C, M + K)`` raw scores come from one BLAS product (cuBLAS on
a GPU, float32 output from fp16 / bf16 operands through ``torch.mm(..., out_dtype=float32)``),
their row log-sum-exps (and, for symmetric losses, the chunk's column statistics, merged across
chunks) are taken and the chunk is dropped. The backward recomputes each chunk's scores, forms
``dS`` (with the positives' gradient added in float32, before fp16 / bf16 rounding) and adds
``dS @ keys`` / ``dS^T @ q_chunk`` with two more products.

Why a backend of plain products beside the tiled kernels: at contrastive sizes (D = 256-1024) the
work is four large GEMMs, which cuBLAS runs at the chip's matrix rate; the tiled Triton kernel,
which streams D through registers per tile, measured 5.6x slower than eager on an H200 at
N = 16384, D = 512 (benches/results/contrastive-gpu.md).

The elementwise work on each chunk (scaling, self-pair masking, log-sum-exps, ``dS`` and its cast
to the products' dtype) runs in fused Triton kernels (contrastive_blas_triton.py) that read the
chunk's float32 scores once and write only what comes next: done with separate torch ops it was
about ten passes over each chunk, and an H100 run (benches/results/gpu-h100-2026-11-26) measured
the backend at 10.3 ms against eager's 3.3 ms (bf16, N = 16384, D = 512), the products being
about 0.8 ms each. The fused path serves CUDA tensors whenever Triton is available. Its speed has
not been measured on a GPU yet: this was a blind change, and the next GPU run's
``fastpt bench --ops contrastive`` (rows fastpt-blas vs torch-eager) tells.

Memory. ``CHUNK_BYTES`` bounds one chunk's float32 scores: 64 MiB, i.e. 1024 rows at
M + K = 16384 columns, enough rows for the products to fill the GPU (a multiple of 64 rows
whenever the chunk is not all of N; on CUDA at least ``GPU_MIN_ROWS``, which only matters past
N = 32k). The forward holds one chunk; the backward one chunk plus its
``dS`` in the input dtype (96 MiB for fp16 / bf16; an fp32 ``dS`` overwrites the scores: 64 MiB),
besides the float32 G_q and G_k it returns and the (M, D) float32 product added into G_k per chunk:
32 MiB each at N = M = 16384, D = 512, so an estimated ~200 MiB extra peak there against eager's
1,536 MiB (about 1/8; not measured yet). The issue's goal of 1/20 (77 MiB) is out of reach of the
chunk size alone: the float32 gradients and the autograd gradients of q and k take more than that.
The tiled Triton backend, which writes bf16 gradients from its kernels, holds ~32 MiB there
(benches/results/contrastive-memory-model.md).

The pure-torch chunk path (scaled copy, ``torch.logsumexp``, ...) serves CPU tensors, float64 and
machines without Triton: it is how the CPU tests check the algorithm (half inputs are upcast
there, as ``aten::mm.dtype`` exists only for CUDA). ``fused=True`` forces the Triton kernels,
which on CPU tensors needs TRITON_INTERPRET=1 (the tests). Dispatch offers the backend on CUDA only
(the CPU has its own C++ kernel).
"""
from __future__ import annotations

import torch

from .. import _dispatch
from . import contrastive_blas_triton as _kernels
from ._validate import acc_dtype, grad_unit

CHUNK_BYTES = 64 * 2**20  # one chunk's float32 scores (see the module docstring for the backward)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with float32 (or float64) output: fp16 / bf16 operands keep the tensor-core rate
    on CUDA and round only once, at the end of each dot product."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()
    return a @ b


# CUDA: every chunk reads all M + K keys again for its products (~4 C FLOPs per key byte over the
# forward and backward), so below ~300 rows a chunk's products wait on memory at H100 rates (990
# TFLOP/s against 3.35 TB/s). 64 MiB of scores is 1024 rows at N = 16k but 16 rows at N = 1M (the
# issue's largest batch: 65,536 chunks re-reading 1 GB of bf16 keys each), so on CUDA a chunk has
# at least GPU_MIN_ROWS rows: 2 GiB of float32 scores at N = 1M.
GPU_MIN_ROWS = 512


def chunk_rows(n: int, cols: int, chunk_bytes: int | None = None, min_rows: int = 1) -> int:
    """Rows per chunk: the largest multiple of 64 (or n) whose float32 scores fit chunk_bytes (default
    ``CHUNK_BYTES``, read at the call), and at least ``min_rows`` (``GPU_MIN_ROWS`` for CUDA tensors)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(1, chunk_bytes // (4 * max(cols, 1)), min_rows)
    if rows >= n:
        return n
    return max(64, rows // 64 * 64) if rows >= 64 else rows


def _min_rows(q: torch.Tensor) -> int:
    return GPU_MIN_ROWS if q.is_cuda else 1


def _scores(q_c: torch.Tensor, keys_t: torch.Tensor, scale: torch.Tensor, r0: int, m: int,
            self_offset: int) -> torch.Tensor:
    """Scaled scores of rows [r0, r0 + C) against every key, with the excluded self pairs at -inf."""
    s = _mm(q_c, keys_t)
    s.mul_(scale.to(s.dtype))
    if self_offset >= 0:
        i = torch.arange(r0, r0 + q_c.shape[0], device=s.device)
        ok = i + self_offset < m
        s[(i - r0)[ok], i[ok] + self_offset] = float("-inf")
    return s


def _keys(k: torch.Tensor, queue: torch.Tensor | None) -> torch.Tensor:
    return k if queue is None or queue.shape[0] == 0 else torch.cat([k, queue])


def _fused(q: torch.Tensor, fused: bool | None) -> bool:
    """Whether the chunks' elementwise work runs in the Triton kernels: by default for CUDA tensors
    where Triton runs; ``fused=True`` forces them (CPU tensors need TRITON_INTERPRET=1), False keeps
    the torch ops."""
    why = _dispatch.kernel_dtype_refusal(q.dtype) or _dispatch.triton_unavailable() or \
        _dispatch.triton_device_refusal(q.device)
    if fused is None:
        return q.is_cuda and why is None
    if fused and why is not None:
        raise RuntimeError(f"contrastive blas backend: the fused chunk kernels cannot run: {why}")
    return fused


def forward(q, k, queue, scale, symmetric, self_offset, *, chunk_bytes: int | None = None,
            fused: bool | None = None):
    """(row_lse (N,), col_lse (M,) or empty) in float32 (float64 for float64 inputs)."""
    n, m = q.shape[0], k.shape[0]
    keys = _keys(k, queue)
    keys_t = keys.T  # a view: BLAS takes the transposed operand as it is
    rows = chunk_rows(n, keys.shape[0], chunk_bytes, _min_rows(q))
    acc = acc_dtype(q.dtype)
    row = torch.empty(n, device=q.device, dtype=acc)
    if _fused(q, fused):
        scale = scale.to(device=q.device, dtype=torch.float32)
        col_max = torch.full((m if symmetric else 0,), float("-inf"), device=q.device, dtype=acc)
        col_sum = torch.zeros_like(col_max)
        for r0 in range(0, n, rows):
            s = _mm(q[r0:r0 + rows], keys_t)
            _kernels.row_lse(s, scale, row[r0:r0 + rows], r0, m, self_offset)
            if symmetric:
                _kernels.merge_col_lse(s, scale, col_max, col_sum, r0, self_offset)
        return row, col_max.add_(col_sum.log_())
    col = torch.full((m,), float("-inf"), device=q.device, dtype=acc) if symmetric else torch.empty(0, device=q.device,
                                                                                                  dtype=acc)
    for r0 in range(0, n, rows):
        s = _scores(q[r0:r0 + rows], keys_t, scale, r0, m, self_offset)
        row[r0:r0 + rows] = torch.logsumexp(s, dim=1)
        if symmetric:
            torch.logaddexp(col, torch.logsumexp(s[:, :m], dim=0), out=col)
    return row, col


def _dscores(q_c, keys_t, scale, row_lse, g_row, col_lse, g_col, r0, m, self_offset):
    """The torch ops' dS of rows [r0, r0 + C): g_row * softmax_rows (+ g_col * softmax_cols on key columns)."""
    s = _scores(q_c, keys_t, scale, r0, m, self_offset)
    ds = torch.exp(s - row_lse[:, None]).mul_(g_row[:, None])
    if col_lse is not None:
        ds[:, :m].add_(torch.exp(s[:, :m].sub_(col_lse[None, :])).mul_(g_col[None, :]))
    return ds


def backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, symmetric, self_offset, *,
             chunk_bytes: int | None = None, fused: bool | None = None, targets=None, g_pos=None):
    """(G_q (N, D), G_k (M, D)) in float32 (float64), *not* multiplied by scale (see contrastive.py).

    ``dS = g_row * softmax_rows(S) (+ g_col * softmax_cols(S) on the first M columns)``, plus
    ``g_pos[i]`` at ``(i, targets[i])`` (the positives' gradient) when ``targets`` (N,) is given; for
    fp16 / bf16 inputs dS is rounded to the input dtype for the products, after scaling the incoming
    gradients to a maximum of 1 so that it stays representable (as in the tiled kernels). The positives
    are added before that rounding: where the views agree their term nearly cancels the softmax's."""
    if (targets is None) != (g_pos is None):
        raise ValueError("targets and g_pos: give both or neither")
    n, m = q.shape[0], k.shape[0]
    keys = _keys(k, queue)
    keys_t = keys.T
    rows = chunk_rows(n, keys.shape[0], chunk_bytes, _min_rows(q))
    acc = acc_dtype(q.dtype)
    half = q.dtype in (torch.float16, torch.bfloat16)
    g_row = g_row.to(acc)
    g_col = g_col.to(acc) if symmetric else None
    g_pos = g_pos.to(acc) if targets is not None else None
    gmax = None
    if half:
        gmax = grad_unit(g_row, g_col, g_pos)
        g_row = g_row / gmax
        g_col = g_col / gmax if symmetric else None
        g_pos = g_pos / gmax if targets is not None else None
    row_lse = row_lse.to(acc)
    col_lse = col_lse.to(acc) if symmetric else None
    kernels = _fused(q, fused)
    if kernels:
        scale = scale.to(device=q.device, dtype=torch.float32)
        row_lse, g_row = row_lse.contiguous(), g_row.contiguous()
        col_lse, g_col = (col_lse.contiguous(), g_col.contiguous()) if symmetric else (None, None)
        if targets is not None:
            targets, g_pos = targets.contiguous(), g_pos.contiguous()
    gq = torch.empty(q.shape, device=q.device, dtype=acc)
    gk = torch.zeros(k.shape, device=q.device, dtype=acc)
    for r0 in range(0, n, rows):
        q_c = q[r0:r0 + rows]
        lse_c, g_c = row_lse[r0:r0 + rows], g_row[r0:r0 + rows]
        t_c, gp_c = (targets[r0:r0 + rows], g_pos[r0:r0 + rows]) if targets is not None else (None, None)
        if kernels:  # the float32 scores live only inside this call
            ds = _kernels.dscores(_mm(q_c, keys_t), scale, lse_c, g_c, col_lse, g_col, r0, m, self_offset, q.dtype,
                                  t_c, gp_c)
        else:
            ds = _dscores(q_c, keys_t, scale, lse_c, g_c, col_lse, g_col, r0, m, self_offset)
            if t_c is not None:
                ds.index_put_((torch.arange(ds.shape[0], device=ds.device), t_c), gp_c, accumulate=True)
            ds = ds.to(q.dtype) if half else ds
        gq[r0:r0 + rows] = _mm(ds, keys)
        if not _dispatch.addmm_f32_(gk, ds[:, :m].T, q_c):  # CUDA half: summed by the GEMM itself
            gk += _mm(ds[:, :m].T, q_c)
    if gmax is not None:
        gq.mul_(gmax)
        gk.mul_(gmax)
    return gq, gk
