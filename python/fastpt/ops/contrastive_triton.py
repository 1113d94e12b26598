"""Triton kernels of the tiled contrastive log-sum-exp (the math is in ``contrastive.py``).

Three kernels, none of which holds more than one (BN, BM) tile of the similarity matrix:

* ``_fwd_kernel``: grid (P_r, P_c). Program (r, c) walks row blocks r, r + P_r, ... and, for each,
  the column blocks of split c (keys, then queue), keeping the online max / sum per row. It writes
  a partial (max, sum) per (split, row) and, when symmetric, per (r, key column): the partials are
  merged in torch (``merge_lse``). Statistics: O(P_c * N + P_r * M) floats, P_r * P_c ~ 2 * SMs.
* ``_bwd_dq_kernel``: grid (row blocks, P_c): recomputes S and dS = d loss / d S tile by tile and
  adds ``dS @ [k; queue]`` into its rows, one feature chunk of BD at a time (read-modify-write of
  rows no other program touches, so any D works without a (BN, D) register accumulator). P_c > 1
  only when there are few row blocks (small N, e.g. MoCo against a long queue); its partial sums
  (P_c, N, D) are then small.
* ``_bwd_dk_kernel``: grid (key blocks, P_r): the same dS, adding ``dS^T @ q`` per key block.

Splitting the backward in two recomputes S once more (4 tile GEMMs instead of 3) but needs no
atomics: results are deterministic and no (M, D) buffer is hammered by every row block.

fp32 inputs use ``input_precision="ieee"`` (TF32 would break the fp32 accuracy contract); fp16 /
bf16 tiles go to the tensor cores with fp32 accumulation. dS is cast to the input dtype for the
second GEMM, as FlashAttention does; the host scales the incoming gradients to a maximum of 1 first
so that fp16 dS does not underflow when the loss is a mean over a large batch.
"""
from __future__ import annotations


import torch

from .. import _dispatch

try:  # Triton is optional: a GPU backend, or the CPU interpreter in tests.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


