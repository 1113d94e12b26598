"""The chunked-product (blas) contrastive backend against the reference, on the CPU.

Dispatch offers the blas backend on CUDA only (tests/ops/test_contrastive.py's grid covers it on a
GPU); its code is device-generic, so here it runs directly, with tiny chunks so that the row
chunking, the column log-sum-exp merge and the self-pair exclusion across chunk borders are all
exercised. The fused Triton chunk kernels (contrastive_blas_triton.py, what CUDA tensors get) are
forced with ``fused=True``: on CPU tensors under TRITON_INTERPRET=1, and on CUDA tensors where a
GPU is present.
"""
from __future__ import annotations

import pytest
import torch

from fastpt import _native
from fastpt.ops import contrastive_blas as blas
from fastpt.ops import contrastive_blas_triton as kernels
from fastpt.ops.contrastive import _ref_backward, _ref_forward

FUSED_DEVICES = (["cpu"] if _native.triton_interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])


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
    # CUDA's floor: at N = 1M, 64 MiB of scores would be 16-row chunks
    assert blas.chunk_rows(2**20, 2**20) == 16
    assert blas.chunk_rows(2**20, 2**20, min_rows=blas.GPU_MIN_ROWS) == 512
    assert blas.chunk_rows(16384, 16384, min_rows=blas.GPU_MIN_ROWS) == 1024
    assert blas.chunk_rows(300, 2**20, min_rows=blas.GPU_MIN_ROWS) == 300


def test_dispatch_offers_blas_on_cuda_only():
    import importlib

    op = importlib.import_module("fastpt.ops.contrastive").OP
    refusals = op.refusals(**op.probe("cpu"))
    assert refusals["blas"] is not None and ("cuda" in refusals["blas"] or "CUDA" in refusals["blas"])


# ----------------------------------------------------------------------------- fused chunk kernels


