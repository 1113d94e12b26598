"""Triton kernels of fused attention (the contract and the reference are in ``attention.py``).

Every kernel receives the normalised form that ``attention.py`` builds: ``q4`` (Bq, Sq, H, D) and ``k4``,
``v4`` (Bk, Sk, Hk, D) with any strides but a unit last stride, and ``docs`` (N, 4) int32 rows
``[batch, start, length L, prefix P]``. One mask rule serves every mask kind: local query ``i``
attends local key ``j`` iff ``j < L`` and ``j <= max(i, P - 1)``.

Kernels (FlashAttention-2):

* ``_fwd_kernel``: grid (query blocks of the longest doc, docs, heads). Online softmax in fp32
  (base-2 exponentials, ``scale * log2(e)`` applied after the row max, one FMA per score, for a
  positive scale), ``lse`` in natural log.
* ``_bwd_delta_kernel``: ``delta_i = sum_d dout_i * out_i`` (fp32), same grid.
* ``_bwd_dkdv_kernel``: grid (key blocks, docs, kv heads x split). A program owns one key block and
  loops over the query heads of (its share of) the GQA group and, for each, over the query blocks
  that can see the block. With ``split > 1`` every share writes its own fp32 slice and torch sums
  the slices in a fixed order; no atomics either way.
* ``_bwd_dq_kernel``: grid (query blocks, docs, heads), looping over the visible key blocks.

So the backward never uses atomics and is deterministic whatever ``deterministic`` says.

Block skipping: a query block [i0, i1) visits keys below ``min(L, max(i1 - 1, P - 1) + 1)``; keys
below ``min(L, max(i0, P - 1) + 1)`` are visible to every row of the block and go through a loop
without the elementwise mask; only the blocks that straddle the causal diagonal or the doc end are
masked. The dk/dv kernel mirrors this: a key block starting at ``j0 >= P`` is seen only by
queries ``i >= j0``.

Precision: fp16 / bf16 tiles go to the tensor cores with fp32 accumulation, P and dS are rounded
to the input dtype for the second GEMM of each pair (as FlashAttention does). fp32 inputs use
``input_precision="ieee"``: TF32 keeps 10 mantissa bits, an error of ~1e-3 relative, about 10^4
times the error of an fp32 reference, which the FlashAttention 2x rule cannot absorb.

Triton 3.8's interpreter (the CPU test path) multiplies bfloat16 blocks as raw integers and
truncates fp32 -> bf16 conversions, so under it bf16 operands are upcast to fp32 (exact: they were
bf16 already), P / dS stay fp32 and results go through fp32 buffers that torch rounds. Its bf16
numbers are therefore better than the GPU's, which the tests' tolerances do not rely on.

Block sizes on the GPU come from ``triton.autotune`` over a few configs per head-dim class,
chosen by reasoning for H100 / H200 (no GPU was at hand when they were written; see ``_configs``).
The kernels' ``LEN_BUCKET`` argument is unused in their bodies: it is the autotuner's key for the
length of the longest doc (a power of two), so short and long batches may pick different tiles.
``FASTPT_TRITON_AUTOTUNE=0`` in the environment skips the tuning and launches each kernel with the
first (reasoned) config: seconds instead of minutes of compilation at start-up (the GPU tests use it).
"""
from __future__ import annotations


import torch

from .. import _dispatch, _native
from . import _rng

try:  # Triton is optional: a GPU backend, or the CPU interpreter in tests.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

if triton is not None:
    from ._rng import colmix_tl as _colmix, mix32_tl as _mix32, signed32 as _signed32  # the one Triton copy

MAX_HEAD_DIM = 256
MAX_GRID_DOCS = 65535  # CUDA's limit on grid dims 1 and 2; more docs are launched in chunks
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Under the interpreter each program and each loop step costs milliseconds, whatever the block
# size: one fixed config, small enough that the tests' 17..64-token docs span several blocks and
# exercise the masked / unmasked loop split. Tests may override these to vary the tiling.
INTERPRET_BLOCKS = {
    "fwd": dict(BLOCK_M=16, BLOCK_N=16),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=16),
    "dq": dict(BLOCK_M=16, BLOCK_N=16),
}
INTERPRET_GQA_SPLIT = 1  # how many programs share one GQA group's heads in the dk/dv kernel
DELTA_BLOCK = 64  # query rows per program of the backward's rowsum(dO * O) kernel on a GPU


