"""Triton fused attention against a dense float64 reference written here from the spec.

The reference is typed out in this file on purpose (and not imported from ``attention.py``) so the
kernels are checked against the mask rule itself: doc ``[b, s0, L, P]``, query ``i`` attends key
``j`` iff ``j < L`` and ``j <= max(i, P - 1)``; dropout keeps (i, j) of head h in doc n iff
``mix32(mix32(mix32(key ^ (n * H + h)) ^ (i * 0x61C88647)) ^ (j * 0x61C88647)) >> 8 >= threshold24(p)``. When the library's
``attention.reference`` exists it is compared too.

Accuracy follows the FlashAttention rule: ``max|kernel - ref64| <= 2 * max|ref_lowp - ref64| +
floor``, ``ref_lowp`` the same dense math in the kernel's dtype, ``floor`` one ulp of the output
dtype plus a few fp32 ulps relative to the largest reference value (tiny inputs can make a
low-precision reference exact by luck). Under the interpreter bf16 runs upcast (see
``attention_triton.py``), so bf16 there checks indexing and masking, not bf16 rounding.

Inputs outside every doc are NaN: outputs and gradients must be exactly 0 there.
"""
import math

import pytest
import torch

from fastpt import _native
from fastpt.ops import _rng

triton = pytest.importorskip("triton")
from fastpt.ops import attention_triton as at  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- reference


def keep_mask(key: int, n: int, heads: int, length: int, p: float) -> torch.Tensor:
    """(heads, L, L) bool: True where dropout keeps (i, j) for doc n."""
    rk = torch.tensor([_rng.mix32_int(key ^ (n * heads + h)) for h in range(heads)], dtype=torch.int64)
    i = torch.arange(length, dtype=torch.int64)
    mixed = (i * 0x61C88647) & 0xFFFFFFFF
    bits = _rng.mix32(_rng.mix32(rk[:, None, None] ^ mixed[None, :, None]) ^ mixed[None, None, :])
    return (bits >> 8) >= _rng.threshold24(p)


