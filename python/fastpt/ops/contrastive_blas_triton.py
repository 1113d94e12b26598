"""Triton kernels of the blas contrastive backend: the elementwise work on one chunk of scores.

``contrastive_blas.py`` gets each chunk's raw float32 scores ``s = q_c @ [k; queue]^T`` (C rows,
``cols = M + K`` columns, row-major) from cuBLAS. Done with torch ops, scaling, masking, the row
and column log-sum-exps and the backward's ``dS`` were about ten passes over the chunk, each
moving as many bytes as the GEMM that made it (1-2 GB per pass at N = 16384): those passes, not
the products, were the time. These kernels read the chunk once (twice for symmetric losses in the
forward) and write only what the products need:

* ``_row_lse_kernel``: rows of the chunk across programs, the columns looped in BLOCK_N tiles with
  an online max / sum: ``row_lse = logsumexp_j(scale * s[i, j])`` without the self pairs.
* ``_col_lse_kernel`` (symmetric losses): columns of the first M across programs, the chunk's rows
  looped; each program merges its columns' running (max, sum) over the chunks seen so far, in
  place. Every value has one owner: no atomics, results are deterministic.
* ``_dscores_kernel``: one (BLOCK_R, BLOCK_N) tile per program, ``dS = g_row * exp(scale * s -
  row_lse)`` (+ ``g_col * exp(scale * s - col_lse)`` on the first M columns), self pairs 0,
  stored in the dtype of the products (fp16 / bf16, or fp32 over the scores themselves).

Self pairs (``self_offset >= 0``, NT-Xent): column ``i + self_offset`` of global row ``i`` when it
is below M. The scale is read from its 0-dim float32 tensor inside the kernels: no host sync, so
the op stays capturable in a CUDA graph.

Block sizes: on the GPU about 4096 fp32 values per program step (1024 columns x 4 rows for the row
statistics), chosen by reasoning: no GPU was at hand when this was written. Under the interpreter
(the CPU test path) every program step costs milliseconds whatever its size, so the blocks are as
large as the (small) test shapes, capped by ``INTERPRET_ROWS`` / ``INTERPRET_COLS`` (tests lower
them to exercise the loops and masks). Triton 3.8's interpreter truncates fp32 -> bf16 stores (the
GPU rounds to nearest even), so there half ``dS`` goes through an fp32 buffer that torch rounds.
"""
from __future__ import annotations

import contextlib

import torch

from .. import _native

try:  # Triton is optional: a GPU backend, or the CPU interpreter in tests.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

GPU_TILE = 4096  # fp32 values per program step
ROW_BLOCK_N, DS_BLOCK_N, COL_BLOCK_C = 1024, 512, 64  # GPU columns per step / per program
INTERPRET_ROWS, INTERPRET_COLS = 64, 256