if triton is not None:

    @triton.jit
    def _mm(a, b, acc, UPCAST: tl.constexpr):
        """acc + a @ b with fp32 accumulation. UPCAST: the Triton 3.8 interpreter multiplies
        bfloat16 blocks as raw integers, so under the interpreter bf16 operands go in as fp32
        (exact: they were rounded to bf16 already)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision="ieee")

    @triton.jit
    def _scores(a_ptr, b_ptr, rows, cols, n_a, n_b, D,
                BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr):
        """a[rows] @ b[cols]^T as a (BN, BM) fp32 tile; rows / cols beyond n_a / n_b read zeros."""
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        ra = rows.to(tl.int64) * D
        rb = cols.to(tl.int64) * D
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dm = d < D
            a = tl.load(a_ptr + ra[:, None] + d[None, :], mask=(rows < n_a)[:, None] & dm[None, :], other=0.0)
            b = tl.load(b_ptr + rb[:, None] + d[None, :], mask=(cols < n_b)[:, None] & dm[None, :], other=0.0)
            acc = _mm(a, tl.trans(b), acc, UPCAST)
        return acc

    @triton.jit
    def _masked_scores(a_ptr, b_ptr, rows, cols, n_a, n_b, D, scale, self_offset,
                       EXCL: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr):
        """The scaled S tile with -inf outside the matrix and, with EXCL, on each query's own key."""
        s = _scores(a_ptr, b_ptr, rows, cols, n_a, n_b, D, BN, BM, BD, UPCAST) * scale
        valid = (rows < n_a)[:, None] & (cols < n_b)[None, :]
        if EXCL:
            valid = valid & (cols[None, :] != rows[:, None] + self_offset)
        return tl.where(valid, s, float("-inf"))

    @triton.jit
    def _online(m, s, tile, AXIS: tl.constexpr):
        """One online log-sum-exp step along AXIS; fully masked lines stay (-inf, 0)."""
        new = tl.maximum(m, tl.max(tile, axis=AXIS))
        safe = tl.where(new == float("-inf"), 0.0, new)
        if AXIS == 1:
            p = tl.exp(tile - safe[:, None])
        else:
            p = tl.exp(tile - safe[None, :])
        return new, s * tl.exp(m - safe) + tl.sum(p, axis=AXIS)

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, queue_ptr, scale_ptr, row_m_ptr, row_s_ptr, col_m_ptr, col_s_ptr,
                    N, M, K, D, self_offset,
                    SYM: tl.constexpr, EXCL: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                    UPCAST: tl.constexpr):
        pid_r = tl.program_id(0)
        n_r = tl.num_programs(0)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        n_kb = tl.cdiv(M, BM)
        n_b = n_kb + tl.cdiv(K, BM)
        b0 = split * n_b // n_split
        b1 = (split + 1) * n_b // n_split
        scale = tl.load(scale_ptr)
        for rb in range(pid_r, tl.cdiv(N, BN), n_r):
            rows = rb * BN + tl.arange(0, BN)
            m_i = tl.full((BN,), float("-inf"), tl.float32)
            s_i = tl.zeros((BN,), tl.float32)
            for b in range(b0, tl.minimum(b1, n_kb)):
                cols = b * BM + tl.arange(0, BM)
                tile = _masked_scores(q_ptr, k_ptr, rows, cols, N, M, D, scale, self_offset, EXCL, BN, BM, BD, UPCAST)
                m_i, s_i = _online(m_i, s_i, tile, 1)
                if SYM:
                    # This program's running column statistics, fresh at its first row block.
                    off = pid_r.to(tl.int64) * M + cols
                    keep = (cols < M) & (rb != pid_r)
                    cm = tl.load(col_m_ptr + off, mask=keep, other=float("-inf"))
                    cs = tl.load(col_s_ptr + off, mask=keep, other=0.0)
                    cm, cs = _online(cm, cs, tile, 0)
                    tl.store(col_m_ptr + off, cm, mask=cols < M)
                    tl.store(col_s_ptr + off, cs, mask=cols < M)
            for b in range(tl.maximum(b0, n_kb), b1):
                cols = (b - n_kb) * BM + tl.arange(0, BM)
                tile = _masked_scores(q_ptr, queue_ptr, rows, cols, N, K, D, scale, 0, False, BN, BM, BD, UPCAST)
                m_i, s_i = _online(m_i, s_i, tile, 1)
            out = split.to(tl.int64) * N + rows
            tl.store(row_m_ptr + out, m_i, mask=rows < N)
            tl.store(row_s_ptr + out, s_i, mask=rows < N)

    @triton.jit
    def _dscores(q_ptr, k_ptr, rows, cols, N, M, D, scale, self_offset, lse_r, g_r, col_lse_ptr, g_col_ptr,
                 SYM: tl.constexpr, EXCL: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                 UPCAST: tl.constexpr):
        """dLoss/dS on one tile: g_row * softmax_row (+ g_col * softmax_col on key columns)."""
        tile = _masked_scores(q_ptr, k_ptr, rows, cols, N, M, D, scale, self_offset, EXCL, BN, BM, BD, UPCAST)
        ds = tl.exp(tile - lse_r[:, None]) * g_r[:, None]
        if SYM:
            lse_c = tl.load(col_lse_ptr + cols, mask=cols < M, other=0.0)
            g_c = tl.load(g_col_ptr + cols, mask=cols < M, other=0.0)
            ds += tl.exp(tile - lse_c[None, :]) * g_c[None, :]
        return tl.where(tile == float("-inf"), 0.0, ds)

    @triton.jit
    def _add_product(out_ptr, a, b_ptr, b_rows, n_b, out_rows, n_out, D,
                     TRANS_A: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr):
        """out[out_rows] += a @ b[b_rows] (or a^T @ ...), one feature chunk at a time.

        out rows belong to one program only (its own rows of its own split's partial buffer),
        so a plain load / add / store is race-free and deterministic."""
        ob = out_rows.to(tl.int64)[:, None] * D
        bb = b_rows.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            dm = d < D
            b = tl.load(b_ptr + bb + d[None, :], mask=(b_rows < n_b)[:, None] & dm[None, :], other=0.0)
            om = (out_rows < n_out)[:, None] & dm[None, :]
            acc = tl.load(out_ptr + ob + d[None, :], mask=om, other=0.0)
            if TRANS_A:
                acc = _mm(tl.trans(a).to(b.dtype), b, acc, UPCAST)
            else:
                acc = _mm(a.to(b.dtype), b, acc, UPCAST)
            tl.store(out_ptr + ob + d[None, :], acc, mask=om)

    @triton.jit
    def _bwd_dq_kernel(q_ptr, k_ptr, queue_ptr, scale_ptr, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, dq_ptr,
                       N, M, K, D, self_offset,
                       SYM: tl.constexpr, EXCL: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                       BD: tl.constexpr, UPCAST: tl.constexpr):
        rb = tl.program_id(0)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        n_kb = tl.cdiv(M, BM)
        n_b = n_kb + tl.cdiv(K, BM)
        b0 = split * n_b // n_split
        b1 = (split + 1) * n_b // n_split
        scale = tl.load(scale_ptr)
        rows = rb * BN + tl.arange(0, BN)
        lse_r = tl.load(row_lse_ptr + rows, mask=rows < N, other=0.0)
        g_r = tl.load(g_row_ptr + rows, mask=rows < N, other=0.0)
        out = dq_ptr + split.to(tl.int64) * N * D
        for b in range(b0, tl.minimum(b1, n_kb)):
            cols = b * BM + tl.arange(0, BM)
            ds = _dscores(q_ptr, k_ptr, rows, cols, N, M, D, scale, self_offset, lse_r, g_r, col_lse_ptr,
                          g_col_ptr, SYM, EXCL, BN, BM, BD, UPCAST)
            _add_product(out, ds, k_ptr, cols, M, rows, N, D, False, BD, UPCAST)
        for b in range(tl.maximum(b0, n_kb), b1):
            cols = (b - n_kb) * BM + tl.arange(0, BM)
            ds = _dscores(q_ptr, queue_ptr, rows, cols, N, K, D, scale, 0, lse_r, g_r, col_lse_ptr, g_col_ptr,
                          False, False, BN, BM, BD, UPCAST)
            _add_product(out, ds, queue_ptr, cols, K, rows, N, D, False, BD, UPCAST)

    @triton.jit
    def _bwd_dk_kernel(q_ptr, k_ptr, scale_ptr, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, dk_ptr,
                       N, M, D, self_offset,
                       SYM: tl.constexpr, EXCL: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                       BD: tl.constexpr, UPCAST: tl.constexpr):
        cb = tl.program_id(0)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        n_rb = tl.cdiv(N, BN)
        r0 = split * n_rb // n_split
        r1 = (split + 1) * n_rb // n_split
        scale = tl.load(scale_ptr)
        cols = cb * BM + tl.arange(0, BM)
        out = dk_ptr + split.to(tl.int64) * M * D
        for rb in range(r0, r1):
            rows = rb * BN + tl.arange(0, BN)
            lse_r = tl.load(row_lse_ptr + rows, mask=rows < N, other=0.0)
            g_r = tl.load(g_row_ptr + rows, mask=rows < N, other=0.0)
            ds = _dscores(q_ptr, k_ptr, rows, cols, N, M, D, scale, self_offset, lse_r, g_r, col_lse_ptr,
                          g_col_ptr, SYM, EXCL, BN, BM, BD, UPCAST)
            _add_product(out, ds, q_ptr, rows, N, cols, M, D, True, BD, UPCAST)