def dense_attention(q4, k4, v4, docs, scale, dropout_p=0.0, key=0):
    """out (B, S, H, D) in q4's dtype (every product and the softmax output rounded to it), 0
    outside docs, and lse (B, H, S) in float64 (NaN outside docs). Differentiable."""
    _, _, heads, _ = q4.shape
    group = heads // k4.shape[2]
    out = q4.new_zeros(q4.shape)
    lse = torch.full((q4.shape[0], heads, q4.shape[1]), float("nan"), dtype=torch.float64)
    for n, (b, s0, length, prefix) in enumerate(docs.tolist()):
        if length == 0:
            continue
        sl = slice(s0, s0 + length)
        q = q4[b, sl].transpose(0, 1)
        k = k4[b, sl].repeat_interleave(group, dim=1).transpose(0, 1)
        v = v4[b, sl].repeat_interleave(group, dim=1).transpose(0, 1)
        i = torch.arange(length)
        allowed = i[None, :] <= torch.clamp(i, min=prefix - 1)[:, None]
        s = (q @ k.transpose(1, 2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        lse[b, :, sl] = torch.logsumexp(s.detach().double(), dim=-1)
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            p = p * keep_mask(key, n, heads, length, dropout_p).to(p.dtype) / (1 - dropout_p)
        out[b, sl] = (p @ v).transpose(0, 1)
    return out, lse


def reference_run(q4, k4, v4, docs, dout, scale, dtype, dropout_p=0.0, key=0):
    """(out, dq, dk, dv, lse) of the dense reference with inputs cast to dtype, on the CPU."""
    leaves = [t.detach().cpu().to(dtype).nan_to_num(0.0).requires_grad_(True) for t in (q4, k4, v4)]
    out, lse = dense_attention(*leaves, docs.cpu(), scale, dropout_p, key)
    out.backward(dout.cpu().to(dtype).nan_to_num(0.0))
    return [out.detach()] + [t.grad for t in leaves] + [lse]


# ----------------------------------------------------------------------------- layouts


def batch_docs(lengths, prefixes, seq):
    """(B, S, H, D) input: row b is doc b, right-padded to seq."""
    return seq, torch.tensor([[b, 0, n, p] for b, (n, p) in enumerate(zip(lengths, prefixes))], dtype=torch.int32)


def packed_docs(cu, prefixes, total):
    """Packed (1, T, H, D) input: doc n covers [cu[n], cu[n + 1]); tokens past cu[-1] are padding."""
    rows = [[0, cu[n], cu[n + 1] - cu[n], p] for n, p in enumerate(prefixes)]
    return total, torch.tensor(rows, dtype=torch.int32)


# name -> (seq, docs); P = L bidirectional, P = 0 causal, otherwise prefix-LM.
LAYOUTS = {
    "none": batch_docs([17, 17], [17, 17], 17),
    "causal": batch_docs([33, 33], [0, 0], 33),
    "padded": batch_docs([17, 9, 1], [17, 9, 1], 17),
    "padded_causal": batch_docs([33, 20], [0, 0], 33),
    "prefix": batch_docs([33, 25, 33], [15, 7, 31], 33),  # P = 15, 31: the last key of a tile
    "packed": packed_docs([0, 5, 21, 37], [5, 16, 16], 40),
    "packed_causal": packed_docs([0, 17, 18, 40, 40], [0, 0, 0, 0], 43),  # a 1-token and an empty doc
    "packed_prefix": packed_docs([0, 12, 30, 47, 64], [3, 18, 0, 1], 64),  # every mask kind at once
    "single": batch_docs([1, 1], [1, 0], 1),
}


# Sizes the interpreter cannot afford: run on a GPU only (S in 113, 203, 1000; head dims 80 to 128, which
# test_head_dims_over_64 gives the interpreter on short layouts).
GPU_LAYOUTS = {
    "causal_1000": batch_docs([1000, 1000], [0, 0], 1000),
    "padded_203": batch_docs([203, 113, 1], [203, 113, 1], 203),
    "packed_prefix_1000": packed_docs([0, 97, 600, 1000, 1023], [30, 503, 0, 23], 1030),
}


def make_inputs(layout, dtype, device, *, heads=4, kv_heads=4, dim=16, seed=0, bhsd=False):
    """q4, k4, v4, dout (NaN outside docs), docs, max_len, causal_any for a named layout."""
    seq, docs = LAYOUTS[layout] if layout in LAYOUTS else GPU_LAYOUTS[layout]
    batch = int(docs[:, 0].max()) + 1
    g = torch.Generator().manual_seed(seed)

    def rand(h):
        shape = (batch, h, seq, dim) if bhsd else (batch, seq, h, dim)
        return torch.randn(shape, generator=g, dtype=torch.float64)

    q, k, v, do = rand(heads), rand(kv_heads), rand(kv_heads), rand(heads)
    inside = torch.zeros(batch, seq, dtype=torch.bool)
    for b, s0, length, _ in docs.tolist():
        inside[b, s0:s0 + length] = True
    tensors = []
    for t in (q, k, v, do):
        t = t.to(dtype)
        view = t.transpose(1, 2) if bhsd else t
        view.masked_fill_(~inside[:, :, None, None], float("nan"))
        tensors.append(view.to(device))
    max_len = int(docs[:, 2].max())
    causal_any = bool((docs[:, 3] < docs[:, 2]).any())
    return (*tensors, docs.to(device), max_len, causal_any, inside)


def run_triton(q4, k4, v4, dout, docs, max_len, causal_any, scale, dropout_p=0.0, key=0):
    kw = dict(scale=scale, dropout_p=dropout_p, dropout_key=key, max_len=max_len, causal_any=causal_any)
    out, lse = at.forward(q4, k4, v4, docs, **kw)
    dq, dk, dv = at.backward(dout, q4, k4, v4, out, lse, docs, deterministic=True, **kw)
    return [t.cpu() for t in (out, dq, dk, dv, lse)]


def needs_backend(q4, dropout_p=0.0):
    why = at.supports(q4, q4, q4, dropout_p)
    if why is not None:
        pytest.skip(why)


# ----------------------------------------------------------------------------- assertions

NAMES = ("out", "dq", "dk", "dv")


def assert_rule(name, got, ref64, ref_lowp, ulps=8.0):
    assert got.dtype == ref_lowp.dtype, f"{name}: dtype {got.dtype}, expected {ref_lowp.dtype}"
    got, ref64, ref_lowp = got.double(), ref64.double(), ref_lowp.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).abs().max().item()
    err_lowp = (ref_lowp - ref64).abs().max().item()
    eps = torch.finfo(ref_lowp.dtype).eps
    floor = (eps + ulps * torch.finfo(torch.float32).eps) * (ref64.abs().max().item() or 1.0)
    assert err <= 2 * err_lowp + floor, f"{name}: error {err:.3e} > 2 * {err_lowp:.3e} + {floor:.1e}"


def assert_zero_outside(name, got, inside):
    """got (B, S, heads, D): exactly 0 at every token outside the docs."""
    outside = got[~inside.to(got.device)]
    assert (outside == 0).all(), f"{name}: {int((outside != 0).sum())} nonzero values outside the docs"


def check_all(layout, dtype, device, *, heads=4, kv_heads=4, dim=16, seed=0, bhsd=False, dropout_p=0.0, key=0,
              scale=None):
    q4, k4, v4, dout, docs, max_len, causal_any, inside = make_inputs(
        layout, dtype, device, heads=heads, kv_heads=kv_heads, dim=dim, seed=seed, bhsd=bhsd)
    needs_backend(q4, dropout_p)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    got = run_triton(q4, k4, v4, dout, docs, max_len, causal_any, scale, dropout_p, key)
    ref64 = reference_run(q4, k4, v4, docs, dout, scale, torch.float64, dropout_p, key)
    ref_lowp = reference_run(q4, k4, v4, docs, dout, scale, dtype, dropout_p, key)
    for name, g, r64, rl in zip(NAMES, got, ref64, ref_lowp):
        assert g.shape == r64.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(r64.shape)}"
        assert_rule(name, g, r64, rl)
        assert_zero_outside(name, g, inside)
    lse, lse64 = got[4], ref64[4]
    valid = ~torch.isnan(lse64)
    assert torch.allclose(lse[valid].double(), lse64[valid], rtol=0, atol=1e-4 * (1 + lse64[valid].abs().max())), \
        f"lse: max error {(lse[valid].double() - lse64[valid]).abs().max():.3e}"
    return got, ref64


