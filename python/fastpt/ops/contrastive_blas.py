"""Contrastive log-sum-exp statistics by chunked matrix products (the ``blas`` backend).

The similarity matrix ``S = scale * q @ [k; queue]^T`` is never held whole: rows go through in
chunks of ``C`` rows, each chunk's ``(C, M + K)`` scores come from one BLAS product (cuBLAS on a
GPU, float32 output from fp16 / bf16 operands through ``torch.mm(..., out_dtype=float32)``), their
row log-sum-exps are taken and the chunk is dropped. The column log-sum-exps (symmetric losses)
merge across chunks with ``logaddexp``. The backward recomputes each chunk's scores, forms
``dS`` and adds ``dS @ keys`` / ``dS^T @ q_chunk`` with two more products.

Why a backend of plain products beside the tiled kernels: at contrastive sizes (D = 256-1024) the
work is four large GEMMs, which cuBLAS runs at the chip's matrix rate; the tiled Triton kernel,
which streams D through registers per tile, measured 5.6x slower than eager on an H200 at
N = 16384, D = 512 (benches/results/contrastive-gpu.md). The memory stays bounded by the chunk,
``~3 * C * (M + K) * 4`` bytes (256 MiB by default), not by N.

The same code runs on the CPU (float32 / float64 products; half inputs are upcast there, as
``aten::mm.dtype`` exists only for CUDA), which is how the CPU tests check it; dispatch offers it
on CUDA only (the CPU has its own C++ kernel).
"""
from __future__ import annotations

import torch

from ._validate import acc_dtype

CHUNK_BYTES = 256 * 2**20  # one chunk's float32 scores; the backward holds about three of these


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with float32 (or float64) output: fp16 / bf16 operands keep the tensor-core rate
    on CUDA and round only once, at the end of each dot product."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()
    return a @ b


def chunk_rows(n: int, cols: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: the largest multiple of 64 (or n) whose float32 scores fit chunk_bytes."""
    rows = max(1, chunk_bytes // (4 * max(cols, 1)))
    if rows >= n:
        return n
    return max(64, rows // 64 * 64) if rows >= 64 else rows


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


def forward(q, k, queue, scale, symmetric, self_offset, *, chunk_bytes: int = CHUNK_BYTES):
    """(row_lse (N,), col_lse (M,) or empty) in float32 (float64 for float64 inputs)."""
    n, m = q.shape[0], k.shape[0]
    keys = _keys(k, queue)
    keys_t = keys.T  # a view: BLAS takes the transposed operand as it is
    rows = chunk_rows(n, keys.shape[0], chunk_bytes)
    acc = acc_dtype(q.dtype)
    row = torch.empty(n, device=q.device, dtype=acc)
    col = torch.full((m,), float("-inf"), device=q.device, dtype=acc) if symmetric else torch.empty(0, device=q.device,
                                                                                                  dtype=acc)
    for r0 in range(0, n, rows):
        s = _scores(q[r0:r0 + rows], keys_t, scale, r0, m, self_offset)
        row[r0:r0 + rows] = torch.logsumexp(s, dim=1)
        if symmetric:
            torch.logaddexp(col, torch.logsumexp(s[:, :m], dim=0), out=col)
    return row, col


def backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, symmetric, self_offset, *,
             chunk_bytes: int = CHUNK_BYTES):
    """(G_q (N, D), G_k (M, D)) in float32 (float64), *not* multiplied by scale (see contrastive.py).

    ``dS = g_row * softmax_rows(S) (+ g_col * softmax_cols(S) on the first M columns)``; for fp16 /
    bf16 inputs dS is rounded to the input dtype for the products, after scaling the incoming
    gradients to a maximum of 1 so that it stays representable (as in the tiled kernels)."""
    n, m = q.shape[0], k.shape[0]
    keys = _keys(k, queue)
    keys_t = keys.T
    rows = chunk_rows(n, keys.shape[0], chunk_bytes)
    acc = acc_dtype(q.dtype)
    half = q.dtype in (torch.float16, torch.bfloat16)
    g_row = g_row.to(acc)
    g_col = g_col.to(acc) if symmetric else None
    gmax = None
    if half:
        gmax = g_row.abs().amax() if not symmetric else torch.maximum(g_row.abs().amax(), g_col.abs().amax())
        gmax = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
        g_row = g_row / gmax
        g_col = g_col / gmax if symmetric else None
    row_lse = row_lse.to(acc)
    col_lse = col_lse.to(acc) if symmetric else None
    gq = torch.empty(q.shape, device=q.device, dtype=acc)
    gk = torch.zeros(k.shape, device=q.device, dtype=acc)
    for r0 in range(0, n, rows):
        q_c = q[r0:r0 + rows]
        s = _scores(q_c, keys_t, scale, r0, m, self_offset)
        ds = torch.exp(s - row_lse[r0:r0 + rows, None]).mul_(g_row[r0:r0 + rows, None])
        if symmetric:
            ds[:, :m].add_(torch.exp(s[:, :m].sub_(col_lse[None, :])).mul_(g_col[None, :]))
        del s
        ds_in = ds.to(q.dtype) if half else ds
        gq[r0:r0 + rows] = _mm(ds_in, keys)
        gk += _mm(ds_in[:, :m].T, q_c)
    if gmax is not None:
        gq.mul_(gmax)
        gk.mul_(gmax)
    return gq, gk
