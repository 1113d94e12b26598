"""CUDA C++ attention kernels (kernels/attention*.cu through ops/attention_cuda.py) against a
float64 reference of the attention spec, written here from the spec's own words.

FlashAttention rule, forward and all three gradients: the kernel's max error against the
float64 reference is at most twice that of the same reference computed in the kernel's dtype
(plus a floor of 1e-4 of the reference's scale for gradients that are exactly 0). Every mask kind,
GQA 1 and 4, fp16 and bf16, odd lengths, head dims with and without their own kernels,
strided layouts, dropout with the spec's counter-based keep pattern, determinism, and
outputs outside the documents that must stay exactly 0 with a poisoned allocator.

Runs only where fastpt._C was built with CUDA and a GPU of compute capability 8.0+ is visible.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastpt import _native
from fastpt.ops import _rng


def _unusable() -> str | None:
    why = _native.cuda_unavailable()
    if why is not None:
        return why
    from fastpt.ops import attention_cuda

    x = torch.zeros(1, 8, 1, 64, dtype=torch.float16, device="cuda")
    return attention_cuda.supports(x, x, x, 0.0)


pytestmark = pytest.mark.skipif(_unusable() is not None, reason=f"CUDA attention unavailable: {_unusable()}")

if _unusable() is None:
    from fastpt.ops import attention_cuda

KINDS = ["none", "causal", "padded", "padded_causal", "prefix", "packed", "packed_prefix"]


# ----------------------------------------------------------------------------- the spec, in float64


def keep_mask(key: int, n: int, H: int, L: int, p: float, device) -> torch.Tensor:
    """(H, L, L) bool: entry (h, i, j) of document n survives dropout (spec: rng.h mix32)."""
    h = torch.arange(H, device=device, dtype=torch.int64)
    idx = torch.arange(L, device=device, dtype=torch.int64)
    rk = _rng.mix32(((n * H + h) & _rng.M32) ^ key)
    rq = _rng.mix32(rk.view(H, 1) ^ ((idx.view(1, L) * 0x61C88647) & 0xFFFFFFFF))
    r = _rng.mix32(rq.view(H, L, 1) ^ ((idx.view(1, 1, L) * 0x61C88647) & 0xFFFFFFFF))
    return (r >> 8) >= _rng.threshold24(p)


def reference(q4, k4, v4, docs, scale, *, dropout_p=0.0, dropout_key=0, dtype=torch.float64):
    """The spec computed per document in ``dtype``: out (B, S, H, D) with zeros outside the
    documents, lse (B, H, S) float64. float64 is the ground truth; the inputs' own dtype gives
    the yardstick of the FlashAttention rule. Differentiable through q4, k4, v4."""
    q, k, v = (t.to(dtype) for t in (q4, k4, v4))
    B, S, H, D = q.shape
    G = H // k.shape[2]
    out = torch.zeros(B, S, H, D, dtype=dtype, device=q.device)
    lse = torch.zeros(B, H, S, dtype=torch.float64, device=q.device)
    for n, (b, s0, L, P) in enumerate(docs.tolist()):
        if L == 0:
            continue
        qd = q[b, s0:s0 + L].transpose(0, 1)
        kd = k[b, s0:s0 + L].transpose(0, 1).repeat_interleave(G, dim=0)
        vd = v[b, s0:s0 + L].transpose(0, 1).repeat_interleave(G, dim=0)
        s = (qd @ kd.transpose(1, 2)) * scale
        i = torch.arange(L, device=q.device).view(L, 1)
        j = torch.arange(L, device=q.device).view(1, L)
        allowed = j <= torch.clamp(i, min=P - 1)  # j <= max(i, P - 1)
        s = s.masked_fill(~allowed, float("-inf"))
        lse[b, :, s0:s0 + L] = torch.logsumexp(s.detach().double(), dim=-1)
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            keep = keep_mask(dropout_key, n, H, L, dropout_p, q.device)
            p = p * keep.to(dtype) * (1.0 / (1.0 - dropout_p))
        out[b, s0:s0 + L] = (p @ vd).transpose(0, 1)
    return out, lse


# ----------------------------------------------------------------------------- inputs


def make_docs(kind: str, S: int, gen: torch.Generator) -> tuple[int, torch.Tensor]:
    """(batch count, docs (N, 4) int32 on the CPU) for a mask kind over rows of S tokens."""
    if kind in ("none", "causal"):
        return 2, torch.tensor([[b, 0, S, S if kind == "none" else 0] for b in range(2)], dtype=torch.int32)
    if kind in ("padded", "padded_causal"):
        lens = [S, max(1, S // 2), max(1, (3 * S) // 10)]
        return 3, torch.tensor([[b, 0, L, L if kind == "padded" else 0] for b, L in enumerate(lens)],
                               dtype=torch.int32)
    if kind == "prefix":
        return 2, torch.tensor([[0, 0, S, S // 3], [1, 0, S, min(1, S)]], dtype=torch.int32)
    # packed: one row cut into documents, with padding at the end when S allows
    rows, start, end = [], 0, S - S // 10
    while start < end:
        L = int(torch.randint(1, max(2, end - start + 1), (1,), generator=gen))
        L = min(L, end - start)
        P = L if kind == "packed" else int(torch.randint(0, L + 1, (1,), generator=gen))
        rows.append([0, start, L, P])
        start += L
    return 1, torch.tensor(rows, dtype=torch.int32).view(-1, 4)


def make_inputs(kind, S, D, H, Hk, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B, docs = make_docs(kind, S, gen)
    q, k, v = (torch.randn(B, S, h, D, generator=gen).to(dtype).cuda() for h in (H, Hk, Hk))
    dout = torch.randn(B, S, H, D, generator=gen).to(dtype).cuda()
    return q, k, v, dout, docs.cuda()


def covered(docs: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """(B, S) bool: token inside some document."""
    m = torch.zeros(B, S, dtype=torch.bool)
    for b, s0, L, _ in docs.tolist():
        m[b, s0:s0 + L] = True
    return m.cuda()


def _poison_allocator():
    """Leave NaN-ish garbage in the caching allocator's free blocks, so that an output element
    the kernels forget to write, or a scratch entry read before it is written, shows up."""
    junk = [torch.full((1 << 20,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(16)]
    junk += [torch.full((1 << 26,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(2)]
    del junk


def run_cuda(q, k, v, dout, docs, scale, *, dropout_p=0.0, dropout_key=0):
    _poison_allocator()
    max_len = int(docs[:, 2].max())
    causal_any = bool((docs[:, 3] < docs[:, 2]).any())
    kw = dict(scale=scale, dropout_p=dropout_p, dropout_key=dropout_key, max_len=max_len, causal_any=causal_any)
    out, lse = attention_cuda.forward(q, k, v, docs, **kw)
    grads = attention_cuda.backward(dout, q, k, v, out, lse, docs, **kw, deterministic=True)
    torch.cuda.synchronize()
    return out, lse, grads


def run_reference(q, k, v, dout, docs, scale, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference(*leaves, docs, scale, dtype=dtype, **kw)
    out.backward(dout.to(dtype))
    return out.detach(), lse, [t.grad for t in leaves]


def assert_flash_rule(name, got, pt, ref, *, floor_frac=1e-4):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs().max().item()
    err_pt = (pt.double() - ref).abs().max().item()
    floor = floor_frac * max(1.0, ref.abs().max().item())
    assert err <= 2 * err_pt + floor, f"{name}: error {err:.3g} > 2 x {err_pt:.3g} (same math in low precision) + {floor:.2g}"


def check_all(q, k, v, dout, docs, scale, **kw):
    B, S = q.shape[:2]
    out, lse, (dq, dk, dv) = run_cuda(q, k, v, dout, docs, scale, **kw)
    ref_out, ref_lse, ref_g = run_reference(q, k, v, dout, docs, scale, torch.float64, **kw)
    pt_out, _, pt_g = run_reference(q, k, v, dout, docs, scale, q.dtype, **kw)
    inside = covered(docs, B, S)
    # Outside every document: exactly zero (the allocator was poisoned first).
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert (t[~inside] == 0).all(), f"{name}: nonzero outside the documents"
    assert_flash_rule("out", out, pt_out, ref_out)
    for name, got, pt, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), pt_g, ref_g):
        assert_flash_rule(name, got, pt, ref)
    lse_err = (lse.double() - ref_lse).abs().permute(0, 2, 1)[inside].max().item()
    assert lse_err < 1e-3, f"lse: error {lse_err:.3g}"


# ----------------------------------------------------------------------------- tests

SHAPES = [(S, D) for D in (64, 128) for S in (1, 17, 113, 203, 1000)]
SHAPES += [(S, D) for D in (32, 40, 80, 96) for S in (17, 203)]  # 40, 80: zero-padded to 64, 128


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("S,D", SHAPES)
@pytest.mark.parametrize("H,Hk", [(4, 4), (4, 1)], ids=["mha", "gqa4"])
def test_matches_reference(kind, dtype, S, D, H, Hk):
    q, k, v, dout, docs = make_inputs(kind, S, D, H, Hk, dtype, seed=S * 131 + D)
    check_all(q, k, v, dout, docs, 1.0 / math.sqrt(D))


@pytest.mark.parametrize("kind", ["causal", "packed_prefix", "padded"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_dropout_matches_reference(kind, dtype, D):
    q, k, v, dout, docs = make_inputs(kind, 203, D, 4, 2, dtype, seed=D)
    key = _rng.stream_key(1234, _rng.STREAM_ATTN_DROPOUT)
    check_all(q, k, v, dout, docs, 1.0 / math.sqrt(D), dropout_p=0.2, dropout_key=key)


@pytest.mark.parametrize("kind", ["none", "causal", "packed_prefix"])
def test_dropout_keep_pattern_is_the_spec(kind):
    # With v's rows the unit vectors (L <= D), out[i, j] = P_ij * Z_ij: its zero pattern is the
    # kernel's keep pattern, which must be the spec's bit for bit.
    S, D, H, Hk, p = 100, 128, 4, 2, 0.3
    q, k, _, _, docs = make_inputs(kind, S, D, H, Hk, torch.float16, seed=5)
    q = q * 0.1  # near-uniform probabilities: no kept entry underflows to 0
    B = q.shape[0]
    v = torch.zeros(B, S, Hk, D, dtype=torch.float16, device="cuda")
    for b, s0, L, _ in docs.tolist():
        v[b, s0:s0 + L, :, :L] = torch.eye(L, dtype=torch.float16, device="cuda").unsqueeze(1)
    key = _rng.stream_key(99, _rng.STREAM_ATTN_DROPOUT)
    out, _ = attention_cuda.forward(q, k, v, docs, scale=1 / math.sqrt(D), dropout_p=p, dropout_key=key,
                                    max_len=int(docs[:, 2].max()), causal_any=True)
    dropped, total = 0, 0
    for n, (b, s0, L, P) in enumerate(docs.tolist()):
        got = out[b, s0:s0 + L, :, :L].permute(1, 0, 2) != 0  # (H, i, j)
        i = torch.arange(L, device="cuda").view(L, 1)
        j = torch.arange(L, device="cuda").view(1, L)
        allowed = (j <= torch.clamp(i, min=P - 1)).expand(H, L, L)
        want = keep_mask(key, n, H, L, p, "cuda") & allowed
        assert torch.equal(got, want), f"document {n}: keep pattern differs from the spec"
        dropped += int((allowed & ~want).sum())
        total += int(allowed.sum())
    if total > 2000:
        assert abs(dropped / total - p) < 0.03, f"dropout rate {dropped / total:.3f}, expected {p}"


def test_backward_is_deterministic():
    q, k, v, dout, docs = make_inputs("packed_prefix", 1000, 64, 8, 2, torch.bfloat16, seed=3)
    kw = dict(scale=0.125, dropout_p=0.1, dropout_key=7, max_len=int(docs[:, 2].max()), causal_any=True)
    out, lse = attention_cuda.forward(q, k, v, docs, **kw)
    first = attention_cuda.backward(dout, q, k, v, out, lse, docs, **kw, deterministic=True)
    for _ in range(3):
        again = attention_cuda.backward(dout, q, k, v, out, lse, docs, **kw, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["sdpa_transposed", "qkv_packed", "misaligned", "expanded_dout"])
def test_strided_layouts(layout):
    B, S, H, D = 2, 203, 4, 64
    gen = torch.Generator().manual_seed(11)
    dtype = torch.float16
    if layout == "sdpa_transposed":  # (B, H, S, D) storage seen as (B, S, H, D): no copy in the kernels
        q, k, v = (torch.randn(B, H, S, D, generator=gen).to(dtype).cuda().transpose(1, 2) for _ in range(3))
    elif layout == "qkv_packed":  # a fused QKV projection's output, split without copies
        q, k, v = torch.randn(B, S, 3, H, D, generator=gen).to(dtype).cuda().unbind(2)
    else:  # a view at an odd element offset: copied to aligned storage first
        flat = torch.randn(3 * B * S * H * D + 1, generator=gen).to(dtype).cuda()
        q, k, v = (flat[1 + i * B * S * H * D:1 + (i + 1) * B * S * H * D].view(B, S, H, D) for i in range(3))
    dout = torch.randn(B, S, H, D, generator=gen).to(dtype).cuda()
    if layout == "expanded_dout":  # what out.sum().backward() hands down: stride 0 everywhere
        dout = torch.ones(1, 1, 1, 1, dtype=dtype, device="cuda").expand(B, S, H, D)
    docs = torch.tensor([[0, 0, S, 0], [1, 0, 150, 150]], dtype=torch.int32, device="cuda")
    check_all(q, k, v, dout, docs, 1.0 / math.sqrt(D))


def test_many_documents_loop_over_grid_z():
    # More documents than one grid dimension holds (65535): the kernels loop over the rest.
    n, L, H, D = 70000, 2, 1, 32
    q, k, v = (torch.randn(1, n * L, H, D, device="cuda", dtype=torch.float16) for _ in range(3))
    starts = torch.arange(n, device="cuda", dtype=torch.int32) * L
    docs = torch.stack([torch.zeros_like(starts), starts, torch.full_like(starts, L), torch.zeros_like(starts)], 1)
    out, _ = attention_cuda.forward(q, k, v, docs, scale=0.2, max_len=L, causal_any=True)
    # causal pairs: token 0 sees itself, token 1 a softmax of two keys
    qf, kf, vf = (t.float().view(n, L, D) for t in (q, k, v))
    s = (qf[:, 1:] @ kf.transpose(1, 2)).squeeze(1) * 0.2
    want1 = (torch.softmax(s, -1).unsqueeze(1) @ vf).squeeze(1)
    got = out.float().view(n, L, D)
    assert (got[:, 0] - vf[:, 0]).abs().max() < 2e-3
    assert (got[:, 1] - want1).abs().max() < 5e-3


@pytest.mark.parametrize("case", ["no_tokens", "no_rows", "empty_documents"])
def test_empty_inputs_give_empty_or_zero_results(case):
    # Empty tensors have null data pointers: the kernels' alignment checks refused them (audit 2026-11-27)
    H, D = 2, 64
    if case == "no_tokens":  # a packed batch without tokens
        q = torch.zeros(1, 0, H, D, device="cuda", dtype=torch.float16)
        docs = torch.zeros(0, 4, dtype=torch.int32, device="cuda")
    elif case == "no_rows":
        q = torch.zeros(0, 16, H, D, device="cuda", dtype=torch.float16)
        docs = torch.zeros(0, 4, dtype=torch.int32, device="cuda")
    else:  # rows whose documents hold no token (seqlens all 0)
        q = torch.randn(2, 16, H, D, device="cuda", dtype=torch.float16)
        docs = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.int32, device="cuda")
    out, lse = attention_cuda.forward(q, q, q, docs, scale=0.125, causal_any=False)
    assert out.shape == q.shape and lse.shape == (q.shape[0], H, q.shape[1]) and not out.any()
    grads = attention_cuda.backward(torch.ones_like(q), q, q, q, out, lse, docs, scale=0.125, causal_any=False)
    assert all(g.shape == q.shape and not g.any() for g in grads)
    torch.cuda.synchronize()


def test_refusals_name_the_reason():
    x = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.float16)
    assert "float16 or bfloat16" in attention_cuda.supports(x.float(), x.float(), x.float(), 0.0)
    assert "not on a CUDA device" in attention_cuda.supports(x.cpu(), x.cpu(), x.cpu(), 0.0)
    big = torch.zeros(1, 8, 2, 136, device="cuda", dtype=torch.float16)
    assert "head dim 136" in attention_cuda.supports(big, big, big, 0.0)
    assert "multiple of key/value heads" in attention_cuda.supports(
        torch.zeros(1, 8, 3, 64, device="cuda", dtype=torch.float16), x, x, 0.0)
    strided = torch.zeros(1, 8, 2, 128, device="cuda", dtype=torch.float16)[..., ::2]
    assert "stride(-1)" in attention_cuda.supports(strided, strided, strided, 0.0)
    assert "dropout_p" in attention_cuda.supports(x, x, x, 1.0)
    assert attention_cuda.supports(x, x, x, 0.1) is None


# ----------------------------------------------------------------------------- through the public API


def _public_attention():
    from fastpt import ops

    return getattr(ops, "attention", None)


@pytest.mark.skipif(_public_attention() is None, reason="fastpt.ops.attention not present yet")
@pytest.mark.parametrize("case", ["causal", "seqlens", "cu_seqlens_prefix", "gqa", "max_seqlen_over_tokens",
                                  "tiny_dropout"])
def test_public_api_cuda_matches_reference_backend(case):
    attention = _public_attention()
    gen = torch.Generator().manual_seed(21)
    dtype = torch.bfloat16
    kw = {}
    if case in ("cu_seqlens_prefix", "max_seqlen_over_tokens"):
        # max_seqlen is an upper bound: 4096 over 300 tokens (the CUDA kernel refused it with an internal error)
        T, H, D = 300, 4, 64
        shape_q = shape_k = (T, H, D)
        kw = dict(cu_seqlens=torch.tensor([0, 100, 101, 260, 300], dtype=torch.int32, device="cuda"),
                  max_seqlen=159 if case == "cu_seqlens_prefix" else 4096,
                  prefix_lens=torch.tensor([30, 1, 0, 40], dtype=torch.int32, device="cuda"))
    elif case == "tiny_dropout":  # a rate that drops nothing (under 2^-25): forward and backward agree on no dropout
        B, S, H, D = 2, 77, 4, 64
        shape_q = shape_k = (B, S, H, D)
        kw = dict(dropout_p=1e-9, causal=True)
    else:
        B, S, H, D = 2, 203, 4, 128
        shape_q = (B, S, H, D)
        shape_k = (B, S, 1 if case == "gqa" else H, D)
        if case == "seqlens":
            kw = dict(seqlens=torch.tensor([203, 77], dtype=torch.int32, device="cuda"))
        else:
            kw = dict(causal=True)
    q = torch.randn(shape_q, generator=gen).to(dtype).cuda().requires_grad_()
    k = torch.randn(shape_k, generator=gen).to(dtype).cuda().requires_grad_()
    v = torch.randn(shape_k, generator=gen).to(dtype).cuda().requires_grad_()
    dout = torch.randn(shape_q, generator=gen).to(dtype).cuda()
    results = {}
    for backend in ("cuda", "reference"):
        out = attention(q, k, v, backend=backend, **kw)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        results[backend] = (out, *grads)
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["cuda"], results["reference"]):
        scale = b.float().abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= 0.05 * scale, name