# ----------------------------------------------------------------------------- tests

# Head dims and GQA ratios rotate over the grid so every (layout, dtype) pair stays one quick run.
SHAPES = [(16, 4, 4), (40, 4, 1), (64, 4, 4), (59, 8, 2)]  # (dim, heads, kv_heads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_mask_kind(layout, dtype, device):
    i = list(LAYOUTS).index(layout) + DTYPES.index(dtype)
    dim, heads, kv_heads = SHAPES[i % len(SHAPES)]
    check_all(layout, dtype, device, dim=dim, heads=heads, kv_heads=kv_heads, seed=i)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout, dim, heads, kv_heads",
                         [("causal_1000", 128, 8, 2), ("padded_203", 80, 4, 4), ("packed_prefix_1000", 96, 4, 1)])
def test_long_sequences_on_gpu(layout, dim, heads, kv_heads, dtype, device):
    if device != "cuda":
        pytest.skip("too slow for the Triton interpreter")
    check_all(layout, dtype, device, dim=dim, heads=heads, kv_heads=kv_heads, seed=11)
    check_all(layout, dtype, device, dim=dim, heads=heads, kv_heads=kv_heads, seed=12, dropout_p=0.1, key=3)


@pytest.mark.parametrize("dim, layout, dtype, dropout_p", [
    (80, "packed_prefix", torch.float32, 0.0), (96, "prefix", torch.float16, 0.0),
    (128, "padded_causal", torch.float32, 0.0), (96, "packed_causal", torch.bfloat16, 0.2),
    (128, "none", torch.float16, 0.0)], ids=str)
def test_head_dims_over_64(dim, layout, dtype, dropout_p, device):
    """Head dims past one 64-wide BLOCK_D on short layouts, so the interpreter runs them too (only the
    GPU test had D > 64: a store that dropped the columns past 64 passed every CPU run)."""
    check_all(layout, dtype, device, dim=dim, heads=2, kv_heads=1, seed=13, dropout_p=dropout_p, key=0x51ED270B)


