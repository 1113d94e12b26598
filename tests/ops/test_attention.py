"""attention: every usable backend against the float64 reference, forward and all three gradients.

Tolerance is the FlashAttention rule: a backend's error against the float64 reference (run on
the inputs rounded to the test dtype) is at most twice the error of the same reference math run
in the test dtype itself, plus a small floor (for float32, 8 ulps of the largest reference value:
a float32 reference can be exact by luck). The reference itself is checked against torch's SDPA
with explicit dense masks, so the ground truth does not vouch for itself.

Triton runs under the interpreter here: this file gives it only S <= 64, and head dims over 64 on a
third of the (mask, dtype) pairs (its own tests cover it in depth).
"""
import functools
import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastpt
from fastpt.ops import _rng, attention, sdpa
from tests.helpers import backend_grid

attn = importlib.import_module("fastpt.ops.attention")  # the module (the package exports the function)
attn_cpu = importlib.import_module("fastpt.ops.attention_cpu")
GRID = backend_grid("attention")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (S, D, H, Hk): every odd length, head dims 40 / 64 / 80 / 96 / 128, GQA ratios 1, 2 and 4
SHAPES = [(1, 40, 4, 1), (17, 64, 4, 4), (17, 128, 8, 2), (97, 96, 4, 2), (113, 40, 4, 4), (113, 80, 8, 2),
          (203, 64, 4, 1), (203, 128, 2, 2), (1000, 40, 4, 1)]
MASKS = ["none", "causal", "padded", "padded-causal", "prefix", "padded-prefix", "packed", "packed-causal",
         "packed-prefix"]


THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small shapes gain nothing from torch's intra-op threads, and on a machine whose cores are
    busy with other jobs every parallel region can stall at its barrier: this file took 27 s
    with one thread and over 5 minutes with two on two cores at load 3. The determinism test
    puts the threads back, since that is where they matter."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(THREADS)


def _too_big(backend, s, d, rotation=0):
    """Sizes a backend does not get in this file: the interpreter is slow, the reference is dense.
    Under the interpreter, head dims over 64 (S = 17, D = 128: ~0.7 s a case) run on a third of the
    (mask, dtype) grid, ``rotation`` = mask index + dtype index: every mask once, every dtype thrice."""
    if backend == "triton" and not torch.cuda.is_available():
        return s > 64 or (d > 64 and rotation % 3 != 0)
    return backend == "reference" and s >= 1000