def _config(q: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(BN, BM, BD, num_warps, target number of programs) for these inputs.

    Under the interpreter: a few large steps (each loop step costs milliseconds) and a target of
    4 programs, so that the tests exercise the column splits and row striding on tiny inputs.
    On a GPU: 2 programs per SM; tensor-core tiles for half inputs, smaller tiles for fp32 "ieee"
    dots. Chosen by reasoning, not measured: no GPU was available when they were written.
    """
    if q.device.type != "cuda":
        return 32, 32, 64, 4, 4
    target = 2 * _dispatch.sm_count(q.device)
    if q.dtype == torch.float32:
        return 32, 64, 32, 4, target
    return 64, 64, 64, 4, target


def _upcast(q: torch.Tensor) -> bool:
    return q.device.type != "cuda" and q.dtype == torch.bfloat16


def _split(blocks: int, other_blocks: int, target: int) -> int:
    """Splits of the loop dimension so that other_blocks * splits ~ target programs."""
    if other_blocks >= target:
        return 1
    return max(1, min(blocks, -(-target // max(other_blocks, 1))))


def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Merge partial (max, sum) statistics along dim 0 into log-sum-exp values (fp32)."""
    mx = m.max(dim=0).values
    safe = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    return safe + torch.log((s * torch.exp(m - safe)).sum(dim=0))


def supports(q: torch.Tensor) -> str | None:
    if triton is None:
        return "triton is not installed"
    why = _dispatch.triton_device_refusal(q.device)
    if why is not None:
        return why
    return _dispatch.kernel_dtype_refusal(q.dtype)


def forward(q, k, queue, scale, symmetric, self_offset):
    """(row_lse (N,), col_lse (M,) or empty) in fp32. q (N, D), k (M, D), queue (K, D) or None,
    contiguous, one float dtype; scale a 0-dim fp32 tensor on the same device."""
    n, d = q.shape
    m = k.shape[0]
    kq = queue.shape[0] if queue is not None else 0
    bn, bm, bd, warps, target = _config(q)
    n_rb, n_cb = triton.cdiv(n, bn), triton.cdiv(m, bm) + triton.cdiv(kq, bm)
    if symmetric:  # balance the two kinds of partial statistics: P_r * P_c ~ target
        p_r = max(1, min(n_rb, int(target ** 0.5)))
        p_c = max(1, min(n_cb, target // p_r))
    else:
        p_r = n_rb
        p_c = _split(n_cb, p_r, target)
    f32 = dict(device=q.device, dtype=torch.float32)
    row_m, row_s = torch.empty(p_c, n, **f32), torch.empty(p_c, n, **f32)
    col_m = torch.empty(p_r if symmetric else 1, m if symmetric else 1, **f32)
    col_s = torch.empty_like(col_m)
    _fwd_kernel[(p_r, p_c)](
        q, k, queue if queue is not None else k, scale, row_m, row_s, col_m, col_s, n, m, kq, d, max(self_offset, 0),
        SYM=symmetric, EXCL=self_offset >= 0, BN=bn, BM=bm, BD=bd, UPCAST=_upcast(q), num_warps=warps,
    )
    row = merge_lse(row_m, row_s)
    col = merge_lse(col_m, col_s) if symmetric else torch.empty(0, **f32)
    return row, col


def backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, symmetric, self_offset):
    """(G_q (N, D), G_k (M, D)) in fp32, *not* multiplied by scale (see contrastive.py)."""
    n, d = q.shape
    m = k.shape[0]
    kq = queue.shape[0] if queue is not None else 0
    bn, bm, bd, warps, target = _config(q)
    # Incoming gradients scaled to max |g| = 1 so that dS stays representable in fp16.
    gmax = g_row.abs().max()
    if symmetric:
        gmax = torch.maximum(gmax, g_col.abs().max())
    gmax = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
    g_row = (g_row / gmax).contiguous()
    g_col = (g_col / gmax).contiguous() if symmetric else g_row
    col_lse = col_lse if symmetric else row_lse
    n_rb, n_kb, n_cb = triton.cdiv(n, bn), triton.cdiv(m, bm), triton.cdiv(m, bm) + triton.cdiv(kq, bm)
    p_c = _split(n_cb, n_rb, target)
    dq = torch.zeros(p_c, n, d, device=q.device, dtype=torch.float32)
    excl = self_offset >= 0
    _bwd_dq_kernel[(n_rb, p_c)](
        q, k, queue if queue is not None else k, scale, row_lse, col_lse, g_row, g_col, dq, n, m, kq, d,
        max(self_offset, 0), SYM=symmetric, EXCL=excl, BN=bn, BM=bm, BD=bd, UPCAST=_upcast(q), num_warps=warps,
    )
    p_r = _split(n_rb, n_kb, target)
    dk = torch.zeros(p_r, m, d, device=q.device, dtype=torch.float32)
    _bwd_dk_kernel[(n_kb, p_r)](
        q, k, scale, row_lse, col_lse, g_row, g_col, dk, n, m, d, max(self_offset, 0),
        SYM=symmetric, EXCL=excl, BN=bn, BM=bm, BD=bd, UPCAST=_upcast(q), num_warps=warps,
    )
    return dq.sum(0) * gmax, dk.sum(0) * gmax