if triton is not None:

    @triton.jit
    def _excluded(rows, cols, r0, m, self_offset):
        """(rows, cols) mask of the self pairs: chunk row i (global r0 + i) against key column r0 + i + self_offset."""
        own = r0 + rows + self_offset
        return (cols[None, :] == own[:, None]) & (own < m)[:, None]

    @triton.jit
    def _row_lse_kernel(S, stride, scale_ptr, ROW_LSE, n_rows, n_cols, r0, m, self_offset,
                        EXCL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows < n_rows
        base = S + rows.to(tl.int64)[:, None] * stride
        scale = tl.load(scale_ptr)
        mx = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        sm = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, n_cols, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            ok = r_ok[:, None] & (cols < n_cols)[None, :]
            x = tl.load(base + cols[None, :], mask=ok, other=0.0) * scale
            x = tl.where(ok, x, float("-inf"))
            if EXCL:
                x = tl.where(_excluded(rows, cols, r0, m, self_offset), float("-inf"), x)
            new = tl.maximum(mx, tl.max(x, axis=1))
            safe = tl.where(new == float("-inf"), 0.0, new)  # fully masked so far: stay (-inf, 0)
            sm = sm * tl.exp(mx - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
            mx = new
        tl.store(ROW_LSE + rows, mx + tl.log(sm), mask=r_ok)

    @triton.jit
    def _col_lse_kernel(S, stride, scale_ptr, COL_MAX, COL_SUM, n_rows, r0, m, self_offset,
                        EXCL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cols < m
        scale = tl.load(scale_ptr)
        mx = tl.load(COL_MAX + cols, mask=c_ok, other=float("-inf"))
        sm = tl.load(COL_SUM + cols, mask=c_ok, other=0.0)
        for i0 in range(0, n_rows, BLOCK_R):
            rows = i0 + tl.arange(0, BLOCK_R)
            ok = (rows < n_rows)[:, None] & c_ok[None, :]
            x = tl.load(S + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=ok, other=0.0) * scale
            x = tl.where(ok, x, float("-inf"))
            if EXCL:
                x = tl.where(_excluded(rows, cols, r0, m, self_offset), float("-inf"), x)
            new = tl.maximum(mx, tl.max(x, axis=0))
            safe = tl.where(new == float("-inf"), 0.0, new)
            sm = sm * tl.exp(mx - safe) + tl.sum(tl.exp(x - safe[None, :]), axis=0)
            mx = new
        tl.store(COL_MAX + cols, mx, mask=c_ok)
        tl.store(COL_SUM + cols, sm, mask=c_ok)

    @triton.jit
    def _dscores_kernel(S, stride, scale_ptr, ROW_LSE, G_ROW, COL_LSE, G_COL, TARGETS, G_POS, DS, ds_stride,
                        n_rows, n_cols, r0, m, self_offset,
                        SYM: tl.constexpr, EXCL: tl.constexpr, POS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_ok = rows < n_rows
        ok = r_ok[:, None] & (cols < n_cols)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(S + r64 * stride + cols[None, :], mask=ok, other=0.0) * tl.load(scale_ptr)
        lse_r = tl.load(ROW_LSE + rows, mask=r_ok, other=0.0)
        g_r = tl.load(G_ROW + rows, mask=r_ok, other=0.0)
        ds = tl.exp(x - lse_r[:, None]) * g_r[:, None]
        if SYM:
            key = cols < m
            lse_c = tl.load(COL_LSE + cols, mask=key, other=0.0)
            g_c = tl.load(G_COL + cols, mask=key, other=0.0)
            ds += tl.where(key[None, :], tl.exp(x - lse_c[None, :]) * g_c[None, :], 0.0)
        if EXCL:
            ds = tl.where(_excluded(rows, cols, r0, m, self_offset), 0.0, ds)
        if POS:  # the positive's gradient, in float32 before the rounding (it nearly cancels the softmax's)
            t = tl.load(TARGETS + rows, mask=r_ok, other=-1)
            g_p = tl.load(G_POS + rows, mask=r_ok, other=0.0)
            ds += tl.where(cols[None, :] == t[:, None], g_p[:, None], 0.0)
        tl.store(DS + r64 * ds_stride + cols[None, :], ds.to(DS.dtype.element_ty), mask=ok)


def _blocks(rows: int, cols: int, gpu_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps) for a tile walk over (rows, cols); gpu_cols caps BLOCK_N on a GPU."""
    if _native.triton_interpreting():
        return min(INTERPRET_ROWS, triton.next_power_of_2(rows)), min(INTERPRET_COLS, triton.next_power_of_2(cols)), 4
    bn = min(gpu_cols, max(16, triton.next_power_of_2(cols)))
    br = min(max(2, GPU_TILE // bn), max(2, triton.next_power_of_2(rows)))
    return br, bn, 8 if br * bn >= GPU_TILE else 4


def _on(device: torch.device):
    """Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def row_lse(s: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, r0: int, m: int, self_offset: int) -> None:
    """out[i] = logsumexp_j(scale * s[i, j]) over the columns j that are not row i's self pair.

    s: (C, cols) float32 scores of global rows [r0, r0 + C), unit column stride; scale: 0-dim float32;
    out: (C,) float32, contiguous."""
    n_rows, n_cols = s.shape
    br, bn, warps = _blocks(n_rows, n_cols, ROW_BLOCK_N)
    with _on(s.device):
        _row_lse_kernel[(triton.cdiv(n_rows, br),)](
            s, s.stride(0), scale, out, n_rows, n_cols, r0, m, max(self_offset, 0),
            EXCL=self_offset >= 0, BLOCK_R=br, BLOCK_N=bn, num_warps=warps,
        )


def merge_col_lse(s: torch.Tensor, scale: torch.Tensor, col_max: torch.Tensor, col_sum: torch.Tensor, r0: int,
                  self_offset: int) -> None:
    """Merge this chunk's first m = col_max.numel() columns into the running per-column (max, sum) of
    exp(scale * s), in place; start them at (-inf, 0). logsumexp = max + log(sum)."""
    n_rows, m = s.shape[0], col_max.numel()
    br, bc, warps = _blocks(n_rows, m, COL_BLOCK_C)
    with _on(s.device):
        _col_lse_kernel[(triton.cdiv(m, bc),)](
            s, s.stride(0), scale, col_max, col_sum, n_rows, r0, m, max(self_offset, 0),
            EXCL=self_offset >= 0, BLOCK_R=br, BLOCK_C=bc, num_warps=warps,
        )


def dscores(s: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor, g_row: torch.Tensor,
            col_lse: torch.Tensor | None, g_col: torch.Tensor | None, r0: int, m: int, self_offset: int,
            dtype: torch.dtype, targets: torch.Tensor | None = None, g_pos: torch.Tensor | None = None) -> torch.Tensor:
    """dS of the chunk in ``dtype``: g_row * softmax_row (+ g_col * softmax_col on the first m columns),
    self pairs 0, plus g_pos[i] at (i, targets[i]) when targets is given. row_lse / g_row / g_pos /
    targets: this chunk's (C,) float32 (targets int64 column indices); col_lse / g_col: (m,) float32 or
    None (not symmetric). A float32 dS overwrites s (each element is read before it is written, by the
    same program); a half one is a new (C, cols) tensor."""
    n_rows, n_cols = s.shape
    if dtype == torch.float32:
        out = buf = s
    else:
        out = torch.empty(s.shape, dtype=dtype, device=s.device)
        buf = out if not _native.triton_interpreting() else s  # torch rounds to nearest even, as the GPU store does
    symmetric = col_lse is not None
    br, bn, warps = _blocks(n_rows, n_cols, DS_BLOCK_N)
    with _on(s.device):
        _dscores_kernel[(triton.cdiv(n_rows, br), triton.cdiv(n_cols, bn))](
            s, s.stride(0), scale, row_lse, g_row, col_lse if symmetric else row_lse, g_col if symmetric else g_row,
            targets if targets is not None else row_lse, g_pos if targets is not None else row_lse,
            buf, buf.stride(0), n_rows, n_cols, r0, m, max(self_offset, 0),
            SYM=symmetric, EXCL=self_offset >= 0, POS=targets is not None, BLOCK_R=br, BLOCK_N=bn, num_warps=warps,
        )
    if buf is not out:
        out.copy_(buf)
    return out