@pytest.mark.parametrize("scale", [-0.7, 0.0, 2.5])
def test_any_finite_scale(scale, device):
    """The forward folds a positive scale into one FMA after the row max (max commutes with it);
    zero and negative scales, where it does not, take the unfolded path. Both against the reference."""
    check_all("packed_prefix", torch.float32, device, heads=2, kv_heads=1, dim=16, seed=3, scale=scale)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_sdpa_views_and_odd_head_dim(kv_heads, device):
    """(B, H, S, D) tensors transposed to (B, S, H, D) views, as sdpa passes them, head dim 40."""
    check_all("prefix", torch.float16, device, dim=40, heads=4, kv_heads=kv_heads, bhsd=True, seed=3)


@pytest.mark.parametrize("layout", ["packed_prefix", "prefix"])
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)], ids=["m32n16", "m16n32"])
def test_uneven_tiles(blocks, layout, device, monkeypatch):
    """BLOCK_M != BLOCK_N moves the diagonal inside tiles differently in each kernel."""
    if device == "cuda":
        pytest.skip("the tiles are the autotuner's on a GPU")
    m, n = blocks
    for kind in ("fwd", "dkdv", "dq"):
        monkeypatch.setitem(at.INTERPRET_BLOCKS, kind, dict(BLOCK_M=m, BLOCK_N=n))
    check_all(layout, torch.float32, device, dim=16, heads=2, kv_heads=2, seed=5)


@pytest.mark.parametrize("split", [2, 4])
def test_gqa_split_partials(split, device, monkeypatch):
    """dk / dv of one GQA group from several programs (fp32 partials summed in torch)."""
    if device == "cuda":
        pytest.skip("the split is chosen from the SM count on a GPU")
    monkeypatch.setattr(at, "INTERPRET_GQA_SPLIT", split)
    check_all("packed_causal", torch.float16, device, dim=16, heads=4, kv_heads=1, seed=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["packed_prefix", "padded_causal"])
def test_dropout_matches_reference(layout, dtype, device):
    """Forward and gradients with dropout: one differing keep bit moves an output by ~1/L."""
    check_all(layout, dtype, device, dim=16, heads=2, kv_heads=1, dropout_p=0.3, key=0x9E3779B9, seed=7)


def test_dropout_keep_pattern_bit_identical(device):
    """With q = 0 and v one-hot per key, out[i, j] = keep(i, j) / (count_visible(i) * (1 - p)):
    the kernel's keep pattern must equal the spec's hash exactly, kept values scaled exactly."""
    p, key, heads, length = 0.4, 0xDEADBEEF, 2, 48
    docs = torch.tensor([[0, 0, 20, 7], [0, 20, length - 20, 0], [1, 0, length, length]], dtype=torch.int32)
    q4 = torch.zeros(2, length, heads, 64)
    eye = torch.eye(length, 64)
    k4 = torch.randn(2, length, 1, 64)
    v4 = torch.zeros(2, length, 1, 64)
    for b, s0, n_tok, _ in docs.tolist():
        v4[b, s0:s0 + n_tok, 0] = eye[:n_tok]
    q4, k4, v4 = q4.to(device), k4.to(device), v4.to(device)
    needs_backend(q4, p)
    out, _ = at.forward(q4, k4, v4, docs.to(device), scale=0.125, dropout_p=p, dropout_key=key, max_len=length,
                        causal_any=True)
    out = out.cpu()
    kept = pairs = 0
    for n, (b, s0, n_tok, prefix) in enumerate(docs.tolist()):
        i = torch.arange(n_tok)
        visible = i[None, :] <= torch.clamp(i, min=prefix - 1)[:, None]
        keep = keep_mask(key, n, heads, n_tok, p) & visible
        expect = keep / (visible.sum(1, keepdim=True) * (1 - p))
        got = out[b, s0:s0 + n_tok, :, :n_tok].transpose(0, 1)
        assert torch.equal(got != 0, keep), f"doc {n}: keep pattern differs in {int(((got != 0) != keep).sum())} places"
        torch.testing.assert_close(got, expect.float(), rtol=1e-5, atol=0)
        kept += int(keep.sum())
        pairs += int(visible.sum()) * heads
    assert abs(1 - kept / pairs - p) < 0.05, f"dropout rate {1 - kept / pairs:.3f} over {pairs} pairs, expected {p}"


def test_many_docs_launch_in_chunks(device, monkeypatch):
    """More docs than one grid dimension holds: chunked launches keep each doc's index (dropout)."""
    monkeypatch.setattr(at, "MAX_GRID_DOCS", 2)
    check_all("packed_prefix", torch.float32, device, dim=16, heads=2, kv_heads=2, dropout_p=0.2, key=12345, seed=8)


