"""The chunked-product (blas) contrastive backend against the reference, on the CPU.

Dispatch offers the blas backend on CUDA only (tests/ops/test_contrastive.py's grid covers it on a
GPU); its code is device-generic, so here it runs directly, with tiny chunks so that the row
chunking, the column log-sum-exp merge and the self-pair exclusion across chunk borders are all
exercised.
"""
from __future__ import annotations

import pytest
import torch

from fastpt.ops import contrastive_blas as blas
from fastpt.ops.contrastive import _ref_backward, _ref_forward


def _inputs(n, m, d, kq, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    queue = torch.randn(kq, d, generator=g) if kq else None
    g_row, g_col = torch.randn(n, generator=g), torch.randn(m, generator=g)
    cast = (lambda x: x.to(dtype) if x is not None else None)
    return cast(q), cast(k), cast(queue), g_row, g_col, torch.tensor(1 / 0.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("self_offset,kq", [(-1, 0), (0, 0), (3, 0), (-1, 29)])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_matches_reference(dtype, symmetric, self_offset, kq, chunk):
    if symmetric and kq:
        pytest.skip("the symmetric loss has no queue")
    n, m, d = 97, 83, 40
    q, k, queue, g_row, g_col, scale = _inputs(n, m, d, kq, dtype, seed=chunk + self_offset)
    chunk_bytes = 4 * (m + kq) * chunk  # `chunk` rows per chunk
    row, col = blas.forward(q, k, queue, scale, symmetric, self_offset, chunk_bytes=chunk_bytes)
    q64, k64 = q.double(), k.double()
    queue64 = queue.double() if queue is not None else None
    row_ref, col_ref = _ref_forward(q64, k64, queue64, scale.double(), symmetric, self_offset)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row.double(), row_ref, **tol)
    if symmetric:
        torch.testing.assert_close(col.double(), col_ref, **tol)

    gq, gk = blas.backward(q, k, queue, scale, row, col, g_row, g_col if symmetric else None, symmetric, self_offset,
                           chunk_bytes=chunk_bytes)
    gq_ref, gk_ref = _ref_backward(q64, k64, queue64, scale.double(), row_ref, col_ref, g_row.double(),
                                   g_col.double() if symmetric else None, symmetric, self_offset)
    for got, ref in ((gq, gq_ref), (gk, gk_ref)):
        err = (got.double() - ref).norm() / ref.norm()
        # bf16: dS is rounded to bf16 for the products (as the tiled kernels do), ~2^-9 relative
        assert err < (1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 8e-3), float(err)


def test_chunk_rows():
    assert blas.chunk_rows(100, 10, chunk_bytes=10**9) == 100
    assert blas.chunk_rows(10**6, 1000, chunk_bytes=4 * 1000 * 700) == 640  # multiples of 64
    assert blas.chunk_rows(10**6, 1000, chunk_bytes=4 * 1000 * 5) == 5
    assert blas.chunk_rows(10, 10**12, chunk_bytes=1) == 1  # never zero rows


def test_dispatch_offers_blas_on_cuda_only():
    import importlib

    op = importlib.import_module("fastpt.ops.contrastive").OP
    refusals = op.refusals(**op.probe("cpu"))
    assert refusals["blas"] is not None and ("cuda" in refusals["blas"] or "CUDA" in refusals["blas"])