def _case(mask, shape, seed=0):
    """float64 q, k, v and the keyword arguments of one mask kind. (B, S) layouts have B = 2;
    packed input has T = S tokens cut into documents of random lengths, among them empty ones."""
    s, d, h, hk = shape
    g = torch.Generator().manual_seed(seed * 1009 + s * 31 + d + 7 * h + hk)
    packed = mask.startswith("packed")
    lead = (s,) if packed else (2, s)
    q, k, v = (torch.randn(*lead, n, d, generator=g, dtype=torch.float64) for n in (h, hk, hk))
    kw = {}
    if packed:
        cuts = torch.randint(0, s + 1, (4,), generator=g).tolist()
        cuts = sorted(cuts + cuts[:1])  # a repeated cut: an empty document
        kw["cu_seqlens"] = torch.tensor([0] + cuts + [s], dtype=torch.int32)
        lengths = kw["cu_seqlens"].diff()
    elif "padded" in mask:
        kw["seqlens"] = torch.tensor([s, s // 3])  # S = 1 gives an all-padding row
        lengths = kw["seqlens"]
    else:
        lengths = torch.tensor([s, s])
    if mask.endswith("causal"):
        kw["causal"] = True
    if mask.endswith("prefix"):
        kw["prefix_lens"] = (torch.rand(lengths.shape, generator=g) * (lengths + 1)).long().clamp(max=lengths)
    return (q, k, v), kw


def _grad_out(like, seed=1):
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(backend, qkv, kw, dtype, plain_dtype=None, **extra):
    """(out, dq, dk, dv) as float64. ``plain_dtype``: the library's reference with its math in that
    dtype (plain PyTorch in the inputs' dtype: the baseline of the FlashAttention rule)."""
    q, k, v = (x.to(dtype).detach().requires_grad_() for x in qkv)
    if plain_dtype is None:
        out = attention(q, k, v, backend=backend, **kw, **extra)
    else:
        inputs, packed = attn._prepare(q, k, v, **{**dict(causal=False, prefix_lens=None, seqlens=None,
                                                          cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
                                                          scale=None, seed=0, deterministic=False), **kw})
        out, _ = attn.reference(inputs["q4"], inputs["k4"], inputs["v4"], inputs["docs"], scale=inputs["scale"],
                                dropout_p=inputs["dropout_p"], dropout_key=inputs["dropout_key"],
                                compute_dtype=plain_dtype)
        out = out[0] if packed else out
    out.backward(_grad_out(out).to(out.device, dtype))
    return [x.detach().double() for x in (out, q.grad, k.grad, v.grad)]


@functools.lru_cache(maxsize=32)
def _truth(mask, shape, dtype):
    """float64 reference on the dtype-rounded inputs, and the reference math run in ``dtype``."""
    qkv, kw = _case(mask, shape)
    rounded = tuple(x.to(dtype).double() for x in qkv)
    return _run("reference", rounded, kw, torch.float64), _run(None, qkv, kw, dtype, plain_dtype=dtype)


def _assert_rule(out, ref, plain, dtype):
    peak = [r.abs().max().item() if r.numel() else 0.0 for r in ref]
    for name, o, r, p, top in zip(("out", "dq", "dk", "dv"), out, ref, plain, peak):
        assert o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        err = (o - r).abs().max().item() if o.numel() else 0.0
        base = (p - r).abs().max().item() if o.numel() else 0.0
        # float32: 8 ulps of max|ref| (of the largest output where this one is exactly 0: dq with one key),
        # as in the contrastive and Triton tests. It was 1e-5 * (1 + max|ref|), 7-46x the rule's own term,
        # so a softmax scale 4 ppm off passed. Half dtypes keep their floor (the CPU backends need none;
        # the GPU ones, not checked here, need 1e-4 of max|ref| in test_attention_cuda).
        if dtype == torch.float32:
            floor = 8 * torch.finfo(torch.float32).eps * (top or max(peak))
        else:
            floor = 1e-3 * (1.0 + top)
        assert err <= 2 * base + floor, \
            f"{name}: error {err:.3g} > 2 x same-dtype reference error {base:.3g} + {floor:.1g}"


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "S{}-D{}-H{}-Hk{}".format(*s))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(device, backend, shape, mask, dtype):
    if _too_big(backend, shape[0], shape[1], MASKS.index(mask) + DTYPES.index(dtype)):
        pytest.skip(f"{backend} gets S <= 64 here, D > 64 on a third of the masks" if backend == "triton"
                    else "dense reference")
    ref, plain = _truth(mask, shape, dtype)
    qkv, kw = _case(mask, shape)
    qkv = tuple(x.to(device) for x in qkv)
    kw = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    out = [x.cpu() for x in _run(backend, qkv, kw, dtype)]
    _assert_rule(out, ref, plain, dtype)


# ----------------------------------------------------------------------------- the reference vs torch


def _dense_mask(kw, lead, s):
    """The allowed (query, key) pairs as an explicit bool (B, S, S) mask, and the valid tokens."""
    b = lead[0] if len(lead) == 2 else 1
    i = torch.arange(s)
    if "cu_seqlens" in kw:
        cu = kw["cu_seqlens"].long()
        doc = torch.bucketize(i, cu[1:], right=True)[None]  # (1, S) document of each token
        start = cu[doc]
        valid = torch.ones(1, s, dtype=torch.bool)
    else:
        lengths = kw.get("seqlens", torch.full((b,), s))
        doc = torch.zeros(b, s, dtype=torch.long)
        start = torch.zeros(b, s, dtype=torch.long)
        valid = i[None] < lengths[:, None]
    local = i[None] - start
    prefix = kw["prefix_lens"][doc] if len(lead) == 1 and "prefix_lens" in kw else (
        kw["prefix_lens"][:, None].expand(b, s) if "prefix_lens" in kw else None)
    if prefix is None:
        prefix = torch.zeros(b, s, dtype=torch.long) if kw.get("causal") else torch.full((b, s), s)
    allowed = (doc[:, :, None] == doc[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    allowed &= local[:, None, :] <= torch.maximum(local, prefix - 1)[:, :, None]
    return allowed, valid


@pytest.mark.parametrize("mask", MASKS)
def test_reference_equals_torch_sdpa_with_dense_mask(mask):
    """Packed, padded, prefix-LM and causal masks written out densely for torch's SDPA (GQA by
    enable_gqa) give the reference's output and gradients."""
    (q, k, v), kw = _case(mask, (37, 16, 8, 2), seed=3)
    lead, s = q.shape[:-2], q.shape[-3]
    allowed, valid = _dense_mask(kw, lead, s)
    allowed = allowed | ~valid[:, :, None]  # torch gives NaN for rows without a key; they are masked below
    dout = _grad_out(q) * valid.reshape(*lead, 1, 1)  # padded rows contribute nothing

    def torch_sdpa(q, k, v):
        q4, k4, v4 = (x.reshape(-1, s, *x.shape[-2:]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed[:, None], enable_gqa=True)
        return o.transpose(1, 2).reshape(q.shape) * valid.reshape(*lead, 1, 1)

    results = []
    for fn in (torch_sdpa, lambda q, k, v: attention(q, k, v, backend="reference", **kw)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout)
        results.append([out.detach()] + [x.grad for x in leaves])
    for name, want, got in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("mask", ["packed", "packed-causal", "packed-prefix"])
def test_packed_equals_separate_calls(device, backend, mask):
    """A packed row gives each document what a call on that document alone gives."""
    s = 40 if backend == "triton" else 203
    (q, k, v), kw = _case(mask, (s, 64, 4, 1), seed=5)
    q, k, v = (x.float().to(device) for x in (q, k, v))
    cu = kw["cu_seqlens"].tolist()
    out = attention(q, k, v, backend=backend, **{n: x.to(device) if isinstance(x, torch.Tensor) else x
                                                  for n, x in kw.items()})
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if a == b:
            continue
        one = {"causal": kw.get("causal", False)}
        if "prefix_lens" in kw:
            one["prefix_lens"] = kw["prefix_lens"][n:n + 1].to(device)
        alone = attention(q[None, a:b], k[None, a:b], v[None, a:b], backend=backend, **one)[0]
        torch.testing.assert_close(out[a:b], alone, rtol=1e-5, atol=1e-5, msg=f"document {n}")


@pytest.mark.parametrize("device,backend", GRID)
def test_padding_is_never_read_and_outputs_zero(device, backend):
    """NaN in every padded position of q, k, v: real rows are unaffected, padded rows output exactly
    0 and every padded position gets exactly zero gradient."""
    s = 33 if backend == "triton" else 113
    (q, k, v), kw = _case("padded-prefix", (s, 32, 4, 2), seed=7)
    kw = {n: x.to(device) for n, x in kw.items()}
    pad = (torch.arange(s)[None, :] >= kw["seqlens"].cpu()[:, None])[..., None, None].to(device)
    clean = [x.float().to(device).requires_grad_() for x in (q, k, v)]
    poisoned = [x.detach().masked_fill(pad, float("nan")).requires_grad_() for x in clean]
    outs = []
    for leaves in (clean, poisoned):
        out = attention(*leaves, backend=backend, **kw)
        out.backward(_grad_out(out).float().to(device))
        outs.append([out.detach()] + [x.grad for x in leaves])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        assert torch.equal(b.masked_select(pad.expand_as(b)), torch.zeros_like(b.masked_select(pad.expand_as(b)))), name
        torch.testing.assert_close(b, a, msg=name)


# ----------------------------------------------------------------------------- dropout


# the (device, backend) pairs that accept dropout
DROPOUT_GRID = [(dev, b) for dev, b in GRID if attn.OP.refusals(**attn.OP.probe(dev) | {"dropout_p": 0.5})[b] is None]


def _revealed(backend, device, kw, s, h, p, seed):
    """q = 0 makes every allowed probability 1 / (allowed keys), v = identity puts probability j of
    query i into output column j: the output shows the dropout mask and its scaling."""
    q = torch.zeros(2, s, h, s, device=device)
    k = torch.randn(2, s, h, s, generator=torch.Generator().manual_seed(0)).to(device)
    v = torch.eye(s, device=device)[None, :, None, :].expand(2, s, h, s).contiguous()
    return attention(q, k, v, dropout_p=p, seed=seed, backend=backend, **kw).permute(0, 2, 1, 3).cpu()  # (B, H, i, j)


@pytest.mark.parametrize("device,backend", DROPOUT_GRID)
def test_dropout_mask_is_the_contract(device, backend):
    """Each dropped entry is the one the counter-based formula names, computed here with the
    scalar hash: doc n, query head h, local query i, local key j."""
    s, h, p, seed = 16, 2, 0.4, 1234
    seqlens, prefix = torch.tensor([16, 11]), torch.tensor([5, 0])
    out = _revealed(backend, device, dict(seqlens=seqlens.to(device), prefix_lens=prefix.to(device)), s, h, p, seed)
    key, thr = _rng.stream_key(seed, _rng.STREAM_ATTN_DROPOUT), _rng.threshold24(p)
    for n in range(2):
        length, pre = int(seqlens[n]), int(prefix[n])
        for hh in range(h):
            rk = _rng.mix32_int(key ^ (n * h + hh))
            for i in range(length):
                allowed = [j for j in range(length) if j <= max(i, pre - 1)]
                for j in allowed:
                    kept = (_rng.mix32_int(_rng.mix32_int(rk ^ ((i * 0x61C88647) & 0xFFFFFFFF))
                                           ^ ((j * 0x61C88647) & 0xFFFFFFFF)) >> 8) >= thr
                    want = 1.0 / (len(allowed) * (1 - p)) if kept else 0.0
                    assert out[n, hh, i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-7), (n, hh, i, j)
    assert torch.equal(out[1, :, 11:], torch.zeros_like(out[1, :, 11:]))


@pytest.mark.parametrize("device,backend", DROPOUT_GRID)
def test_dropout_rate_and_seeds(device, backend):
    """Drop rate within 5 binomial standard deviations; same seed same mask, new seed new mask."""
    s, h, p = (32, 2, 0.3) if backend == "triton" else (128, 4, 0.3)
    out = _revealed(backend, device, dict(causal=True), s, h, p, seed=7)
    allowed = torch.ones(s, s, dtype=torch.bool).tril().expand_as(out)
    n = allowed.sum().item()
    dropped = (out[allowed] == 0).sum().item()
    assert abs(dropped - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (dropped, n)
    assert torch.equal(out, _revealed(backend, device, dict(causal=True), s, h, p, seed=7))
    other = _revealed(backend, device, dict(causal=True), s, h, p, seed=8)
    assert ((other == 0) != (out == 0))[allowed].float().mean() > 0.2


def test_dropout_gradcheck_of_the_reference():
    """With a fixed seed the dropout mask is a constant: the reference's gradients are exact."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, hh, 4, generator=g, dtype=torch.float64, requires_grad=True) for hh in (2, 1, 1))
    kw = dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), prefix_lens=torch.tensor([2, 0]),
              dropout_p=0.4, seed=3, backend="reference")
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, **kw), (q, k, v))


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DROPOUT_GRID if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference(device, backend, dtype):
    """The FlashAttention rule with dropout (the float64 reference and its same-dtype baseline drop the same
    entries), every dtype: it was float32 only, against a flat 2e-4, and float16 dropout was never compared."""
    (q, k, v), kw = _case("packed-prefix", (48, 32, 4, 2), seed=11)
    kw = kw | dict(dropout_p=0.25, seed=99)
    ref = _run("reference", tuple(x.to(dtype).double() for x in (q, k, v)), kw, torch.float64)
    plain = _run(None, (q, k, v), kw, dtype, plain_dtype=dtype)
    got = _run(backend, tuple(x.to(device) for x in (q, k, v)), {n: x.to(device) if isinstance(x, torch.Tensor)
                                                                   else x for n, x in kw.items()}, dtype)
    _assert_rule([x.cpu() for x in got], ref, plain, dtype)


def _packed_rows(n_rows, s, per_row, g):
    """cu_seqlens of ``n_rows`` rows of ``s`` tokens handed in as one packed row (what the data
    pipeline's pack mode collates): ``per_row`` documents of random lengths per row, none crossing
    a row, some empty."""
    cu = [0]
    for b in range(n_rows):
        cuts = sorted(torch.randint(0, s + 1, (per_row - 1,), generator=g).tolist())
        cu += [b * s + c for c in cuts] + [(b + 1) * s]
    return torch.tensor(cu, dtype=torch.int32)


def _paths_case(mask, dtype):
    """Normal-form inputs of one layout (GQA 4 / 2 heads, head dim 40) for the two dropout paths."""
    g = torch.Generator().manual_seed(len(mask))
    kw = dict(causal=False, prefix_lens=None, seqlens=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.3,
              scale=None, seed=21, deterministic=False)
    if mask.startswith("rows"):  # 5 rows of 24 tokens, 3 documents each
        kw["cu_seqlens"] = _packed_rows(5, 24, 3, g)
        lead, lengths = (120,), kw["cu_seqlens"].diff()
    else:
        lead = (3, 40)
        kw["seqlens"] = lengths = torch.tensor([40, 17, 0]) if mask.startswith("padded") else torch.tensor([40] * 3)
    if mask.endswith("causal"):
        kw["causal"] = True
    if mask.endswith("prefix"):
        kw["prefix_lens"] = (torch.rand(lengths.shape, generator=g) * (lengths + 1)).long().clamp(max=lengths)
    q, k, v = (torch.randn(*lead, n, 40, generator=g).to(dtype) for n in (4, 2, 2))
    inputs, _ = attn._prepare(q, k, v, **kw)
    return inputs, kw


@pytest.mark.parametrize("mask", ["rows", "rows-causal", "rows-prefix", "padded", "padded-prefix", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_dense_and_grouped_paths_match_the_reference(mask, dtype):
    """The cpu backend's two dropout paths (dense over windows of the rows, or per group of equal
    documents) compute the reference's products in another grouping: forward and every gradient
    agree with it to float32 rounding for float32 inputs; for bfloat16 inputs (products in
    bfloat16) they keep the FlashAttention rule against the float64 reference with the same
    dropout mask. NaN in the padding changes nothing on the dense path, which reads whole rows."""
    inputs, kw = _paths_case(mask, dtype)
    q4, k4, v4, docs, scale, key = (inputs[n] for n in ("q4", "k4", "v4", "docs", "scale", "dropout_key"))
    width = attn_cpu._shortest_window(docs.tolist(), q4.shape[1])
    if mask.startswith("rows"):
        assert width < q4.shape[1]  # the dense path runs on windows of the packed row, not on all of it
    runs = dict(reference=lambda *x: attn.reference(*x, docs, scale=scale, dropout_p=0.3, dropout_key=key)[0],
                grouped=lambda *x: attn_cpu._grouped_dropout_attention(*x, docs, scale, 0.3, key),
                dense=lambda *x: attn_cpu._dense_dropout_attention(*x, docs, scale, 0.3, key, width))
    pad = (attn_cpu._row_layout(docs, *q4.shape[:2])[0] < 0)[..., None, None]
    runs["dense-poisoned"] = lambda *x: runs["dense"](*(t.masked_fill(pad, float("nan")) for t in x))
    if dtype != torch.float32:  # the rule's truth and its same-dtype baseline, with the same mask
        runs["truth"] = lambda *x: attn.reference(*(t.double() for t in x), docs, scale=scale, dropout_p=0.3,
                                                  dropout_key=key)[0]
        runs["plain"] = lambda *x: attn.reference(*x, docs, scale=scale, dropout_p=0.3, dropout_key=key,
                                                  compute_dtype=dtype)[0]
    got = {}
    for name, run in runs.items():
        leaves = [x.detach().clone().requires_grad_() for x in (q4, k4, v4)]
        out = run(*leaves)
        out.backward(_grad_out(out).to(dtype).to(out.dtype))
        got[name] = [out.detach()] + [x.grad for x in leaves]
    for path in ("grouped", "dense"):
        for name, a, b in zip(("out", "dq", "dk", "dv"), got[path], got["reference"]):
            assert a.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{path} {name}")
        if dtype != torch.float32:
            _assert_rule([x.double() for x in got[path]], got["truth"], [x.double() for x in got["plain"]], dtype)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got["dense-poisoned"], got["dense"]):  # NaN padding unread
        assert torch.equal(a, b) and not a.masked_select(pad.expand_as(a)).any(), name
    if kw["cu_seqlens"] is not None:  # the public call runs the path the cost model picks, bit for bit
        picked = "dense" if attn_cpu._dense_window(docs.tolist(), *q4.shape[:2]) else "grouped"
        assert torch.equal(attention(q4[0], k4[0], v4[0], **{**kw, "backend": "cpu"}), got[picked][0][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_dropout_output_is_contiguous_and_attached(dtype):
    """Both CPU dropout paths return the contiguous (B, S, H, D) every backend returns (the dense one
    came back strided for float32 / bfloat16: Tensor.to(same dtype, memory_format=...) is a no-op), and
    a batch with no token in any document stays in the graph with zero gradients (as the reference)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(4, 64, 4, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    for seqlens in (torch.tensor([64, 3, 0, 50]), torch.tensor([0, 0, 0, 0])):
        out = attention(q, k, v, seqlens=seqlens, dropout_p=0.1, seed=3, backend="cpu")
        assert out.is_contiguous() and out.view(4, 64, 64) is not None
        assert out.requires_grad
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        if not seqlens.any():
            assert not out.any() and all(not x.any() for x in grads)


def test_cpu_dropout_with_an_int_seed_compiles_as_one_graph():
    """An int seed under torch.compile(fullgraph=True): the cpu backend traces the dense reference
    instead of reading the documents on the host (a data-dependent guard that failed the compile)."""
    (q, k, v), kw = _case("packed-prefix", (29, 16, 4, 2), seed=5)
    q, k, v = (x.float() for x in (q, k, v))

    def step(q, k, v):
        return attention(q, k, v, dropout_p=0.3, seed=77, backend="cpu", **kw)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, step(q, k, v), rtol=1e-5, atol=1e-6)


def test_dropout_dense_path_without_native(monkeypatch):
    """Without fastpt._C the dense path's dropout is the torch formula: the same bits."""
    inputs, _ = _paths_case("rows-prefix", torch.float32)
    args = [inputs[n] for n in ("q4", "k4", "v4", "docs", "scale")] + [0.3, inputs["dropout_key"], 24]
    got = []
    for unavailable in (None, "fastpt._C is not built"):
        monkeypatch.setattr(attn_cpu._native, "cpu_unavailable", lambda: unavailable)
        leaves = [x.detach().clone().requires_grad_() for x in args[:3]]
        out = attn_cpu._dense_dropout_attention(*leaves, *args[3:])
        out.backward(_grad_out(out).float())
        got.append([out] + [x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*got))


def test_dropout_path_choice():
    """Dense windows for the README demo (32 rows of 128 tokens, ~2 documents each, packed into
    one 4096-token row), the grouped path for long rows of many short documents."""
    g = torch.Generator().manual_seed(0)
    for n_rows, s, per_row, want in ((32, 128, 2, 128), (2, 2048, 30, None)):
        cu = _packed_rows(n_rows, s, per_row, g)
        rows = [[0, a, b - a, b - a] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        assert attn_cpu._dense_window(rows, 1, n_rows * s) == want, (n_rows, s, per_row)
    assert attn_cpu._dense_window([[0, 0, 0, 0]], 1, 16) is None  # no document: the grouped path's zeros
    assert attn_cpu._dense_window([[b, 0, 64, 64] for b in range(8)], 8, 64) is None  # one group: a tie


# ----------------------------------------------------------------------------- bad input and refusals


def _args(**over):
    g = torch.Generator().manual_seed(0)
    a = dict(q=torch.randn(2, 8, 4, 16, generator=g), k=torch.randn(2, 8, 2, 16, generator=g),
             v=torch.randn(2, 8, 2, 16, generator=g))
    return a | over


def _packed(**over):
    return _args(q=torch.randn(10, 4, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16),
                 cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32)) | over


@pytest.mark.parametrize("args,err,match", [
    (_args(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
    (_args(q=torch.zeros(2, 8, 4, 16, dtype=torch.int64)), TypeError, "q: expected float16"),
    (_args(k=torch.randn(2, 8, 2, 16, dtype=torch.float64)), TypeError, "k: expected dtype torch.float32"),
    (_args(v=torch.randn(2, 8, 2, 16, device="meta")), ValueError, "v: expected a tensor on cpu"),
    (_args(q=torch.randn(8, 4)), ValueError, "q: expected shape"),
    (_args(k=torch.randn(2, 7, 2, 16)), ValueError, "k: expected shape"),
    (_args(k=torch.randn(2, 8, 2, 8)), ValueError, "k: expected shape"),
    (_args(v=torch.randn(2, 8, 1, 16)), ValueError, "v: expected the shape of k"),
    (_args(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)), ValueError, "k: its number of heads Hk=3"),
    (_args(q=torch.randn(1, 2, 1, 300), k=torch.randn(1, 2, 1, 300), v=torch.randn(1, 2, 1, 300)), ValueError,
     "head dim D=300"),
    (_args(causal=1), TypeError, "causal"),
    (_args(dropout_p=1.0), ValueError, "dropout_p"),
    (_args(dropout_p=-0.1), ValueError, "dropout_p"),
    (_args(seed=-1), ValueError, "seed"),
    (_args(scale=float("nan")), ValueError, "scale"),
    (_args(scale="x"), TypeError, "scale"),
    (_args(seqlens=torch.tensor([8, 9])), ValueError, r"seqlens: expected lengths in \[0, S=8\], got seqlens\[1\]=9"),
    (_args(seqlens=torch.tensor([8, -1])), ValueError, "seqlens"),
    (_args(seqlens=torch.tensor([8])), ValueError, r"seqlens: expected shape \(2,\)"),
    (_args(seqlens=torch.tensor([8.0, 2.0])), TypeError, "seqlens"),
    (_args(prefix_lens=torch.tensor([8, 9])), ValueError, r"prefix_lens: prefix_lens\[1\]=9 is longer than its row"),
    (_args(seqlens=torch.tensor([8, 3]), prefix_lens=torch.tensor([2, 4])), ValueError, "longer than its row"),
    (_args(prefix_lens=torch.tensor([-1, 2])), ValueError, "prefix_lens: expected lengths >= 0"),
    (_args(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "cu_seqlens: only with packed"),
    (_packed(cu_seqlens=None), ValueError, "cu_seqlens: required"),
    (_packed(cu_seqlens=torch.tensor([0, 4, 10])), TypeError, "cu_seqlens: expected an int32"),
    (_packed(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, r"cu_seqlens\[0\] == 0"),
    (_packed(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
    (_packed(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "last offset to equal T=10"),
    (_packed(cu_seqlens=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError, "cu_seqlens: expected shape"),
    (_packed(prefix_lens=torch.tensor([5, 1])), ValueError, "longer than its document"),
    (_packed(prefix_lens=torch.tensor([1, 1, 1])), ValueError, r"prefix_lens: expected shape \(2,\)"),
    (_packed(seqlens=torch.tensor([4, 6])), ValueError, "seqlens: only for"),
    (_packed(max_seqlen=5), ValueError, r"max_seqlen: expected at least the longest document \(6\)"),
    (_args(backend="tpu"), ValueError, "backend"),
])
def test_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        attention(**args)


def test_index_checks_run_once_per_tensor(monkeypatch):
    """The host-side checks of cu_seqlens / seqlens / prefix_lens (a device sync each) run once for
    the tensors a model hands to every layer: again only for another tensor, an in-place change,
    other arguments, or after a failed check. (Index tensors on the CPU are checked on every call:
    the mechanism is for device tensors, tested here on CPU ones.)"""
    monkeypatch.setattr(attn, "_REMEMBER_CPU", True)
    calls = []
    real = attn._host_values
    monkeypatch.setattr(attn, "_host_values", lambda *t: calls.append(1) or real(*t))
    a = _packed()
    cu = a["cu_seqlens"]
    for _ in range(3):  # three "layers"
        attention(**a)
    assert len(calls) == 1
    attention(**a, causal=True)  # other arguments: checked again
    assert len(calls) == 2
    attention(**(a | dict(cu_seqlens=cu.clone())))  # another tensor, same values
    assert len(calls) == 3
    cu[1] = 11  # in place: the version counter moves, the bad value is found
    with pytest.raises(ValueError, match="non-decreasing"):
        attention(**a)
    with pytest.raises(ValueError, match="non-decreasing"):  # a failed check is not remembered
        attention(**a)
    assert len(calls) == 5
    s = _args(seqlens=torch.tensor([8, 5]))
    attention(**s)
    attention(**s)
    assert len(calls) == 6
    with torch.inference_mode():  # inference tensors have no version counter: checked every time
        s = _args(seqlens=torch.tensor([8, 5]))
        attention(**s)
        attention(**s)
    assert len(calls) == 8


def test_refusals_name_the_reason():
    """A forced backend that cannot serve raises with every backend's reason; the cpu backend
    serves dropout (grouped dense path) and refuses non-CPU tensors."""
    with pytest.raises(fastpt.BackendError, match="sdpa: ") as exc:
        attention(**_args(backend="sdpa"))
    assert "reference: ok" in str(exc.value) and "triton: " in str(exc.value) and "cuda: " in str(exc.value)
    inputs, _ = attn._prepare(**{n: x for n, x in _args().items()}, causal=False, prefix_lens=None, seqlens=None,
                              cu_seqlens=None, max_seqlen=None, dropout_p=0.1, scale=None, seed=0,
                              deterministic=False)
    assert attn.OP.select(None, **inputs).name == "cpu"
    meta = {n: x.to("meta") if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for n, x in (inputs | dict(dropout_p=0.0)).items()}
    why = attn.OP.refusals(**meta)
    assert why["cpu"] == "needs cpu tensors, got meta" and why["reference"] is None
    assert why["cuda"] is not None


def test_missing_kernel_module_makes_its_backend_refuse(monkeypatch):
    monkeypatch.setattr(attn, "_kernel_module", lambda name: (None, f"fastpt.ops.{name} is not available (test)"))
    supports = attn._module_supports("attention_triton", lambda device: None)
    assert supports(**attn.OP.probe("cpu")) == "fastpt.ops.attention_triton is not available (test)"


# ----------------------------------------------------------------------------- integration


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["packed-prefix", "padded-causal"])
def test_torch_compile_full_graph(backend, layout):
    (q, k, v), kw = _case(layout, (29, 16, 4, 2), seed=2)
    q, k, v = (x.float() for x in (q, k, v))

    def step(q, k, v, index):
        names = [n for n in ("cu_seqlens", "seqlens", "prefix_lens") if n in kw]
        extra = dict(zip(names, index)) | {n: x for n, x in kw.items() if not isinstance(x, torch.Tensor)}
        return (attention(q, k, v, backend=backend, **extra) ** 2).sum()

    index = [kw[n] for n in ("cu_seqlens", "seqlens", "prefix_lens") if n in kw]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    eager = step(*leaves, index)
    eager.backward()
    want = [x.grad for x in leaves]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache.*")  # torch 2.11 fails where newer Dynamo warns
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves, index)  # raises on a break
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for g, x in zip(want, leaves):
        torch.testing.assert_close(x.grad, g)


def test_custom_op_registration():
    """Schema, fake implementation and autograd formula agree with the real cpu kernel."""
    (q, k, v), kw = _case("packed-prefix", (23, 16, 4, 2), seed=4)
    q4, k4, v4 = (x.float()[None].requires_grad_() for x in (q, k, v))
    docs = attn._docs_tensor(1, 23, "cpu", cu=kw["cu_seqlens"], prefix=kw["prefix_lens"])
    torch.library.opcheck(attn._attention_fwd, (q4, k4, v4, docs, 0.3, 0.0, 0, -1, -1, False, "cpu", None))
    docs = attn._docs_tensor(2, 9, "cpu", causal=True)
    q4, k4 = torch.randn(2, 9, 4, 16, requires_grad=True), torch.randn(2, 9, 1, 16, requires_grad=True)
    torch.library.opcheck(attn._attention_fwd, (q4, k4, k4, docs, 0.25, 0.0, 0, 9, 1, False, "cpu", None))
    if attn.OP.backends["triton"].available() is None:  # a traced dropout key (key_t), through a kernel that has dropout
        key_t = _rng.stream_key_tensor(torch.tensor(5), _rng.STREAM_ATTN_DROPOUT)
        q4, k4 = torch.randn(2, 9, 2, 16, requires_grad=True), torch.randn(2, 9, 1, 16, requires_grad=True)
        torch.library.opcheck(attn._attention_fwd, (q4, k4, k4, docs, 0.25, 0.2, 0, 9, 1, False, "triton", key_t))


@pytest.mark.parametrize("device,backend", DROPOUT_GRID)
def test_torch_compile_full_graph_with_dropout(device, backend):
    """Under torch.compile a seed tensor (what fastpt.nn layers draw there, ``_rng.fresh_seed``) stays
    in the graph: no graph break, and the same mask as eager code given the seed's value (the cpu
    backend runs the dense reference math then, so equal to float32 rounding; kernels exactly)."""
    (q, k, v), kw = _case("packed-prefix", (29, 16, 4, 2), seed=5)
    q, k, v = (x.float().to(device) for x in (q, k, v))
    kw = {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}

    def step(q, k, v, seed):
        return attention(q, k, v, dropout_p=0.3, seed=seed, backend=backend, **kw)

    seed = torch.tensor(2**40 + 77)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    eager = step(*leaves, int(seed))
    eager.backward(torch.ones_like(eager))
    want = [x.grad for x in leaves]
    torch._dynamo.reset()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves, seed)  # raises on a break
    compiled.backward(torch.ones_like(compiled))
    exact = backend != "cpu"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled, eager, **tol)
    for g, x in zip(want, leaves):
        torch.testing.assert_close(x.grad, g, **tol)
    assert (eager == 0).any()  # the mask dropped something: the comparison above is not vacuous


def test_sdpa_under_torch_compile_draws_its_seed_in_the_graph():
    """``sdpa(dropout_p > 0)`` without a seed draws one as a tensor under compile (no host read)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 24, 16, generator=g) for _ in range(3))
    torch._dynamo.reset()
    fn = lambda q, k, v: sdpa(q, k, v, dropout_p=0.5, is_causal=True)  # noqa: E731
    assert torch._dynamo.explain(fn)(q, k, v).graph_break_count == 0
    a, b = (torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v) for _ in range(2))
    assert not torch.equal(a, b)  # a fresh seed each call, not one baked into the graph


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("kind", ["none", "causal", "gqa", "scale"])
def test_sdpa_is_a_drop_in(device, backend, kind):
    """fastpt.ops.sdpa on (B, H, S, D) equals torch's SDPA, forward and backward."""
    h, hk = (8, 2) if kind == "gqa" else (4, 4)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 37, 32, generator=g).to(device).requires_grad_() for n in (h, hk, hk))
    kw = dict(is_causal=kind == "causal", scale=0.3 if kind == "scale" else None, enable_gqa=kind == "gqa")
    results = []
    for fn in (F.scaled_dot_product_attention, functools.partial(sdpa, backend=backend)):
        for x in (q, k, v):
            x.grad = None
        out = fn(q, k, v, **kw)
        out.backward(_grad_out(out).float().to(device))
        results.append([out.detach()] + [x.grad for x in (q, k, v)])
    assert results[1][0].shape == (2, h, 37, 32)
    for name, want, got in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_sdpa_falls_back_to_torch_for_general_masks():
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # torch's own error: fewer kv heads without enable_gqa
        sdpa(q, k[:, :2], v[:, :2])
    # what the kernels cannot do goes to torch too: head dims over 256, dropout_p = 1 (zeros)
    q3, k3, v3 = (torch.randn(1, 2, 5, 300) for _ in range(3))
    torch.testing.assert_close(sdpa(q3, k3, v3), F.scaled_dot_product_attention(q3, k3, v3), rtol=0, atol=0)
    assert torch.equal(sdpa(q, k, v, dropout_p=1.0), F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))


def test_index_tensors_on_the_cpu_are_checked_every_call():
    """A cu_seqlens buffer refilled through numpy keeps its version counter: the checks remembered
    from the last call went stale (an offset that does not end at T passed; outputs zeroed)."""
    q, k, v = (torch.randn(64, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32)
    attention(q, k, v, cu_seqlens=cu, backend="cpu")
    cu.numpy()[:] = [0, 8, 16, 24, 40]
    with pytest.raises(ValueError, match="cu_seqlens: expected the last offset to equal T=64"):
        attention(q, k, v, cu_seqlens=cu, backend="cpu")


@pytest.mark.parametrize("scale", [-0.7, 0.0])
@pytest.mark.parametrize("mask", ["causal", "prefix", "packed-prefix"])
def test_zero_and_negative_scale_on_cpu(mask, scale):
    """torch's CPU flash kernel returns NaN for a zero or negative scale under its causal mask; the cpu
    backend runs them as equivalent positive-scale calls (zero: uniform attention, dq = 0)."""
    (q, k, v), kw = _case(mask, (17, 16, 2, 1), seed=4)
    grads = {}
    for backend in ("cpu", "reference"):
        x = [t.float().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*x, scale=scale, backend=backend, **kw)
        out.backward(torch.ones_like(out))
        grads[backend] = [out.detach()] + [t.grad for t in x]
        assert all(torch.isfinite(g).all() for g in grads[backend]), backend
    for name, got, want in zip(("out", "dq", "dk", "dv"), grads["cpu"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("device,backend", GRID)
def test_log_sum_exp_and_layout(device, backend):
    """The saved lse is (B, H, S) float32 and matches the reference on real rows; out is contiguous."""
    (q, k, v), kw = _case("packed-prefix", (48, 32, 4, 2), seed=6)
    inputs, _ = attn._prepare(*(x.float().to(device) for x in (q, k, v)), causal=False, seqlens=None, max_seqlen=None,
                              dropout_p=0.0, scale=None, seed=0, deterministic=False,
                              cu_seqlens=kw["cu_seqlens"].to(device), prefix_lens=kw["prefix_lens"].to(device))
    out, lse = attn.OP(backend, **inputs)
    ref_out, ref_lse = attn.reference(inputs["q4"].double(), inputs["k4"].double(), inputs["v4"].double(),
                                      inputs["docs"], scale=inputs["scale"])
    assert lse.shape == (1, 4, 48) and lse.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(lse.double().cpu(), ref_lse.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", GRID)
def test_strided_inputs_broadcast_gradient_and_determinism(device, backend):
    """q, k, v as views of one fused projection (and a transposed q with stride(-1) != 1), an
    upstream gradient that is a stride-0 broadcast, and bitwise-equal deterministic backwards."""
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 24, 4 + 2 * 2, 16, generator=g).to(device)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    ref = attention(*(x.contiguous() for x in (q, k, v)), causal=True, backend=backend)
    torch.testing.assert_close(attention(q, k, v, causal=True, backend=backend), ref, rtol=0, atol=0)
    qt = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert qt.stride(-1) != 1
    torch.testing.assert_close(attention(qt, k, v, causal=True, backend=backend), ref, rtol=0, atol=0)
    grads = []
    torch.set_num_threads(THREADS)  # several threads are what could make a backward order-dependent
    for _ in range(2):
        leaves = [x.contiguous().requires_grad_() for x in (q, k, v)]
        attention(*leaves, causal=True, deterministic=True, backend=backend).sum().backward()
        grads.append([x.grad for x in leaves])
    torch.set_num_threads(1)
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("device,backend", GRID)
def test_autocast_runs_in_the_autocast_dtype(device, backend):
    q, k, v = (torch.randn(2, 16, 4, 32, device=device, requires_grad=True) for _ in range(3))
    with torch.autocast(device, dtype=torch.bfloat16):
        out = attention(q, k, v, causal=True, backend=backend)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32
    want = attention(*(x.detach().bfloat16() for x in (q, k, v)), causal=True, backend=backend)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_cpu_dropout_under_autocast_is_the_plain_call():
    """Inside torch.autocast (bf16 training on the CPU) the cpu backend's dropout path keeps its own
    float32 math: the same bits as the call outside autocast. Rows of different shapes make the
    grouped path gather documents by index (the case that met autocast's bf16 einsum)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 40, 2, 16, generator=g).bfloat16() for _ in range(3))
    seqlens = torch.tensor([17, 40, 17])
    out = [attention(*(x.detach().requires_grad_() for x in (q, k, v)), seqlens=seqlens, dropout_p=0.2, seed=7,
                     backend="cpu") for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = attention(q, k, v, seqlens=seqlens, dropout_p=0.2, seed=7, backend="cpu")
    assert inside.dtype == torch.bfloat16
    torch.testing.assert_close(inside, out[0], rtol=0, atol=0)


def test_float64_is_left_alone_under_autocast():
    """torch's autocast leaves float64 alone; attention and sdpa cast it to the autocast dtype (7.7e-3 off)."""
    q, k, v = (torch.randn(2, 9, 2, 16, dtype=torch.float64) for _ in range(3))
    want = attention(q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, causal=True)
        got_sdpa = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    assert got.dtype == torch.float64 and got_sdpa.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_sdpa.transpose(1, 2), want, rtol=1e-12, atol=1e-12)


# The host checks of test_bad_input that a torch.compile graph cannot make (they read the values):
# it makes them itself (torch._assert_async), where they were skipped (bad lengths ran, or failed in
# an unrelated reshape). RuntimeError naming the argument, no graph break.
@pytest.mark.parametrize("args,match", [
    (_args(seqlens=torch.tensor([8, 9])), r"seqlens: expected lengths in \[0, S\]"),
    (_args(seqlens=torch.tensor([-2, 3])), r"seqlens: expected lengths in \[0, S\]"),
    (_args(prefix_lens=torch.tensor([8, 9])), "prefix_lens: a prefix is longer than its row"),
    (_args(seqlens=torch.tensor([8, 3]), prefix_lens=torch.tensor([2, 4])), "longer than its row"),
    (_args(prefix_lens=torch.tensor([-1, 2])), "prefix_lens: expected lengths >= 0"),
    (_packed(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), r"cu_seqlens\[0\] == 0"),
    (_packed(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
    (_packed(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), "last offset to equal T"),
    (_packed(prefix_lens=torch.tensor([5, 1])), "longer than its document"),
    (_packed(max_seqlen=5), "max_seqlen: expected at least the longest document"),
])
def test_bad_index_values_raise_under_torch_compile(args, match):
    names = [n for n in ("cu_seqlens", "seqlens", "prefix_lens") if n in args]
    rest = {n: x for n, x in args.items() if n not in names and n not in "qkv"}

    def step(q, k, v, *index):
        return attention(q, k, v, **dict(zip(names, index)), **rest)

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=match):
        torch.compile(step, backend="eager", fullgraph=True)(args["q"], args["k"], args["v"],
                                                             *(args[n] for n in names))


def test_graph_checks_keep_sizes_dynamic():
    """The in-graph checks' messages hold no size: formatting a dynamic S specialised the graph (a
    recompile per row length). One graph serves S = 9 and 12, and still checks each."""
    frames = []

    def count(gm, inputs):
        frames.append(gm)
        return gm

    fn = torch.compile(lambda x, s: attention(x, x, x, seqlens=s), backend=count, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    fn(torch.randn(3, 9, 2, 8), torch.tensor([9, 4, 0]))
    fn(torch.randn(3, 12, 2, 8), torch.tensor([12, 4, 0]))
    with pytest.raises(RuntimeError, match="seqlens: expected lengths"):
        fn(torch.randn(3, 12, 2, 8), torch.tensor([13, 4, 0]))
    assert len(frames) == 1


def test_sdpa_forced_backend_is_not_ignored_by_the_fallback():
    """What sdpa hands to torch's SDPA ran there even under a forced (or unknown) backend; a forced
    one now raises fastpt.BackendError with the reason, an unknown name ValueError."""
    q = torch.randn(1, 2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    for backend in ("reference", "cpu", "sdpa"):
        with pytest.raises(fastpt.BackendError, match=f"forced backend '{backend}' .*a general attn_mask"):
            sdpa(q, q, q, attn_mask=mask, backend=backend)
    with pytest.raises(fastpt.BackendError, match="head dim D=300 over 256"):
        sdpa(*(torch.randn(1, 2, 4, 300) for _ in range(3)), backend="reference")
    with pytest.raises(ValueError, match="backend: expected one of"):
        sdpa(q, q, q, attn_mask=mask, backend="bogus")
    with pytest.raises(fastpt.BackendError, match="does not implement this op"):
        sdpa(q, q, q, attn_mask=mask, backend="blas")
    torch.testing.assert_close(sdpa(q, q, q, attn_mask=mask), F.scaled_dot_product_attention(q, q, q, attn_mask=mask),
                               rtol=0, atol=0)
    torch.testing.assert_close(sdpa(q, q, q, backend="reference"), F.scaled_dot_product_attention(q, q, q))


def test_sdpa_empty_heads_and_head_dim_go_to_torch():
    """torch returns an empty result for H = 0 or D = 0; sdpa raised a misleading "Hk=0 must divide H=0"."""
    for shape in [(1, 0, 4, 8), (1, 2, 4, 0), (0, 2, 4, 8)]:
        x = torch.randn(shape)
        assert sdpa(x, x, x).shape == F.scaled_dot_product_attention(x, x, x).shape == shape
    with pytest.raises(ValueError, match=r"q: expected at least one head \(H >= 1\)"):
        attention(torch.randn(1, 4, 0, 8), torch.randn(1, 4, 0, 8), torch.randn(1, 4, 0, 8))
    with pytest.raises(ValueError, match=r"k: expected at least one head \(Hk >= 1\)"):
        attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 0, 8), torch.randn(1, 4, 0, 8))


def test_torch_func_transforms():
    """torch.func.grad / jacrev / vmap: the custom ops raised torch's 'setup_context' error and the
    seed draw (.item()) failed under vmap. The reference runs there; gradients equal eager
    autograd's, vmap equals a Python loop, and a seed drawn under vmap(randomness="different") is
    one per sample (the loop with those seeds)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, h, 8, generator=g) for h in (4, 2, 2))
    kw = dict(causal=True, seqlens=torch.tensor([6, 4]))
    w = torch.randn(2, 6, 4, 8, generator=g)
    got = torch.func.grad(lambda a, b, c: (attention(a, b, c, **kw) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    (attention(*leaves, **kw) * w).sum().backward()  # eager: the cpu backend
    for a, b in zip(got, leaves):
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-6)
    jac = torch.func.jacrev(lambda a: attention(a, k[:1, :3], v[:1, :3], causal=True))(q[:1, :3])
    want = torch.autograd.functional.jacobian(lambda a: attention(a, k[:1, :3], v[:1, :3], causal=True), q[:1, :3])
    torch.testing.assert_close(jac, want, rtol=1e-5, atol=1e-6)
    stacked = torch.stack([q, q.flip(1)])
    torch.testing.assert_close(torch.func.vmap(lambda a: attention(a, k, v, **kw))(stacked),
                               torch.stack([attention(a, k, v, **kw) for a in stacked]), rtol=1e-5, atol=1e-6)
    # sdpa draws its dropout seed when given none: one per sample under randomness="different"
    x = torch.randn(3, 2, 4, 5, 8, generator=g)
    torch.manual_seed(4)
    seeds = torch.randint(0, 2**62, (3,)).tolist()
    loop = torch.stack([sdpa(x[i], x[i], x[i], dropout_p=0.3, seed=s) for i, s in enumerate(seeds)])
    torch.manual_seed(4)
    got = torch.func.vmap(lambda a: sdpa(a, a, a, dropout_p=0.3), randomness="different")(x)
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-6)
    with pytest.raises(fastpt.BackendError, match="torch.func transform"):
        torch.func.grad(lambda a: attention(a, k, v, backend="cpu").sum())(q)


def test_meta_tensors_infer_shapes():
    """Meta tensors (shape inference, as torch's SDPA does): the autocast probe raised 'unknown device
    type for autocast', the reference's autocast context 'unsupported scalarType', and under the
    Triton interpreter (TRITON_INTERPRET=1) the kernels took them. Now the reference infers the
    shapes, also of meta index tensors (no values to check) and under an active autocast."""
    assert "meta" in fastpt._dispatch.triton_device_refusal(torch.device("meta"))
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    q, k = m(2, 5, 4, 8), m(2, 5, 2, 8)
    inputs, _ = attn._prepare(q, k, k, causal=True, prefix_lens=None, seqlens=None, cu_seqlens=None,
                              max_seqlen=None, dropout_p=0.0, scale=None, seed=0, deterministic=False)
    assert attn.OP.select(**inputs).name == "reference"
    for kw in (dict(causal=True), dict(seqlens=torch.tensor([5, 3], device="meta")),
               dict(prefix_lens=torch.tensor([2, 3], device="meta"), dropout_p=0.2, seed=1)):
        out = attention(q, k, k, **kw)
        assert out.shape == q.shape and out.device.type == "meta"
    packed = attention(m(7, 4, 8), m(7, 2, 8), m(7, 2, 8), cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32,
                                                                                    device="meta"))
    assert packed.shape == (7, 4, 8)
    t = m(2, 4, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sdpa(t, t, t, is_causal=True).shape == F.scaled_dot_product_attention(t, t, t, is_causal=True).shape
    leaf = m(2, 4, 5, 8).requires_grad_(True)
    sdpa(leaf, leaf, leaf).sum().backward()
    assert leaf.grad.shape == leaf.shape


def test_forward_mode_transforms_fall_back_from_torchs_sdpa(monkeypatch):
    """Under torch.func transforms the sdpa backend (torch's own op) stays in line, but torch's flash /
    cuDNN kernels have no forward-AD formula: jvp / jacfwd / hessian raised NotImplementedError on CUDA.
    The backend now hands those to the reference. CPU stand-in: the sdpa backend let through on CPU, where
    torch's flash kernel for the CPU has no forward-AD formula either."""
    import dataclasses

    from fastpt import _dispatch

    op = _dispatch.OPS["attention"]
    sdpa_backend = op.backends["sdpa"]
    monkeypatch.setitem(op.backends, "sdpa", dataclasses.replace(
        sdpa_backend, available=lambda: None, supports=lambda q4, rows, **kw: None if rows is not None else "mask"))
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=gen) for _ in range(3))

    def f(x):
        return attention(x, k, v, causal=True)

    want = attention(q, k, v, causal=True, backend="reference")
    tangent = torch.randn(q.shape, generator=gen)
    out, jvp_out = torch.func.jvp(f, (q,), (tangent,))
    _, ref_jvp = torch.func.jvp(lambda x: attention(x, k, v, causal=True, backend="reference"), (q,), (tangent,))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(jvp_out, ref_jvp)
    torch.testing.assert_close(torch.func.jacfwd(f)(q), torch.func.jacrev(f)(q))


def test_cpu_nan_rows_cost_one_sum_of_finite_q():
    """The cpu backend's NaN-row handling ran ``q.isnan().any(-1)`` (a bool tensor of q's size, then a
    host read) on every forward: 20-85% on top of torch's kernel at ViT shapes. A finite q now costs
    one sum of q. The exact per-row handling still runs when the sum is NaN: NaN query rows come out
    NaN on short and long rows (torch's kernel returns 0 on the first, NaN on the second), and the
    sum's false alarm (+inf and -inf in the padding, no NaN) leaves real rows as they were."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 33, 2, 16, generator=gen) for _ in range(3))
    with torch.profiler.profile(record_shapes=True) as prof:
        attention(q, k, v, backend="cpu")
    scans = [e.name for e in prof.events() if e.name in ("aten::isnan", "aten::ne") and list(q.shape) in e.input_shapes]
    assert not scans, scans

    for s in (13, 128):
        q, k, v = (torch.randn(2, s, 2, 16, generator=gen) for _ in range(3))
        q[1, s // 2, 1, 3] = float("nan")
        for kw in ({}, {"seqlens": torch.tensor([s, s - 1])}):
            out = attention(q, k, v, backend="cpu", **kw)
            ref = attention(q.double(), k.double(), v.double(), backend="reference", **kw)
            assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 16, (s, kw)
            torch.testing.assert_close(out.nan_to_num(), ref.float().nan_to_num(), rtol=2e-5, atol=2e-5)

    seqlens = torch.tensor([33, 20])
    pad = (torch.arange(33)[None, :] >= seqlens[:, None])[..., None, None]
    q, k, v = (torch.randn(2, 33, 2, 16, generator=gen) for _ in range(3))
    alarm = q.masked_fill(pad, float("inf"))
    alarm[1, 25:] = float("-inf")
    assert torch.isnan(alarm.sum()) and not alarm.isnan().any()
    out = attention(alarm, k, v, seqlens=seqlens, backend="cpu")
    assert torch.equal(out, attention(q, k, v, seqlens=seqlens, backend="cpu"))
    assert not out.masked_select(pad).any()
