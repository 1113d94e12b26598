"""Triton kernels of the tiled contrastive log-sum-exp (the math is in ``contrastive.py``).

Two kernels, neither of which holds more than one (rows, columns) tile of the similarity matrix
``S = scale * q @ [k; queue]^T``:

* ``_fwd_kernel``: grid (P_r, P_c). Program (r, c) walks row blocks r, r + P_r, ... and, for each,
  the column blocks of split c (keys, then queue), keeping the online max / sum per row. It writes
  a partial (max, sum) per (split, row) and, when symmetric, per (r, key column): the partials are
  merged in torch (``merge_lse``). Statistics: O(P_c * N + P_r * M) floats, P_r * P_c ~ 2 * SMs.
* ``_bwd_kernel``: one gradient, ``G_q = dS @ [k; queue]`` (``TRANS=False``) or ``G_k = dS^T @ q``
  (``TRANS=True``), FlashAttention-forward style: grid (blocks of the output's rows, slices of D,
  splits of the streamed side). A program keeps its (rows, DO) float32 accumulator on chip for the
  whole loop, recomputes each S tile and ``dS = dLoss / dS`` from the saved log-sum-exps, adds
  ``dS @ values`` and stores its slice once. No atomics (deterministic), nothing read back from
  global memory. The streamed side is split only when there are too few output blocks to fill the
  GPU (small N, e.g. MoCo against a long queue); the (splits, rows, D) partials are then small.
  The kernel finishes the gradient: each query's positive (``Positives``) gets its gradient added to
  dS in float32, the accumulator is multiplied by the scale and stored in the inputs' dtype (float32
  partials only when the streamed side is split), and G_q's programs also sum ``dS * q.k`` for the
  scale's gradient. So a bf16 backward allocates its two bf16 gradients and O(N) statistics.

Two ways to take a tile's products (``RESIDENT``):

* resident: the program's own rows are loaded once, whole (rows, DP) with DP the power of two >= D,
  and each streamed tile is loaded once (cols, DP) and serves both the score product and, when one
  slice covers D, the gradient product: per tile the chip reads (cols x D) elements for
  ~4 x rows x cols x D FLOPs. fp16 / bf16 with D <= 512, when the tiles fit in shared memory.
* chunked: scores in BD-wide feature chunks, both operands streamed from L2 (any D, float32).

Which tiles run is measured: each shape class times a short list of candidates of both kinds at its
first call on the GPU (``candidates``, ``_run``).

Why not the previous layout (one kernel per gradient, adding each tile's product into the float32
output in global memory): it read and wrote a (rows, D) float32 block per tile, ~16 GB per
gradient at N = 16384, D = 512, and an H100 ran it at ~60 TFLOP/s (18.9 ms against eager's 3.3).

fp32 inputs use ``input_precision="ieee"`` (TF32 would break the fp32 accuracy contract); fp16 /
bf16 tiles go to the tensor cores with fp32 accumulation. dS is cast to the input dtype for the
second product, as FlashAttention does; the host scales the incoming gradients to a maximum of 1
first so that fp16 dS does not underflow when the loss is a mean over a large batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _dispatch
from ._validate import grad_unit

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
    def _load(ptr, rows, n, d, D):
        """ptr[rows, d] of a row-major (n, D) matrix as a (len(rows), len(d)) tile; zeros outside."""
        return tl.load(ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
                       mask=(rows < n)[:, None] & (d < D)[None, :], other=0.0)

    @triton.jit
    def _chunked(a_ptr, b_ptr, rows, cols, n_a, n_b, D,
                 BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr):
        """a[rows] @ b[cols]^T as a (BN, BM) fp32 tile, D in BD-wide chunks streamed from memory."""
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            acc = _mm(_load(a_ptr, rows, n_a, d, D), tl.trans(_load(b_ptr, cols, n_b, d, D)), acc, UPCAST)
        return acc

    @triton.jit
    def _mask(raw, rows, cols, n_a, n_b, scale, self_offset, EXCL: tl.constexpr):
        """scale * raw with -inf outside the matrix and, with EXCL, where col == row + self_offset."""
        valid = (rows < n_a)[:, None] & (cols < n_b)[None, :]
        if EXCL:
            valid = valid & (cols[None, :] != rows[:, None] + self_offset)
        return tl.where(valid, raw * scale, float("-inf"))

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
    def _split_blocks(n_main, K, BLOCK: tl.constexpr, AXIS: tl.constexpr):
        """(blocks of the main streamed side, this program's first block, one past its last): the
        streamed blocks (the main side's, then the queue's K rows) split evenly along grid AXIS."""
        split = tl.program_id(AXIS)
        n_split = tl.num_programs(AXIS)
        n_main_b = tl.cdiv(n_main, BLOCK)
        n_all = n_main_b + tl.cdiv(K, BLOCK)
        return n_main_b, split * n_all // n_split, (split + 1) * n_all // n_split

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, queue_ptr, scale_ptr, row_m_ptr, row_s_ptr, col_m_ptr, col_s_ptr,
                    N, M, K, D, self_offset,
                    SYM: tl.constexpr, EXCL: tl.constexpr, RESIDENT: tl.constexpr, BN: tl.constexpr,
                    BM: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, UPCAST: tl.constexpr):
        pid_r = tl.program_id(0)
        n_r = tl.num_programs(0)
        split = tl.program_id(1)
        n_kb, b0, b1 = _split_blocks(M, K, BM, 1)
        scale = tl.load(scale_ptr)
        dp = tl.arange(0, DP)
        for rb in range(pid_r, tl.cdiv(N, BN), n_r):
            rows = rb * BN + tl.arange(0, BN)
            if RESIDENT:
                q_t = _load(q_ptr, rows, N, dp, D)
            m_i = tl.full((BN,), float("-inf"), tl.float32)
            s_i = tl.zeros((BN,), tl.float32)
            for b in range(b0, tl.minimum(b1, n_kb)):
                cols = b * BM + tl.arange(0, BM)
                if RESIDENT:
                    raw = _mm(q_t, tl.trans(_load(k_ptr, cols, M, dp, D)), tl.zeros((BN, BM), tl.float32), UPCAST)
                else:
                    raw = _chunked(q_ptr, k_ptr, rows, cols, N, M, D, BN, BM, BD, UPCAST)
                tile = _mask(raw, rows, cols, N, M, scale, self_offset, EXCL)
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
                if RESIDENT:
                    raw = _mm(q_t, tl.trans(_load(queue_ptr, cols, K, dp, D)), tl.zeros((BN, BM), tl.float32),
                              UPCAST)
                else:
                    raw = _chunked(q_ptr, queue_ptr, rows, cols, N, K, D, BN, BM, BD, UPCAST)
                m_i, s_i = _online(m_i, s_i, _mask(raw, rows, cols, N, K, scale, 0, False), 1)
            out = split.to(tl.int64) * N + rows
            tl.store(row_m_ptr + out, m_i, mask=rows < N)
            tl.store(row_s_ptr + out, s_i, mask=rows < N)

    @triton.jit
    def _bwd_tile(a_ptr, a_t, b_ptr, r0, c0, n_a, n_b, D, scale, self_offset, dp, d_out,
                  row_lse_ptr, g_row_ptr, col_lse_ptr, g_col_ptr, g_pos_ptr, pos_shift, pos_wrap, pos_base, acc, gs,
                  TRANS: tl.constexpr, SYM: tl.constexpr, EXCL: tl.constexpr, POS: tl.constexpr,
                  GSCALE: tl.constexpr, RESIDENT: tl.constexpr, REUSE: tl.constexpr, BA: tl.constexpr,
                  BB: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, DO: tl.constexpr, UPCAST: tl.constexpr):
        """(acc + dS @ b[cols, d_out], gs + row sums of dS * raw scores) for one tile: rows r0 ... of the
        output (a) against streamed b rows c0 ...; gs (GSCALE) is a (BA,) float32 accumulator (a (BA, BB)
        one spilled at D = 256).

        TRANS False: a = queries, b = keys (or queue), the tile is S[rows, cols]. TRANS True: a =
        keys, b = queries, the tile is S^T (row i of S is column i here), so the row statistics are
        indexed by cols and the column statistics by rows. POS: query i's positive, key
        ``(i + pos_shift) % pos_wrap + pos_base``, gets ``g_pos[i]`` added to its dS (in float32, before
        dS is rounded for the product: the positive's term nearly cancels the softmax's there)."""
        rows = r0 + tl.arange(0, BA)
        cols = c0 + tl.arange(0, BB)
        # The products run in the forward's orientation (queries as the left operand), then S^T is a
        # transpose: every score is then rounded exactly as the one its log-sum-exp was taken from.
        if RESIDENT:
            b_t = _load(b_ptr, cols, n_b, dp, D)
            if TRANS:
                raw = tl.trans(_mm(b_t, tl.trans(a_t), tl.zeros((BB, BA), tl.float32), UPCAST))
            else:
                raw = _mm(a_t, tl.trans(b_t), tl.zeros((BA, BB), tl.float32), UPCAST)
        elif TRANS:
            raw = tl.trans(_chunked(b_ptr, a_ptr, cols, rows, n_b, n_a, D, BB, BA, BD, UPCAST))
        else:
            raw = _chunked(a_ptr, b_ptr, rows, cols, n_a, n_b, D, BA, BB, BD, UPCAST)
        if TRANS:  # S^T: query i = col, key j = row; S[i, j] is excluded when j == i + self_offset
            valid = (rows < n_a)[:, None] & (cols < n_b)[None, :]
            if EXCL:
                valid = valid & (rows[:, None] != cols[None, :] + self_offset)
            tile = tl.where(valid, raw * scale, float("-inf"))
            lse_r = tl.load(row_lse_ptr + cols, mask=cols < n_b, other=0.0)
            g_r = tl.load(g_row_ptr + cols, mask=cols < n_b, other=0.0)
            ds = tl.exp(tile - lse_r[None, :]) * g_r[None, :]
            if SYM:
                lse_c = tl.load(col_lse_ptr + rows, mask=rows < n_a, other=0.0)
                g_c = tl.load(g_col_ptr + rows, mask=rows < n_a, other=0.0)
                ds += tl.exp(tile - lse_c[:, None]) * g_c[:, None]
        else:
            tile = _mask(raw, rows, cols, n_a, n_b, scale, self_offset, EXCL)
            lse_r = tl.load(row_lse_ptr + rows, mask=rows < n_a, other=0.0)
            g_r = tl.load(g_row_ptr + rows, mask=rows < n_a, other=0.0)
            ds = tl.exp(tile - lse_r[:, None]) * g_r[:, None]
            if SYM:
                lse_c = tl.load(col_lse_ptr + cols, mask=cols < n_b, other=0.0)
                g_c = tl.load(g_col_ptr + cols, mask=cols < n_b, other=0.0)
                ds += tl.exp(tile - lse_c[None, :]) * g_c[None, :]
        ds = tl.where(tile == float("-inf"), 0.0, ds)
        if POS:
            ds = _add_positives(ds, rows, cols, r0, c0, n_a, n_b, g_pos_ptr, pos_shift, pos_wrap, pos_base,
                                TRANS, BA, BB)
        if GSCALE:  # d loss / d scale = sum dS * (q . k)
            gs += tl.sum(ds * raw, axis=1)
        if REUSE:  # resident with one slice covering D: the tile just loaded is the product's operand
            vals = b_t
        else:
            vals = _load(b_ptr, cols, n_b, d_out, D)
        return _mm(ds.to(vals.dtype), vals, acc, UPCAST), gs

    @triton.jit
    def _target(i, pos_shift, pos_wrap, pos_base):
        """Key index of query i's positive: (i + shift) % wrap + base, for i + shift < 2 * wrap."""
        t = i + pos_shift
        return tl.where(t >= pos_wrap, t - pos_wrap, t) + pos_base

    @triton.jit
    def _pos_hit(q0, q1, k0, k1, pos_shift, pos_wrap, pos_base):
        """Whether a query in [q0, q1] may have its positive in keys [k0, k1] (scalars; conservative
        where the targets wrap around)."""
        t0 = _target(q0, pos_shift, pos_wrap, pos_base)
        t1 = _target(q1, pos_shift, pos_wrap, pos_base)
        straight = (t1 >= t0) & (q1 - q0 < pos_wrap)
        lo = tl.where(straight, t0, pos_base)
        hi = tl.where(straight, t1, pos_base + pos_wrap - 1)
        return (q0 <= q1) & (hi >= k0) & (lo <= k1)

    @triton.jit
    def _add_positives(ds, rows, cols, r0, c0, n_a, n_b, g_pos_ptr, pos_shift, pos_wrap, pos_base,
                       TRANS: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr):
        """ds + g_pos[i] at each (query i, its positive key) of the tile (see ``_bwd_tile``); r0 / c0:
        the tile's first row / column. Tiles without a positive (all but ~1 / (tiles per row) of them)
        skip the elementwise work on a scalar test."""
        if TRANS:  # rows: keys, cols: queries
            hit = _pos_hit(c0, tl.minimum(c0 + BB, n_b) - 1, r0, r0 + BA - 1, pos_shift, pos_wrap, pos_base)
        else:
            hit = _pos_hit(r0, tl.minimum(r0 + BA, n_a) - 1, c0, c0 + BB - 1, pos_shift, pos_wrap, pos_base)
        if hit:
            if TRANS:
                target = _target(cols, pos_shift, pos_wrap, pos_base)
                g = tl.load(g_pos_ptr + cols, mask=cols < n_b, other=0.0)
                ds = ds + tl.where((rows[:, None] == target[None, :]) & (cols < n_b)[None, :], g[None, :], 0.0)
            else:
                target = _target(rows, pos_shift, pos_wrap, pos_base)
                g = tl.load(g_pos_ptr + rows, mask=rows < n_a, other=0.0)
                ds = ds + tl.where((cols[None, :] == target[:, None]) & (rows < n_a)[:, None], g[:, None], 0.0)
        return ds

    @triton.jit
    def _bwd_kernel(a_ptr, b_ptr, queue_ptr, scale_ptr, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, g_pos_ptr,
                    out_scale_ptr, out_ptr, g_scale_ptr, n_a, n_b, K, D, self_offset, pos_shift, pos_wrap, pos_base,
                    TRANS: tl.constexpr, SYM: tl.constexpr, EXCL: tl.constexpr, POS: tl.constexpr,
                    GSCALE: tl.constexpr, RESIDENT: tl.constexpr, REUSE: tl.constexpr, BA: tl.constexpr,
                    BB: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, DO: tl.constexpr, UPCAST: tl.constexpr):
        """out[split, rows, slice] = out_scale * (sum over this split's streamed blocks of dS @ values),
        stored in out's dtype (see the module docstring); the queue (K rows, TRANS False only) follows
        the keys, without the symmetric column term, the self exclusion or positives. GSCALE: one
        float32 partial of sum(dS * q.k) over the program's tiles into g_scale (the scale's gradient),
        from the first slice of D."""
        ab = tl.program_id(0)
        d_out = tl.program_id(1) * DO + tl.arange(0, DO)
        split = tl.program_id(2)
        n_bb, b0, b1 = _split_blocks(n_b, K, BB, 2)
        scale = tl.load(scale_ptr)
        rows = ab * BA + tl.arange(0, BA)
        dp = tl.arange(0, DP)
        if RESIDENT:
            a_t = _load(a_ptr, rows, n_a, dp, D)
        else:
            a_t = scale  # unused: the chunked tiles read a from memory
        acc = tl.zeros((BA, DO), tl.float32)
        if GSCALE:
            gs = tl.zeros((BA,), tl.float32)
        else:
            gs = scale  # unused
        for b in range(b0, tl.minimum(b1, n_bb)):
            acc, gs = _bwd_tile(a_ptr, a_t, b_ptr, ab * BA, b * BB, n_a, n_b, D, scale, self_offset, dp, d_out,
                                row_lse_ptr, g_row_ptr, col_lse_ptr, g_col_ptr, g_pos_ptr, pos_shift, pos_wrap,
                                pos_base, acc, gs, TRANS, SYM, EXCL, POS, GSCALE, RESIDENT, REUSE, BA, BB, BD, DP, DO,
                                UPCAST)
        for b in range(tl.maximum(b0, n_bb), b1):
            acc, gs = _bwd_tile(a_ptr, a_t, queue_ptr, ab * BA, (b - n_bb) * BB, n_a, K, D, scale, 0, dp, d_out,
                                row_lse_ptr, g_row_ptr, col_lse_ptr, g_col_ptr, g_pos_ptr, 0, 1, 0, acc, gs,
                                False, False, False, False, GSCALE, RESIDENT, REUSE, BA, BB, BD, DP, DO, UPCAST)
        if GSCALE:  # every slice of D recomputes the same scores: the first one reports them
            part = tl.where(tl.program_id(1) == 0, tl.sum(gs, axis=0), 0.0)
            tl.store(g_scale_ptr + (split * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + ab, part)
        inside = (rows < n_a)[:, None] & (d_out < D)[None, :]
        out = out_ptr + split.to(tl.int64) * n_a * D
        tl.store(out + rows.to(tl.int64)[:, None] * D + d_out[None, :],
                 (acc * tl.load(out_scale_ptr)).to(out_ptr.dtype.element_ty), mask=inside)


class Config(NamedTuple):
    """Tiles of one kernel launch. rows / cols: the output's rows and the streamed side per tile (BN / BM
    of the forward, BA / BB of the backward); bd: feature chunk of chunked score tiles; dp: D rounded up
    to a power of two; do: width of a backward accumulator slice (dp for the forward); resident: see the
    module docstring; target: programs wanted (the streamed side is split below it)."""
    rows: int
    cols: int
    bd: int
    dp: int
    do: int
    resident: bool
    warps: int
    stages: int
    target: int

    def launch(self, kind: str, *, symmetric: bool, excl: bool, upcast: bool, pos: bool = False,
               gscale: bool = False) -> dict:
        """The keyword arguments of ``kind``'s kernel launch ("fwd", "grad_q", "grad_k") with these
        tiles: constexprs, num_warps and num_stages (also what ``fastpt.bench.aot`` compiles). pos /
        gscale (backward only): positives' gradients added in the kernel / the scale's gradient taken."""
        kw = dict(SYM=symmetric, EXCL=excl, RESIDENT=self.resident, BD=self.bd, DP=self.dp, UPCAST=upcast,
                  num_warps=self.warps, num_stages=self.stages)
        if kind == "fwd":
            return dict(kw, BN=self.rows, BM=self.cols)
        return dict(kw, TRANS=kind == "grad_k", POS=pos, GSCALE=gscale, REUSE=self.resident and self.do == self.dp,
                    BA=self.rows, BB=self.cols, DO=self.do)


# Under the interpreter every program step costs milliseconds whatever its size: large-ish tiles, and
# thresholds low enough that the tests' feature sizes (17 ... 128) take both tile kinds and several slices.
INTERPRET_TILE, INTERPRET_BD, INTERPRET_RESIDENT_DP, INTERPRET_DO = 32, 64, 64, 64
SMEM_MARGIN = 8 * 1024  # bytes Triton may use beside the operand tiles (layout conversions, barriers)
R, C = True, False  # resident / chunked score tiles

# GPU candidates for fp16 / bf16, (rows, cols, warps, resident, accumulator slice or None for all of
# D), per D rounded up to a power of two (at least 128) and kernel. Picked offline from a sweep of
# tiles, warps, residency and slices compiled for sm_90a as Triton's launcher compiles them (16-byte
# aligned pointers, sizes divisible by 16): the three with the fewest SASS instructions per score
# element of the whole problem (main-loop instructions per exp2, times the slices of D that each
# recompute the scores) among those that spill at most 32 bytes a thread (``python -m fastpt.bench.aot
# --all-candidates``, Triton 3.8, table in benches/results/triton-sm90.md). At D = 512 one 512-wide
# slice wins over two 256-wide ones (each recomputes the scores). Which is fastest is
# measured on the GPU at the first call of each shape class (``_run``).
HALF_CANDIDATES = {
    128: {"fwd": [(128, 64, 4, R, None), (128, 64, 4, C, None), (128, 32, 4, R, None)],
          "grad_q": [(128, 32, 8, R, None), (64, 32, 4, R, None), (128, 64, 8, R, None)],
          "grad_k": [(64, 64, 4, R, None), (128, 32, 8, R, None), (64, 32, 4, R, None)]},
    256: {"fwd": [(128, 64, 4, C, None), (128, 32, 4, C, None), (128, 64, 8, R, None)],
          "grad_q": [(128, 64, 8, R, None), (128, 32, 8, R, None), (64, 32, 4, R, None)],
          "grad_k": [(64, 64, 4, R, None), (128, 32, 8, R, None), (128, 32, 8, C, None)]},
    512: {"fwd": [(64, 64, 4, C, None), (64, 64, 8, C, None), (32, 64, 4, C, None)],
          "grad_q": [(64, 64, 8, C, None), (64, 32, 8, R, None), (64, 32, 8, C, None)],
          "grad_k": [(64, 64, 8, C, None), (32, 64, 8, R, None), (32, 32, 8, R, None)]},
    1024: {"fwd": [(64, 64, 4, C, None), (64, 64, 8, C, None)],
           "grad_q": [(64, 64, 8, C, 512), (64, 32, 8, C, 512), (128, 32, 8, C, 256)],
           "grad_k": [(64, 64, 8, C, 512), (64, 32, 8, C, 512), (128, 32, 8, C, 256)]},
}
# fp32 ("ieee" products on the FMA units, no tensor cores): feature chunks of 32, no spills at D = 512.
FP32_CANDIDATES = {"fwd": [(32, 64, 4, C, None), (64, 32, 8, C, None), (32, 64, 8, C, None)],
                   "grad_q": [(64, 32, 8, C, 256), (32, 64, 8, C, 256), (32, 32, 8, C, 256)],
                   "grad_k": [(64, 32, 8, C, 256), (32, 64, 8, C, 256), (32, 32, 8, C, 256)]}
KINDS = ("fwd", "grad_q", "grad_k")


def _smem_limit(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (bytes; 99 KiB when the driver cannot say)."""
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - any failure: the smallest limit of the GPUs Triton serves
        return 99 * 1024


def _smem_need(cfg: "Config", elsize: int) -> int:
    """Operand tiles in shared memory: the rows' tile (resident) plus ``stages`` streamed tiles."""
    if cfg.resident:
        return (cfg.rows + cfg.stages * cfg.cols) * cfg.dp * elsize
    return cfg.stages * (cfg.rows + cfg.cols) * cfg.bd * elsize


def candidates(dtype: torch.dtype, d: int, kind: str, *, sms: int | None, smem: int = 0) -> list[Config]:
    """Launch configs to try, best guess first, for ``kind`` ("fwd", "grad_q", "grad_k") on ``dtype``
    inputs with D = d, on a GPU with ``sms`` multiprocessors and ``smem`` bytes of shared memory a
    program (``sms`` None: the interpreter, one config). Configs whose tiles do not fit ``smem`` are
    left out (all of them: a small chunked one)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    dp = _dispatch.dot_width(d)
    if sms is None:
        resident = dp <= INTERPRET_RESIDENT_DP
        do = dp if kind == "fwd" else min(dp, INTERPRET_DO)
        return [Config(INTERPRET_TILE, INTERPRET_TILE, INTERPRET_BD, dp, do, resident, 4, 1, 4)]
    half = dtype != torch.float32
    table = HALF_CANDIDATES[min(max(dp, 128), 1024)][kind] if half else FP32_CANDIDATES[kind]
    bd, stages = (64, 2) if half else (32, 3)  # stages as swept
    elsize = torch.empty(0, dtype=dtype).element_size()
    out = []
    for rows, cols, warps, resident, do in table:
        do = dp if do is None or kind == "fwd" else min(do, dp)
        cfg = Config(rows, cols, bd, dp, do, resident and dp <= 512, warps, stages, 2 * sms)
        if _smem_need(cfg, elsize) + SMEM_MARGIN <= smem:
            out.append(cfg)
    return out or [Config(32, 32, 32, dp, dp if kind == "fwd" else min(dp, 128), False, 4, 2, 2 * sms)]


def config(dtype: torch.dtype, d: int, kind: str, *, sms: int | None, smem: int = 0) -> Config:
    """The first of ``candidates``: what runs when tuning is off or cannot run."""
    return candidates(dtype, d, kind, sms=sms, smem=smem)[0]


_TUNED: dict = {}  # (device, dtype, dp, kind, symmetric, queue, size bucket) -> the Config that ran best


def _tuning_allowed(q: torch.Tensor) -> bool:
    """Time the candidates on this call? Not on the CPU, not while a CUDA graph is being captured (no
    synchronisation allowed), not with FASTPT_TRITON_AUTOTUNE=0 (as the attention kernels)."""
    return q.is_cuda and _dispatch.triton_autotune() and not torch.cuda.is_current_stream_capturing()


TUNE_ROWS = 16384  # output rows of a timing run: tuning at N = 1M costs what it costs at 16k


def _time(run, cfg: Config, reps: int = 3) -> float:
    """Milliseconds of ``run(cfg, TUNE_ROWS)``: at most TUNE_ROWS output rows against the whole streamed
    side (each program's work as in the real call, fewer programs); its outputs are discarded."""
    run(cfg, TUNE_ROWS)  # compiles, and warms the caches
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run(cfg, TUNE_ROWS)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _device_candidates(q: torch.Tensor, d: int, kind: str) -> list[Config]:
    if q.device.type != "cuda":
        return [config(q.dtype, d, kind, sms=None)]
    return candidates(q.dtype, d, kind, sms=_dispatch.sm_count(q.device), smem=_smem_limit(q.device))


def _run(run, q: torch.Tensor, d: int, kind: str, key: tuple = ()):
    """``run(config)`` with the config that measured fastest for this shape class (``key``: what
    else the kernel's speed depends on), timing every candidate at the first such call. A candidate
    Triton cannot fit on the device (OutOfResources at compile time: its own shared memory needs
    beyond the estimate) is skipped. Results do not depend on the config beyond float32 rounding of
    the order of sums (every launch overwrites its outputs)."""
    full_key = (str(q.device), q.dtype, _dispatch.dot_width(d), kind) + tuple(key)
    cfg = _TUNED.get(full_key)
    if cfg is not None:
        return run(cfg)
    cands = _device_candidates(q, d, kind)
    if len(cands) > 1 and _tuning_allowed(q):
        times = {}
        for c in cands:
            try:
                times[c] = _time(run, c)
            except triton.runtime.errors.OutOfResources:
                continue
        if times:
            _TUNED[full_key] = min(times, key=times.get)
            return run(_TUNED[full_key])
    for i, c in enumerate(cands):
        try:
            out = run(c)
        except triton.runtime.errors.OutOfResources:
            if i == len(cands) - 1:
                raise
            continue
        if i > 0:  # candidates were skipped: remember the one that fits (an untimed first one is not
            _TUNED[full_key] = c  # kept: under CUDA-graph capture, a later eager call still times them)
        return out


def tuning_choices() -> list[dict]:
    """What the first-call timing picked so far in this process: one dict per shape class."""
    return [dict(op="contrastive", kernel=key[3], device=key[0], dtype=str(key[1]).replace("torch.", ""), dp=key[2],
                 key=[str(k) for k in key[4:]], config=cfg._asdict()) for key, cfg in _TUNED.items()]


def _bucket(n: int) -> int:
    """Size class of a tuning key: the power of two >= n, from 1024 to 2**20."""
    return min(max(triton.next_power_of_2(max(n, 1)), 1024), 1 << 20)


def _split(blocks: int, other_programs: int, target: int) -> int:
    """Splits of the loop dimension so that other_programs * splits ~ target programs."""
    if other_programs >= target:
        return 1
    return max(1, min(blocks, -(-target // max(other_programs, 1))))


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
    f32 = dict(device=q.device, dtype=torch.float32)

    def run(cfg: Config, limit: int | None = None):  # limit: rows of a timing run (``_time``)
        n_run = n if limit is None else min(n, limit)
        n_rb, n_cb = triton.cdiv(n_run, cfg.rows), triton.cdiv(m, cfg.cols) + triton.cdiv(kq, cfg.cols)
        if symmetric:  # balance the two kinds of partial statistics: P_r * P_c ~ target
            p_r = max(1, min(n_rb, int(cfg.target ** 0.5)))
            p_c = max(1, min(n_cb, cfg.target // p_r))
        else:
            p_r = n_rb
            p_c = _split(n_cb, p_r, cfg.target)
        row_m, row_s = torch.empty(p_c, n_run, **f32), torch.empty(p_c, n_run, **f32)
        col_m = torch.empty(p_r if symmetric else 1, m if symmetric else 1, **f32)
        col_s = torch.empty_like(col_m)
        _fwd_kernel[(p_r, p_c)](
            q, k, queue if queue is not None else k, scale, row_m, row_s, col_m, col_s, n_run, m, kq, d,
            max(self_offset, 0),
            **cfg.launch("fwd", symmetric=symmetric, excl=self_offset >= 0, upcast=_dispatch.interpreter_upcast(q)),
        )
        return row_m, row_s, col_m, col_s

    row_m, row_s, col_m, col_s = _run(run, q, d, "fwd", (symmetric, kq > 0, _bucket(n), _bucket(m + kq)))
    row = merge_lse(row_m, row_s)
    col = merge_lse(col_m, col_s) if symmetric else torch.empty(0, **f32)
    return row, col


class Positives(NamedTuple):
    """Query i's positive is key ``(i + shift) % wrap + base`` (InfoNCE / CLIP: shift 0, wrap N, base the
    rank's offset in the gathered keys; NT-Xent: shift N, wrap 2N), for i < rows."""
    shift: int
    wrap: int
    base: int

    def targets(self, rows: int, device) -> torch.Tensor:
        return (torch.arange(rows, device=device) + self.shift) % self.wrap + self.base


def _gradient(a, b, queue, scale, row_lse, col_lse, g_row, g_col, g_pos, out_scale, *, trans, symmetric,
              self_offset, pos: Positives | None, need_scale: bool):
    """(G, g_scale part or None): G = out_scale * G_q (trans False: a = q, b = k, queue) or G_k (trans
    True: a = k, b = q) in a's dtype, with the positives' g_pos added to dS; g_scale part = sum(a * G_q)
    before out_scale (need_scale, trans False)."""
    n_a, d = a.shape
    n_b = b.shape[0]
    kq = queue.shape[0] if queue is not None else 0
    kind = "grad_k" if trans else "grad_q"
    gscale = need_scale and not trans
    f32 = dict(device=a.device, dtype=torch.float32)
    shift, wrap, base = pos if pos is not None else (0, 1, 0)

    def run(cfg: Config, limit: int | None = None):  # limit: rows of a timing run (``_time``)
        n_run = n_a if limit is None else min(n_a, limit)
        n_ab, slices = triton.cdiv(n_run, cfg.rows), triton.cdiv(d, cfg.do)
        splits = _split(triton.cdiv(n_b, cfg.cols) + triton.cdiv(kq, cfg.cols), n_ab * slices, cfg.target)
        # One split writes the gradient in its final dtype; several write float32 partials, summed here.
        out = (torch.empty(n_run, d, device=a.device, dtype=a.dtype) if splits == 1
               else torch.empty(splits, n_run, d, **f32))
        part = torch.empty(splits * slices * n_ab if gscale else 1, **f32)
        _bwd_kernel[(n_ab, slices, splits)](
            a, b, queue if queue is not None else b, scale, row_lse, col_lse, g_row, g_col, g_pos, out_scale, out,
            part, n_run, n_b, kq, d, max(self_offset, 0), shift, wrap, base,
            **cfg.launch(kind, symmetric=symmetric, excl=self_offset >= 0, upcast=_dispatch.interpreter_upcast(a),
                         pos=pos is not None, gscale=gscale),
        )
        return (out if splits == 1 else out.sum(0).to(a.dtype)), (part.sum() if gscale else None)

    return _run(run, a, d, kind, (symmetric, kq > 0, _bucket(n_a), _bucket(n_b + kq)))


def backward(q, k, queue, scale, row_lse, col_lse, g_row, g_col, symmetric, self_offset, *, g_pos=None,
             pos: Positives | None = None, need_scale: bool = False):
    """(grad_q (N, D) in q's dtype, grad_k (M, D) in k's dtype, d loss / d scale or None): the
    gradients of ``sum(g_row * row_lse) + sum(g_col * col_lse) + sum(g_pos * S[i, positive of i])``
    (see contrastive.py), multiplied by scale, in the kernels (no float32 (N, D) buffer when the
    streamed side is not split). The scale's gradient is taken only with ``need_scale``."""
    if (g_pos is None) != (pos is None):
        raise ValueError("g_pos and pos: give both or neither")
    if pos is not None and not (0 <= pos.shift and q.shape[0] + pos.shift <= 2 * pos.wrap
                                and pos.base + pos.wrap <= k.shape[0]):
        raise ValueError(f"pos: expected shift >= 0, N + shift <= 2 * wrap and base + wrap <= M, got {pos} "
                         f"with N={q.shape[0]}, M={k.shape[0]}")
    # Incoming gradients scaled to max |g| = 1 so that dS stays representable in fp16.
    gmax = grad_unit(g_row, g_col if symmetric else None, g_pos).to(q.device)
    g_row = (g_row / gmax).contiguous()
    g_col = (g_col / gmax).contiguous() if symmetric else g_row
    g_pos = (g_pos / gmax).contiguous() if pos is not None else g_row
    col_lse = col_lse if symmetric else row_lse
    out_scale = (scale * gmax).reshape(1).contiguous()
    kw = dict(symmetric=symmetric, self_offset=self_offset, pos=pos)
    gq, part = _gradient(q, k, queue, scale, row_lse, col_lse, g_row, g_col, g_pos, out_scale, trans=False,
                         need_scale=need_scale, **kw)
    gk, _ = _gradient(k, q, None, scale, row_lse, col_lse, g_row, g_col, g_pos, out_scale, trans=True,
                      need_scale=False, **kw)
    return gq, gk, (part * gmax if need_scale else None)