def _fused_inputs(n, m, kq, d, nt_xent, dtype, device, seed):
    """float64 inputs rounded to dtype (so that the float64 reference sees exactly the kernel's inputs)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    k = q[:m] if nt_xent else torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    queue = torch.randn(kq, d, generator=g, dtype=torch.float64).to(dtype) if kq else None
    g_row, g_col = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    dev = (lambda x: x.to(device) if x is not None else None)
    return dev(q), dev(k), dev(queue), g_row, g_col


def _assert_rule(name, got, ref64, lowp):
    """FlashAttention rule: the kernel's error at most twice the torch path's in the same dtype, plus a
    few float32 ulps of the largest reference value."""
    got, ref64, lowp = got.cpu().double(), ref64.cpu(), lowp.cpu().double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).abs().max().item()
    err_lowp = (lowp - ref64).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert err <= 2 * err_lowp + floor, f"{name}: error {err:.3e} > 2 * {err_lowp:.3e} + {floor:.1e}"


# (n, m, queue rows, self_offset, nt_xent: keys are the first m queries, scale)
LAYOUTS = {
    "moco": (97, 61, 13, -1, False, 1 / 0.07),
    "offset3": (97, 61, 0, 3, False, 1 / 0.3),
    "offset3_queue": (97, 61, 13, 3, False, 1 / 0.3),  # self pairs only among the keys, never the queue
    "nt_xent": (62, 62, 0, 0, True, 2.0),
}


@pytest.mark.skipif(not FUSED_DEVICES, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, interpreted: log(0), exp overflow on tile padding
@pytest.mark.parametrize("device", FUSED_DEVICES)
@pytest.mark.parametrize("blocks", ["big", "small"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_kernels_match_torch_path(device, blocks, layout, symmetric, dtype, monkeypatch):
    n, m, kq, self_offset, nt_xent, scale = LAYOUTS[layout]
    if symmetric and kq:
        pytest.skip("the symmetric loss has no queue")
    if blocks == "small":  # several programs per chunk, several column steps, ragged last tiles
        if device != "cpu":
            pytest.skip("the block sizes of the interpreter")
        monkeypatch.setattr(kernels, "INTERPRET_ROWS", 8)
        monkeypatch.setattr(kernels, "INTERPRET_COLS", 16)
    d = 40
    q, k, queue, g_row, g_col = _fused_inputs(n, m, kq, d, nt_xent, dtype, device, seed=n + m + kq)
    scale = torch.tensor(scale, dtype=torch.float32, device=device)
    chunk_bytes = 4 * (m + kq) * 32  # 32 rows per chunk: chunks of 32, 32, 32, 1 rows at n = 97
    q64, k64 = q.double(), k.double()
    queue64 = queue.double() if queue is not None else None
    row64, col64 = _ref_forward(q64, k64, queue64, scale.double(), symmetric, self_offset)

    run = dict(chunk_bytes=chunk_bytes)
    row, col = blas.forward(q, k, queue, scale, symmetric, self_offset, fused=True, **run)
    row_t, col_t = blas.forward(q, k, queue, scale, symmetric, self_offset, fused=False, **run)
    assert row.dtype == torch.float32 and row.shape == (n,) and col.shape == ((m,) if symmetric else (0,))
    _assert_rule("row_lse", row, row64, row_t)
    if symmetric:
        _assert_rule("col_lse", col, col64, col_t)

    # the backward from the exact statistics, so that it is checked on its own
    g_col_in = g_col.float().to(device) if symmetric else None
    args = (q, k, queue, scale, row64.float(), col64.float(), g_row.float().to(device), g_col_in, symmetric,
            self_offset)
    gq, gk = blas.backward(*args, fused=True, **run)
    gq_t, gk_t = blas.backward(*args, fused=False, **run)
    gq64, gk64 = _ref_backward(q64, k64, queue64, scale.double(), row64, col64, g_row.to(device),
                               g_col.to(device) if symmetric else None, symmetric, self_offset)
    assert gq.dtype == gk.dtype == torch.float32 and gq.shape == q.shape and gk.shape == k.shape
    _assert_rule("G_q", gq, gq64, gq_t)
    _assert_rule("G_k", gk, gk64, gk_t)

    # one positive per query (NT-Xent's other view; key i % m otherwise), its gradient added to dS
    t = (torch.arange(n) + (n // 2 if nt_xent else 0)) % (n if nt_xent else m)
    g_pos = -2 * torch.rand(n, generator=torch.Generator().manual_seed(n))
    pos = dict(targets=t.to(device), g_pos=g_pos.float().to(device))
    gq, gk = blas.backward(*args, fused=True, **run, **pos)
    gq_t, gk_t = blas.backward(*args, fused=False, **run, **pos)
    gq64 = gq64 + g_pos.double().to(device)[:, None] * k64[t.to(device)]
    gk64 = gk64.index_add(0, t.to(device), g_pos.double().to(device)[:, None] * q64)
    _assert_rule("G_q with positives", gq, gq64, gq_t)
    _assert_rule("G_k with positives", gk, gk64, gk_t)


def test_fused_choice():
    q = torch.zeros(4, 8)
    assert blas._fused(q, None) is False  # CPU tensors keep the torch ops unless forced
    assert blas._fused(q, False) is False
    with pytest.raises(RuntimeError, match="float64"):
        blas._fused(q.double(), True)
    if torch.cuda.is_available():
        assert blas._fused(q.cuda(), None) is True
        assert blas._fused(q.cuda().double(), None) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_cuda_graph_reads_scale_on_device():
    """Forward + backward capture in a CUDA graph (no host sync) and follow a new scale value on replay."""
    q, k, _, g_row, g_col = _fused_inputs(300, 300, 0, 64, False, torch.bfloat16, "cuda", seed=5)
    g_row, g_col = g_row.float().cuda(), g_col.float().cuda()
    scale = torch.tensor(3.0, device="cuda")
    run = dict(chunk_bytes=4 * 300 * 128, fused=True)

    def step():
        row, col = blas.forward(q, k, None, scale, True, -1, **run)
        return (row, col) + blas.backward(q, k, None, scale, row, col, g_row, g_col, True, -1, **run)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    scale.fill_(7.0)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(out, step()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False] + ([True] if "cpu" in FUSED_DEVICES else []))
def test_positives_keep_bf16_gradients_accurate_when_views_agree(fused):
    """Once the two views agree (softmax of the positive ~ 0.9999) the positive's gradient cancels the
    softmax's to ~1e-4 of either: it is added to dS in float32, before dS is rounded to bf16. Adding it
    after the bf16 products (as before) gave a relative error above 1 here; now ~3e-2."""
    g = torch.Generator().manual_seed(0)
    n, d = 256, 64
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(q + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    q, k = q.bfloat16().double(), k.bfloat16().double()  # the inputs the kernel sees, exactly
    scale = torch.tensor(1 / 0.05, dtype=torch.float64)
    row, col = _ref_forward(q, k, None, scale, True, -1)
    g_row = torch.full((n,), 0.5 / n, dtype=torch.float64)
    gq64, gk64 = _ref_backward(q, k, None, scale, row, col, g_row, g_row, True, -1)
    gq64, gk64 = gq64 - 2 * g_row[:, None] * k, gk64 - 2 * g_row[:, None] * q
    assert torch.exp(scale * (q * k).sum(1) - row).mean() > 0.999
    gq, gk = blas.backward(q.bfloat16(), k.bfloat16(), None, scale.float(), row.float(), col.float(), g_row.float(),
                           g_row.float(), True, -1, fused=fused, targets=torch.arange(n), g_pos=-2 * g_row.float())
    for got, want in ((gq, gq64), (gk, gk64)):
        assert (got.double() - want).abs().max() < 0.1 * want.abs().max()