if triton is not None:

    @triton.jit
    def _doc_row(DOCS, n):
        """Row ``n`` of the (N, 4) int32 docs table: batch index (int64), start, length, prefix."""
        doc = DOCS + n.to(tl.int64) * 4
        return tl.load(doc).to(tl.int64), tl.load(doc + 1), tl.load(doc + 2), tl.load(doc + 3)

    @triton.jit
    def _load_rows(base, rows, stride, offs_d, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   CHECK_ROWS: tl.constexpr, UPCAST: tl.constexpr):
        """A (len(rows), BLOCK_D) tile of base[rows * stride + d]; rows outside / d >= HEAD_DIM read 0."""
        ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
        if CHECK_ROWS:
            if BLOCK_D == HEAD_DIM:
                x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
            else:
                x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _store_rows(base, rows, stride, offs_d, row_ok, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])

    @triton.jit
    def _lowp(x, like, UPCAST: tl.constexpr):
        """x rounded to the dtype of ``like`` for a tensor-core GEMM (kept fp32 under UPCAST)."""
        if UPCAST:
            return x
        return x.to(like.dtype)

    @triton.jit
    def _row_bits(key, n, H, h, rows):
        """mix32(rk ^ colmix(i)) with rk = mix32(key ^ (n * H + h)): the per-query half of the dropout hash."""
        rk = _mix32(key.to(tl.uint32, bitcast=True) ^ (n * H + h).to(tl.uint32))
        return _mix32(rk ^ _colmix(rows.to(tl.uint32)))

    @triton.jit
    def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_k, stride_v, rows, offs_n, offs_d, lo, hi, L, P,
                   qk_scale, row_bits, threshold,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   FOLD_SCALE: tl.constexpr):
        """Online-softmax steps over key blocks [lo, hi); MASKED applies the mask rule elementwise.

        FOLD_SCALE (qk_scale > 0, which commutes with the row max): the max is taken over the raw
        products and each score costs one FMA, ``qk * qk_scale - m``, instead of a multiply and a
        subtract (the Triton tutorial's form; the softmax's elementwise work, not the GEMMs, limits
        FlashAttention's forward on Hopper)."""
        for j0 in range(lo, hi, BLOCK_N):
            cols = j0 + offs_n
            col_ok = cols < L
            k = _load_rows(k_base, cols, stride_k, offs_d, col_ok, HEAD_DIM, BLOCK_D, MASKED, UPCAST)
            v = _load_rows(v_base, cols, stride_v, offs_d, col_ok, HEAD_DIM, BLOCK_D, MASKED, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            if not FOLD_SCALE:
                s = s * qk_scale
            if MASKED:
                # Rows past L are not stored; they keep every key below L so that no row is all -inf.
                ok = col_ok[None, :]
                if CAUSAL:
                    ok = ok & (cols[None, :] <= tl.maximum(rows, P - 1)[:, None])
                s = tl.where(ok, s, float("-inf"))  # -inf * qk_scale stays -inf when folded (scale > 0)
            # m_new is finite: key 0 is in the first block visited
            if FOLD_SCALE:
                m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
                p = tl.math.exp2(s * qk_scale - m_new[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if DROPOUT:
                r = _mix32(row_bits[:, None] ^ _colmix(cols.to(tl.uint32))[None, :])
                p = tl.where((r >> 8) >= threshold, p, 0.0)
            acc = tl.dot(_lowp(p, v, UPCAST), v, acc, input_precision=PREC)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["key", "threshold"])
    def _fwd_kernel(Q, K, V, O, LSE, DOCS,
                    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h,
                    H, G, Sq, doc_base, qk_scale, key, threshold, rescale, LEN_BUCKET,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    FOLD_SCALE: tl.constexpr):
        # Last query blocks first: under a causal mask they are the longest, so the tail of the
        # launch is made of short programs.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        n = tl.program_id(1) + doc_base
        h = tl.program_id(2)
        b, s0, L, P = _doc_row(DOCS, n)
        i0 = pid_m * BLOCK_M
        if i0 >= L:
            return
        hk = (h // G).to(tl.int64)
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + b * sq_b + h.to(tl.int64) * sq_h + s0.to(tl.int64) * sq_s, rows, sq_s, offs_d, row_ok,
                       HEAD_DIM, BLOCK_D, True, UPCAST)
        k_base = K + b * sk_b + hk * sk_h + s0.to(tl.int64) * sk_s
        v_base = V + b * sv_b + hk * sv_h + s0.to(tl.int64) * sv_s
        row_bits = rows.to(tl.uint32)
        if DROPOUT:
            row_bits = _row_bits(key, n, H, h, rows)
        threshold = threshold.to(tl.uint32)

        i_last = tl.minimum(i0 + BLOCK_M, L) - 1
        if CAUSAL:
            full = tl.minimum(L, tl.maximum(i0, P - 1) + 1)  # keys every row of the block sees
            hi = tl.minimum(L, tl.maximum(i_last, P - 1) + 1)
        else:
            full = L
            hi = L
        full = (full // BLOCK_N) * BLOCK_N

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, rows, offs_n, offs_d, 0, full, L, P,
                                   qk_scale, row_bits, threshold, False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N,
                                   UPCAST, PREC, FOLD_SCALE)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, rows, offs_n, offs_d, full, hi, L,
                                   P, qk_scale, row_bits, threshold, True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N,
                                   UPCAST, PREC, FOLD_SCALE)
        out = acc * (rescale / l_i)[:, None]
        _store_rows(O + b * so_b + h.to(tl.int64) * so_h + s0.to(tl.int64) * so_s, rows, so_s, offs_d, row_ok, out,
                    HEAD_DIM, BLOCK_D)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + (b * H + h) * Sq + s0 + rows, lse, mask=row_ok)

    @triton.jit
    def _bwd_delta_kernel(O, DO, DELTA, DOCS, so_b, so_s, so_h, sd_b, sd_s, sd_h, H, Sq, doc_base,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        pid_m = tl.program_id(0)
        n = tl.program_id(1) + doc_base
        h = tl.program_id(2)
        b, s0, L, _ = _doc_row(DOCS, n)
        i0 = pid_m * BLOCK_M
        if i0 >= L:
            return
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        offs_d = tl.arange(0, BLOCK_D)
        o = _load_rows(O + b * so_b + h.to(tl.int64) * so_h + s0.to(tl.int64) * so_s, rows, so_s, offs_d, row_ok,
                       HEAD_DIM, BLOCK_D, True, True)
        do = _load_rows(DO + b * sd_b + h.to(tl.int64) * sd_h + s0.to(tl.int64) * sd_s, rows, sd_s, offs_d, row_ok,
                        HEAD_DIM, BLOCK_D, True, True)
        tl.store(DELTA + (b * H + h) * Sq + s0 + rows, tl.sum(o * do, axis=1), mask=row_ok)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_q, stride_do, lse_base, delta_base, cols, offs_m, offs_d,
                    lo, hi, L, P, qk_scale, rescale, key, n, H, h, threshold,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """dk, dv (BLOCK_N, BLOCK_D) fp32 += this key block's terms from query blocks [lo, hi).

        Works on transposed (BLOCK_N, BLOCK_M) tiles so that both products are plain GEMMs."""
        for i0 in range(lo, hi, BLOCK_M):
            rows = i0 + offs_m
            row_ok = rows < L
            q = _load_rows(q_base, rows, stride_q, offs_d, row_ok, HEAD_DIM, BLOCK_D, MASKED, UPCAST)
            do = _load_rows(do_base, rows, stride_do, offs_d, row_ok, HEAD_DIM, BLOCK_D, MASKED, UPCAST)
            if MASKED:
                lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
                delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            else:
                lse = tl.load(lse_base + rows)
                delta = tl.load(delta_base + rows)
            s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            p_t = tl.math.exp2(s_t - (lse * 1.4426950408889634)[None, :])
            if MASKED:
                ok = (cols < L)[:, None] & row_ok[None, :]
                if CAUSAL:
                    ok = ok & (cols[:, None] <= tl.maximum(rows, P - 1)[None, :])
                p_t = tl.where(ok, p_t, 0.0)  # also drops the inf of rows whose lse never saw key j
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            if DROPOUT:
                r = _mix32(_row_bits(key, n, H, h, rows)[None, :] ^ _colmix(cols.to(tl.uint32))[:, None])
                keep = (r >> 8) >= threshold
                pd_t = tl.where(keep, p_t * rescale, 0.0)
                dp_t = tl.where(keep, dp_t * rescale, 0.0)
            else:
                pd_t = p_t
            dv = tl.dot(_lowp(pd_t, do, UPCAST), do, dv, input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(_lowp(ds_t, q, UPCAST), q, dk, input_precision=PREC)
        return dk, dv

    @triton.jit(do_not_specialize=["key", "threshold"])
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOCS,
                         sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sd_b, sd_s, sd_h,
                         sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h,
                         H, G, SPLIT, Sq, doc_base, qk_scale, scale, key, threshold, rescale, LEN_BUCKET,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        pid_n = tl.num_programs(0) - 1 - tl.program_id(0)
        n = tl.program_id(1) + doc_base
        slot = tl.program_id(2)  # kv head hk = slot // SPLIT, share slot % SPLIT of its group
        b, s0, L, P = _doc_row(DOCS, n)
        j0 = pid_n * BLOCK_N
        if j0 >= L:
            return
        hk = slot // SPLIT
        heads = G // SPLIT
        h_first = hk * G + (slot % SPLIT) * heads
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < L
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_rows(K + b * sk_b + hk.to(tl.int64) * sk_h + s0.to(tl.int64) * sk_s, cols, sk_s, offs_d, col_ok,
                       HEAD_DIM, BLOCK_D, True, UPCAST)
        v = _load_rows(V + b * sv_b + hk.to(tl.int64) * sv_h + s0.to(tl.int64) * sv_s, cols, sv_s, offs_d, col_ok,
                       HEAD_DIM, BLOCK_D, True, UPCAST)
        threshold = threshold.to(tl.uint32)

        # Query blocks [lo, L) can see this key block; [lo, diag) straddle the diagonal (masked),
        # [diag, full) see all of it, [max(diag, full), L) is the doc's ragged last block. Keys
        # past L need no mask: they were loaded as 0 and only feed their own rows of dk / dv,
        # which are never stored.
        j1 = j0 + BLOCK_N
        l_ceil = tl.cdiv(L, BLOCK_M) * BLOCK_M
        full = (L // BLOCK_M) * BLOCK_M
        if CAUSAL:
            lo = tl.where(j0 < P, 0, (j0 // BLOCK_M) * BLOCK_M)
            diag = tl.where(j1 <= P, lo, tl.maximum(lo, tl.cdiv(j1 - 1, BLOCK_M) * BLOCK_M))
        else:
            lo = 0
            diag = 0

        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for hh in range(heads):
            h = h_first + hh
            row_base = (b * H + h) * Sq + s0
            q_base = Q + b * sq_b + h.to(tl.int64) * sq_h + s0.to(tl.int64) * sq_s
            do_base = DO + b * sd_b + h.to(tl.int64) * sd_h + s0.to(tl.int64) * sd_s
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, sq_s, sd_s, LSE + row_base, DELTA + row_base, cols,
                                 offs_m, offs_d, lo, tl.minimum(diag, l_ceil), L, P, qk_scale, rescale, key, n, H, h,
                                 threshold, True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PREC)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, sq_s, sd_s, LSE + row_base, DELTA + row_base, cols,
                                 offs_m, offs_d, diag, full, L, P, qk_scale, rescale, key, n, H, h,
                                 threshold, False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PREC)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, sq_s, sd_s, LSE + row_base, DELTA + row_base, cols,
                                 offs_m, offs_d, tl.maximum(diag, full), L, L, P, qk_scale, rescale, key, n, H, h,
                                 threshold, True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PREC)
        _store_rows(DK + b * sdk_b + slot.to(tl.int64) * sdk_h + s0.to(tl.int64) * sdk_s, cols, sdk_s, offs_d, col_ok,
                    dk * scale, HEAD_DIM, BLOCK_D)
        _store_rows(DV + b * sdv_b + slot.to(tl.int64) * sdv_h + s0.to(tl.int64) * sdv_s, cols, sdv_s, offs_d, col_ok,
                    dv, HEAD_DIM, BLOCK_D)

    @triton.jit
    def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_k, stride_v, rows, offs_n, offs_d, lo, hi, L, P,
                  qk_scale, row_bits, threshold, rescale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """dq (BLOCK_M, BLOCK_D) fp32 += dS @ K over key blocks [lo, hi) (not yet times scale)."""
        for j0 in range(lo, hi, BLOCK_N):
            cols = j0 + offs_n
            col_ok = cols < L
            k = _load_rows(k_base, cols, stride_k, offs_d, col_ok, HEAD_DIM, BLOCK_D, MASKED, UPCAST)
            v = _load_rows(v_base, cols, stride_v, offs_d, col_ok, HEAD_DIM, BLOCK_D, MASKED, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            if MASKED:
                ok = col_ok[None, :]
                if CAUSAL:
                    ok = ok & (cols[None, :] <= tl.maximum(rows, P - 1)[:, None])
                p = tl.where(ok, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if DROPOUT:
                r = _mix32(row_bits[:, None] ^ _colmix(cols.to(tl.uint32))[None, :])
                dp = tl.where((r >> 8) >= threshold, dp * rescale, 0.0)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(_lowp(ds, k, UPCAST), k, dq, input_precision=PREC)
        return dq

    @triton.jit(do_not_specialize=["key", "threshold"])
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOCS,
                       sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sd_b, sd_s, sd_h, sdq_b, sdq_s, sdq_h,
                       H, G, Sq, doc_base, qk_scale, scale, key, threshold, rescale, LEN_BUCKET,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        n = tl.program_id(1) + doc_base
        h = tl.program_id(2)
        b, s0, L, P = _doc_row(DOCS, n)
        i0 = pid_m * BLOCK_M
        if i0 >= L:
            return
        hk = (h // G).to(tl.int64)
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + b * sq_b + h.to(tl.int64) * sq_h + s0.to(tl.int64) * sq_s, rows, sq_s, offs_d, row_ok,
                       HEAD_DIM, BLOCK_D, True, UPCAST)
        do = _load_rows(DO + b * sd_b + h.to(tl.int64) * sd_h + s0.to(tl.int64) * sd_s, rows, sd_s, offs_d, row_ok,
                        HEAD_DIM, BLOCK_D, True, UPCAST)
        row_base = (b * H + h) * Sq + s0
        lse2 = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
        k_base = K + b * sk_b + hk * sk_h + s0.to(tl.int64) * sk_s
        v_base = V + b * sv_b + hk * sv_h + s0.to(tl.int64) * sv_s
        row_bits = rows.to(tl.uint32)
        if DROPOUT:
            row_bits = _row_bits(key, n, H, h, rows)
        threshold = threshold.to(tl.uint32)

        i_last = tl.minimum(i0 + BLOCK_M, L) - 1
        if CAUSAL:
            full = tl.minimum(L, tl.maximum(i0, P - 1) + 1)
            hi = tl.minimum(L, tl.maximum(i_last, P - 1) + 1)
        else:
            full = L
            hi = L
        full = (full // BLOCK_N) * BLOCK_N

        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sk_s, sv_s, rows, offs_n, offs_d, 0, full, L, P,
                       qk_scale, row_bits, threshold, rescale, False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N,
                       UPCAST, PREC)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sk_s, sv_s, rows, offs_n, offs_d, full, hi, L, P,
                       qk_scale, row_bits, threshold, rescale, True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N,
                       UPCAST, PREC)
        _store_rows(DQ + b * sdq_b + h.to(tl.int64) * sdq_h + s0.to(tl.int64) * sdq_s, rows, sdq_s, offs_d, row_ok,
                    dq * scale, HEAD_DIM, BLOCK_D)

    _KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}


# ----------------------------------------------------------------------------- configs


def _configs(kind: str, block_d: int, fp32: bool) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for an H100 / H200.

    fp16 / bf16 (tensor cores) at head dims 64 and 128: picked offline from a sweep of tiles x warps x
    stages compiled for sm_90a as Triton's launcher compiles them (16-byte aligned pointers, strides
    divisible by 16), with and without dropout: the candidates with the fewest SASS instructions per
    score element (main-loop instructions per exp2) among those that spill at most 88 bytes a
    thread (``python -m fastpt.bench.aot --all-candidates``, Triton 3.8, table in
    benches/results/triton-sm90.md); the autotuner measures them on the GPU. The dk/dv kernel holds
    two (BLOCK_N, D) fp32 accumulators, so its key tile is the large one and the streamed query tile
    the small one; the dq kernel the reverse. At head dim 256 (not swept) the shared memory (Q 64 KiB
    at 128 rows, K + V 64 KiB per stage at 64 keys) only fits 64-row Q tiles with 2 stages. fp32
    ("ieee", FMA units, no tensor cores): smaller tiles, as registers hold fp32 operands. For dkdv the
    pair is (inner query tile, key tile).
    """
    if fp32:
        if block_d <= 64:
            return [(64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2)]
        if block_d <= 128:
            return [(32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2)]
        return [(32, 32, 4, 1), (32, 32, 8, 2), (16, 32, 4, 2)]
    if kind == "fwd":
        if block_d <= 64:
            return [(128, 64, 4, 3), (64, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2)]
        if block_d <= 128:
            return [(128, 64, 8, 3), (64, 128, 8, 2), (128, 128, 8, 3), (64, 128, 8, 3)]
        return [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)]
    if kind == "dkdv":  # (query tile streamed, key tile owned)
        if block_d <= 64:
            return [(32, 128, 8, 2), (64, 64, 8, 2), (64, 128, 8, 2), (32, 64, 8, 2)]
        if block_d <= 128:
            return [(32, 128, 8, 2), (32, 64, 8, 2), (16, 128, 8, 2), (32, 64, 8, 3)]
        return [(32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2)]
    # dq: (query tile owned, key tile streamed)
    if block_d <= 64:
        return [(128, 128, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 128, 4, 3)]
    if block_d <= 128:
        return [(128, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 3), (64, 128, 8, 3)]
    return [(64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2)]


_TUNERS: dict = {}  # (kind, block_d, fp32) -> the autotuned launcher, built at first use


def _tuned(kind: str, block_d: int, fp32: bool):
    """The autotuned launcher of one kernel for one head-dim class (GPU only).

    Every kernel overwrites its outputs (no accumulation across launches), so the autotuner's
    repeated benchmark runs leave correct results. Tuning is keyed by head dim, mask structure,
    dropout and a power-of-two bucket of the longest doc; the autotuner adds the dtypes."""
    key = (kind, block_d, fp32)
    if key not in _TUNERS:
        candidates = _configs(kind, block_d, fp32)
        if not _dispatch.triton_autotune():
            candidates = candidates[:1]
        configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in candidates]
        _TUNERS[key] = triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL", "DROPOUT", "LEN_BUCKET"])(
            _KERNELS[kind])
    return _TUNERS[key]


def tuning_choices() -> list[dict]:
    """What the autotuner picked so far in this process: one dict per kernel, head-dim class and
    tuning key (head dim, causal, dropout, length bucket, then the dtypes Triton adds)."""
    out = []
    for (kind, block_d, fp32), tuner in _TUNERS.items():
        for key, cfg in dict(getattr(tuner, "cache", {})).items():
            kw = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            out.append(dict(op="attention", kernel=kind, block_d=block_d, fp32=fp32,
                            key=[str(k) for k in key], config=kw, candidates=len(tuner.configs)))
    return out


def _launcher(kind: str, block_d: int, fp32: bool):
    """(kernel, fixed kwargs): the plain kernel with INTERPRET_BLOCKS under the interpreter."""
    if _native.triton_interpreting():
        return _KERNELS[kind], dict(INTERPRET_BLOCKS[kind], num_warps=4)
    return _tuned(kind, block_d, fp32), {}


def _gqa_split(group: int, key_blocks: int, docs: int, kv_heads: int, device: torch.device) -> int:
    """Programs per GQA group in the dk/dv kernel: the smallest divisor of ``group`` that gives
    about two programs per SM. More programs fill the GPU on long single sequences with few kv
    heads (MQA), at the price of fp32 partial buffers and one torch sum."""
    if device.type != "cuda":
        split = INTERPRET_GQA_SPLIT
        if group % split:
            raise ValueError(f"INTERPRET_GQA_SPLIT={split} does not divide the GQA group size {group}")
        return split
    target = 2 * _dispatch.sm_count(device)
    base = key_blocks * docs * kv_heads
    for s in range(1, group + 1):
        if group % s == 0 and base * s >= target:
            return s
    return group


# ----------------------------------------------------------------------------- host side


def supports(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, dropout_p: float) -> str | None:
    """Why the Triton kernels refuse these inputs, or None when they accept them."""
    if triton is None:
        return "triton is not installed"
    why = _dispatch.triton_device_refusal(q4.device)
    if why is not None:
        return why
    why = _dispatch.kernel_dtype_refusal(q4.dtype)
    if why is not None:
        return why
    if k4.dtype != q4.dtype or v4.dtype != q4.dtype:
        return f"needs q, k, v of one dtype, got {q4.dtype}, {k4.dtype}, {v4.dtype}"
    if not (q4.shape[-1] == k4.shape[-1] == v4.shape[-1]):
        return f"needs one head dim for q, k, v, got {q4.shape[-1]}, {k4.shape[-1]}, {v4.shape[-1]}"
    if q4.shape[-1] > MAX_HEAD_DIM:
        return f"supports head dim <= {MAX_HEAD_DIM}, got {q4.shape[-1]}"
    for name, t in (("q", q4), ("k", k4), ("v", v4)):
        if t.dim() != 4:
            return f"needs 4-d {name} (B, S, heads, D), got shape {tuple(t.shape)}"
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return f"needs {name}.stride(-1) == 1, got strides {tuple(t.stride())}"
    if not 0.0 <= float(dropout_p) <= 1.0:
        return f"needs 0 <= dropout_p <= 1, got {dropout_p}"
    return None


def _dropout_args(dropout_p: float, dropout_key: int | None) -> tuple[bool, int, int, float]:
    """(DROPOUT, signed key, threshold24, rescale): kept probabilities are scaled by 1 / (1 - p)."""
    if dropout_p <= 0.0:
        return False, 0, 0, 1.0
    if dropout_key is None:
        raise ValueError("dropout_key: required when dropout_p > 0")
    rescale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0  # p = 1 drops everything: output 0
    return True, _signed32(int(dropout_key) & _rng.M32), _rng.threshold24(dropout_p), rescale


def _len_bucket(max_len: int) -> int:
    return min(max(triton.next_power_of_2(max(int(max_len), 1)), 128), 16384)


def _doc_chunks(n_docs: int):
    for base in range(0, n_docs, MAX_GRID_DOCS):
        yield base, min(MAX_GRID_DOCS, n_docs - base)


def _prec(t: torch.Tensor) -> str:
    """fp32 operands (also bf16 upcast under the interpreter) multiply in full fp32; the string
    is ignored for fp16 / bf16 operands, whose products are exact in the fp32 accumulator."""
    return "ieee" if t.dtype == torch.float32 or _dispatch.interpreter_upcast(t) else "tf32"


def forward(q4, k4, v4, docs, *, scale, dropout_p, dropout_key, max_len, causal_any):
    """Fused attention forward.

    Args:
        q4: (Bq, Sq, H, D) fp16 / bf16 / fp32, stride(-1) == 1. k4, v4: (Bk, Sk, Hk, D), same dtype,
            Bk == Bq, H % Hk == 0.
        docs: (N, 4) int32 on q4's device, rows [batch, start, length, prefix] (see the spec).
        scale: softmax scale. dropout_p: in [0, 1]; dropout_key: uint32 stream key (needed if p > 0).
        max_len: the longest doc length (sizes the grid). causal_any: False only when every doc
            has prefix == length (no causal part): the kernels then skip the causal comparison.

    Returns:
        (out, lse): out (Bq, Sq, H, D) in q4's dtype, contiguous, 0 outside every doc;
        lse (Bq, H, Sq) float32, natural log, before dropout (undefined outside docs).
    """
    bq, sq, h, d = q4.shape
    hk = k4.shape[2]
    upcast = _dispatch.interpreter_upcast(q4)
    out = torch.zeros(q4.shape, device=q4.device, dtype=torch.float32 if upcast else q4.dtype)
    lse = torch.empty((bq, h, sq), device=q4.device, dtype=torch.float32)
    n_docs = docs.shape[0]
    if n_docs == 0 or max_len <= 0 or h == 0 or d == 0:
        return out.to(q4.dtype), lse
    dropout, key, threshold, rescale = _dropout_args(dropout_p, dropout_key)
    block_d = _dispatch.dot_width(d)
    kernel, fixed = _launcher("fwd", block_d, q4.dtype == torch.float32)
    docs = docs.contiguous()
    for base, count in _doc_chunks(n_docs):
        grid = lambda meta: (triton.cdiv(max_len, meta["BLOCK_M"]), count, h)  # noqa: E731
        kernel[grid](
            q4, k4, v4, out, lse, docs,
            *q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3], *out.stride()[:3],
            h, h // hk, sq, base, float(scale) * LOG2E, key, threshold, rescale, _len_bucket(max_len),
            HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=bool(causal_any), DROPOUT=dropout, UPCAST=upcast,
            PREC=_prec(q4), FOLD_SCALE=float(scale) > 0, **fixed,
        )
    return out.to(q4.dtype), lse


def backward(dout, q4, k4, v4, out, lse, docs, *, scale, dropout_p, dropout_key, max_len, causal_any,
             deterministic):
    """Fused attention backward (FlashAttention-2), deterministic whatever ``deterministic`` says.

    Args:
        dout: (Bq, Sq, H, D) gradient of ``out`` (any strides; values outside docs are never read).
        q4, k4, v4, docs, scale, dropout_p, dropout_key, max_len, causal_any: as given to ``forward``.
        out, lse: what ``forward`` returned for them.
        deterministic: accepted for the common backend signature; this backend uses no atomics.

    Returns:
        (dq, dk, dv): contiguous, shaped like q4, k4, v4, in their dtype, 0 outside every doc.
    """
    del deterministic  # no atomics anywhere: always deterministic
    bq, sq, h, d = q4.shape
    bk, sk, hk, _ = k4.shape
    group = h // hk
    upcast = _dispatch.interpreter_upcast(q4)
    acc_dtype = torch.float32 if upcast else q4.dtype
    dq = torch.zeros(q4.shape, device=q4.device, dtype=acc_dtype)
    n_docs = docs.shape[0]
    if n_docs == 0 or max_len <= 0 or h == 0 or d == 0:
        return dq.to(q4.dtype), torch.zeros_like(k4), torch.zeros_like(v4)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dropout, key, threshold, rescale = _dropout_args(dropout_p, dropout_key)
    block_d = _dispatch.dot_width(d)
    fp32 = q4.dtype == torch.float32
    docs = docs.contiguous()
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=bool(causal_any), DROPOUT=dropout, UPCAST=upcast,
                  PREC=_prec(q4))

    delta = torch.empty((bq, h, sq), device=q4.device, dtype=torch.float32)
    delta_block = 16 if _native.triton_interpreting() else DELTA_BLOCK
    for base, count in _doc_chunks(n_docs):
        _bwd_delta_kernel[(triton.cdiv(max_len, delta_block), count, h)](
            out, dout, delta, docs, *out.stride()[:3], *dout.stride()[:3], h, sq, base,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=delta_block, num_warps=4,
        )

    split = _gqa_split(group, triton.cdiv(max_len, 64), n_docs, hk, q4.device)
    if split == 1:
        dk = torch.zeros(k4.shape, device=k4.device, dtype=acc_dtype)
        dv = torch.zeros(v4.shape, device=v4.device, dtype=acc_dtype)
    else:  # per-share fp32 partials, summed below in a fixed order
        dk = torch.zeros((bk, sk, hk * split, d), device=k4.device, dtype=torch.float32)
        dv = torch.zeros_like(dk)
    qk_scale = float(scale) * LOG2E
    kernel, fixed = _launcher("dkdv", block_d, fp32)
    for base, count in _doc_chunks(n_docs):
        grid = lambda meta: (triton.cdiv(max_len, meta["BLOCK_N"]), count, hk * split)  # noqa: E731
        kernel[grid](
            q4, k4, v4, dout, lse, delta, dk, dv, docs,
            *q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3], *dout.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3],
            h, group, split, sq, base, qk_scale, float(scale), key, threshold, rescale, _len_bucket(max_len),
            **common, **fixed,
        )
    kernel, fixed = _launcher("dq", block_d, fp32)
    for base, count in _doc_chunks(n_docs):
        grid = lambda meta: (triton.cdiv(max_len, meta["BLOCK_M"]), count, h)  # noqa: E731
        kernel[grid](
            q4, k4, v4, dout, lse, delta, dq, docs,
            *q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
            h, group, sq, base, qk_scale, float(scale), key, threshold, rescale, _len_bucket(max_len),
            **common, **fixed,
        )
    if split > 1:
        dk = dk.view(bk, sk, hk, split, d).sum(3)
        dv = dv.view(bk, sk, hk, split, d).sum(3)
    return dq.to(q4.dtype), dk.to(k4.dtype), dv.to(v4.dtype)