def test_no_docs_gives_zeros(device):
    q4 = torch.randn(2, 5, 2, 16, device=device)
    needs_backend(q4)
    docs = torch.zeros(0, 4, dtype=torch.int32, device=device)
    kw = dict(scale=0.25, dropout_p=0.0, dropout_key=None, max_len=0, causal_any=False)
    out, lse = at.forward(q4, q4, q4, docs, **kw)
    grads = at.backward(torch.randn_like(q4), q4, q4, q4, out, lse, docs, deterministic=False, **kw)
    for t in (out, *grads):
        assert t.shape == q4.shape and t.dtype == q4.dtype and (t == 0).all()


def test_matches_library_reference(device):
    """Cross-check with ``fastpt.ops.attention.reference`` when the attention core provides it."""
    attention = pytest.importorskip("fastpt.ops.attention")
    if not hasattr(attention, "reference"):
        pytest.skip("fastpt.ops.attention.reference does not exist yet")
    q4, k4, v4, dout, docs, max_len, causal_any, inside = make_inputs("packed_prefix", torch.float32, device,
                                                                      heads=4, kv_heads=2, dim=16, seed=9)
    needs_backend(q4)
    q4, k4, v4 = (t.nan_to_num(0.0) for t in (q4, k4, v4))
    dout = dout.nan_to_num(0.0)
    kw = dict(scale=0.25, dropout_p=0.1, dropout_key=77, max_len=max_len, causal_any=causal_any)
    out, lse = at.forward(q4, k4, v4, docs, **kw)
    got = [out] + list(at.backward(dout, q4, k4, v4, out, lse, docs, deterministic=True, **kw))
    leaves = [t.cpu().double().requires_grad_(True) for t in (q4, k4, v4)]
    ref, _ = attention.reference(*leaves, docs.cpu(), scale=0.25, dropout_p=0.1, dropout_key=77)
    ref.backward(dout.cpu().double())
    for name, g, r in zip(NAMES, got, [ref] + [t.grad for t in leaves]):
        torch.testing.assert_close(g.cpu().double(), r.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter runs programs in order: cannot race")
def test_backward_is_bitwise_reproducible():
    q4, k4, v4, dout, docs, max_len, causal_any, _ = make_inputs("packed_prefix", torch.bfloat16, "cuda",
                                                                 heads=8, kv_heads=1, dim=64, seed=10)
    first = run_triton(q4, k4, v4, dout, docs, max_len, causal_any, 0.125, 0.1, 5)
    second = run_triton(q4, k4, v4, dout, docs, max_len, causal_any, 0.125, 0.1, 5)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_supports_explains_refusals(monkeypatch):
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where Triton runs (the interpreter on the CPU)
    q = torch.randn(1, 4, 2, 16, device=dev)
    if dev == "cuda" or _native.triton_interpreting():
        assert at.supports(q, q, q, 0.0) is None
    assert "float64" in at.supports(q.double(), q.double(), q.double(), 0.0)
    assert "one dtype" in at.supports(q, q.half(), q.half(), 0.0)
    big = torch.randn(1, 4, 2, 264, device=dev)
    assert "head dim" in at.supports(big, big, big, 0.0)
    strided = torch.randn(1, 4, 2, 32, device=dev)[..., ::2]
    assert "stride(-1)" in at.supports(strided, q, q, 0.0)
    assert "dropout_p" in at.supports(q, q, q, 1.5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "cuda" in at.supports(q.cpu(), q.cpu(), q.cpu(), 0.0)


def test_tuning_choices_report_the_autotuners_picks(monkeypatch):
    class Tuner:  # what tuning_choices reads of triton.autotune's Autotuner
        configs = [triton.Config(dict(BLOCK_M=32, BLOCK_N=128), num_warps=8, num_stages=2)] * 4
        cache = {(64, False, True, 512, "torch.bfloat16"): configs[0]}

    monkeypatch.setattr(at, "_TUNERS", {("dkdv", 64, False): Tuner()})
    (got,) = at.tuning_choices()
    assert got == dict(op="attention", kernel="dkdv", block_d=64, fp32=False,
                       key=["64", "False", "True", "512", "torch.bfloat16"],
                       config=dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2), candidates=4)
