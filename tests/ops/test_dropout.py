"""dropout: bit-identical on every backend, the documented mask, right rate, exact gradients."""
import importlib
import math
import warnings

import pytest
import torch

import fastpt
from fastpt import _native
from fastpt.ops import _rng, dropout
from tests.helpers import backend_grid

drop = importlib.import_module("fastpt.ops.dropout")  # the module (the package exports the function)
attn = importlib.import_module("fastpt.ops.attention")
attn_cpu = importlib.import_module("fastpt.ops.attention_cpu")

GRID = backend_grid("dropout")
NATIVE = pytest.mark.skipif(_native.cpu_unavailable() is not None, reason="fastpt._C is not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    """The raw bits, so that equality is exact (NaN == NaN, -0 != +0)."""
    return t.contiguous().view(INT_VIEW[t.element_size()])


def _skip_refused(backend, x):
    """Skip where the backend declines these inputs (triton takes no float64)."""
    why = drop.OP.backends[backend].supports(x=x, key=0, p=0.5)
    if why is not None:
        pytest.skip(f"{backend}: {why}")


def _binomial_ok(k, n, p, sigmas=5.0):
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (17,), (1000,), (65537,), (3, 65536 + 5), (7, 203, 3)])
def test_backends_bit_identical(device, backend, dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(device, dtype)
    _skip_refused(backend, x)
    out = dropout(x, 0.3, seed=2**40 + 7, backend=backend)
    ref = dropout(x, 0.3, seed=2**40 + 7, backend="reference")
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(_bits(out), _bits(ref))


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [1e-7, 0.1, 1 / 3])
def test_every_half_value(dtype, p):
    """All 65536 bit patterns (subnormals, overflow to inf, NaN): the C++ conversions round as torch does."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    out, ref = dropout(x, p, seed=1, backend="cpu"), dropout(x, p, seed=1, backend="reference")
    same = (_bits(out) == _bits(ref)) | (out.isnan() & ref.isnan())
    assert same.all(), x[~same][:5]


@pytest.mark.parametrize("device,backend", GRID)
def test_mask_is_the_contract(device, backend):
    """Element i is kept iff bits(key, i // 65536, i % 65536) >> 8 >= threshold24(p), computed here
    with the scalar hash; kept ones are exactly x * float32(1 / (1 - p))."""
    n, p, seed = 2 * 65536 + 300, 0.4, 1234
    x = (torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5).to(device)
    out = dropout(x, p, seed=seed, backend=backend).cpu()
    key, thr = _rng.stream_key(seed, _rng.STREAM_DROPOUT), _rng.threshold24(p)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    for i in list(range(40)) + list(range(65530, 65545)) + list(range(n - 40, n)):
        kept = (_rng.mix32_int(_rng.mix32_int(key ^ (i >> 16)) ^ (((i & 0xFFFF) * 0x61C88647) & 0xFFFFFFFF)) >> 8) >= thr
        assert out[i].item() == ((x[i].cpu() * scale).item() if kept else 0.0), i


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_rate_and_scale(device, backend, p):
    n = 200_003
    x = (torch.rand(n, generator=torch.Generator().manual_seed(3)) + 0.5).to(device)  # never 0
    out = dropout(x, p, seed=11, backend=backend)
    kept = out != 0
    assert _binomial_ok(int((~kept).sum()), n, p)
    assert torch.equal(out[kept], x[kept] * (1 / (1 - p)))


@pytest.mark.parametrize("device,backend", GRID)
def test_seeds(device, backend):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)).to(device)
    a = dropout(x, 0.5, seed=7, backend=backend)
    assert torch.equal(a, dropout(x, 0.5, seed=7, backend=backend))
    differ = ((a == 0) != (dropout(x, 0.5, seed=8, backend=backend) == 0)).float().mean().item()
    assert 0.4 < differ < 0.6  # independent masks disagree on 2 p (1 - p) of the elements
    # seed=None: drawn from torch's default generator, so torch.manual_seed reproduces it
    torch.manual_seed(5)
    b = dropout(x, 0.5, backend=backend)
    c = dropout(x, 0.5, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(b, dropout(x, 0.5, backend=backend)) and not torch.equal(b, c)


@pytest.mark.parametrize("device,backend", GRID)
def test_noncontiguous_and_leading_dims(device, backend):
    """The mask follows the logical (row-major) order, whatever the strides."""
    x = torch.randn(300, 257, generator=torch.Generator().manual_seed(2)).to(device)
    t = x.t()  # a transposed view
    out = dropout(t, 0.25, seed=3, backend=backend)
    assert out.shape == t.shape and torch.equal(out, dropout(t.contiguous(), 0.25, seed=3, backend=backend))
    flat = dropout(x.reshape(-1), 0.25, seed=3, backend=backend)
    assert torch.equal(dropout(x, 0.25, seed=3, backend=backend).reshape(-1), flat)
    assert torch.equal(dropout(x[:, ::2], 0.25, seed=3, backend=backend),
                       dropout(x[:, ::2].contiguous(), 0.25, seed=3, backend=backend))


@pytest.mark.parametrize("device,backend", GRID)
def test_gradcheck(device, backend):
    """With a fixed seed the mask is a constant: the gradient is exact (float64; the reference with
    plain autograd, cpu through the custom op's registered backward)."""
    x = torch.randn(7, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    _skip_refused(backend, x)  # triton: no float64; test_triton_* check its gradient bit for bit
    assert torch.autograd.gradcheck(lambda x: dropout(x, 0.4, seed=3, backend=backend), (x.requires_grad_(),))


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_is_the_same_masked_scaling(device, backend, dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 70001, generator=g).to(device, dtype).requires_grad_()
    _skip_refused(backend, x)
    up = torch.randn(3, 70001, generator=g).to(device, dtype)
    out = dropout(x, 0.35, seed=9, backend=backend)
    out.backward(up)
    assert torch.equal(_bits(x.grad), _bits(dropout(up, 0.35, seed=9, backend="reference")))
    x2 = x.detach().clone().requires_grad_()
    dropout(x2, 0.35, seed=9, backend="reference").backward(up)
    assert torch.equal(_bits(x.grad), _bits(x2.grad))
    # a broadcast upstream gradient (stride 0) is served too
    x3 = x.detach().clone().requires_grad_()
    dropout(x3, 0.35, seed=9, backend=backend).sum().backward()
    assert torch.equal(x3.grad, dropout(torch.ones_like(x3), 0.35, seed=9, backend="reference"))


@pytest.mark.parametrize("device,backend", GRID)
def test_identity_cases(device, backend):
    x = torch.randn(4, 5, device=device)
    assert dropout(x, 0.0, seed=1, backend=backend) is x
    assert dropout(x, 0.7, training=False, backend=backend) is x
    empty = torch.empty(0, 3, device=device)
    assert dropout(empty, 0.5, backend=backend) is empty
    state = torch.get_rng_state()
    dropout(x, 0.0, backend=backend)  # no seed drawn when nothing is dropped
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=[1.0]), TypeError, "x: expected a torch.Tensor"),
    (dict(x=torch.ones(3, dtype=torch.int64)), TypeError, "x: expected a float16, bfloat16, float32 or float64 tensor"),
    (dict(p=1.0), ValueError, "p: expected a probability in \\[0, 1\\)"),
    (dict(p=-0.1), ValueError, "p: expected a probability"),
    (dict(p=float("nan")), ValueError, "p: expected a probability"),
    (dict(p="half"), TypeError, "p: expected a float"),
    (dict(seed=-1), ValueError, "seed: expected 0 <= seed < 2\\*\\*64"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed: expected an int"),
    (dict(backend="gpu"), ValueError, "backend: expected one of"),
    (dict(backend="cuda"), fastpt.BackendError, "does not implement"),
])
def test_bad_arguments(kwargs, err, match):
    args = dict(x=torch.randn(4), p=0.5, seed=0) | kwargs
    with pytest.raises(err, match=match):
        dropout(args.pop("x"), args.pop("p"), **args)


@NATIVE
def test_native_checks_sizes():
    """The C++ entry points re-check what they index and raise instead of crashing."""
    C = _native._C
    x, out = torch.randn(8), torch.empty(8)
    with pytest.raises(ValueError, match="dtype code"):
        C.dropout_cpu(x.data_ptr(), out.data_ptr(), 8, _native.dtype_code(torch.int32), 0, 100, 2.0, 1)
    with pytest.raises(ValueError, match="overlap"):
        C.dropout_cpu(x.data_ptr(), x.data_ptr() + 4, 4, _native.dtype_code(torch.float32), 0, 100, 2.0, 1)
    with pytest.raises(ValueError, match="threshold24"):
        C.dropout_cpu(x.data_ptr(), out.data_ptr(), 8, _native.dtype_code(torch.float32), 0, (1 << 24) + 1, 2.0, 1)
    with pytest.raises(ValueError, match="negative"):
        C.dropout_cpu(x.data_ptr(), out.data_ptr(), -1, _native.dtype_code(torch.float32), 0, 100, 2.0, 1)
    with pytest.raises(ValueError, match="null"):
        C.dropout_cpu(0, out.data_ptr(), 8, _native.dtype_code(torch.float32), 0, 100, 2.0, 1)
    probs, pout, docs = torch.rand(2, 3, 4, 4), torch.empty(2, 3, 4, 4), torch.tensor([0, 2**31])
    with pytest.raises(ValueError, match="doc_ids\\[1\\]"):  # 2**31 * 3 heads does not fit 32 bits
        C.attention_dropout_cpu(probs.data_ptr(), pout.data_ptr(), docs.data_ptr(), 2, 3, 4,
                                _native.dtype_code(torch.float32), 0, 100, 2.0, 1)
    with pytest.raises(ValueError, match="negative shape"):
        C.attention_dropout_cpu(probs.data_ptr(), pout.data_ptr(), docs.data_ptr(), 2, -3, 4,
                                _native.dtype_code(torch.float32), 0, 100, 2.0, 1)


@NATIVE
def test_custom_op_registration():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 37, dtype=dtype, requires_grad=True)
        torch.library.opcheck(drop._dropout_op, (x, _rng.stream_key(3, _rng.STREAM_DROPOUT), 0.3, "cpu", None))
        # a key traced under torch.compile: a 0-d tensor read inside the op
        key_t = _rng.stream_key_tensor(torch.tensor(3), _rng.STREAM_DROPOUT)
        torch.library.opcheck(drop._dropout_op, (x, 0, 0.3, "cpu", key_t))
        assert torch.equal(drop._dropout_op(x, 0, 0.3, "cpu", key_t), dropout(x, 0.3, seed=3, backend="cpu"))


@NATIVE
def test_torch_compile_full_graph():
    def step(x):
        return (dropout(x, 0.3, seed=5) * 2).sum()

    x = torch.randn(6, 1001, generator=torch.Generator().manual_seed(0), requires_grad=True)
    eager = step(x)
    eager.backward()
    want, x.grad = x.grad, None
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache.*")  # torch 2.11 fails where newer Dynamo warns
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x)  # raises on a graph break
        compiled.backward()
        assert torch._dynamo.explain(step)(x).graph_break_count == 0
    assert torch.equal(compiled, eager) and torch.equal(x.grad, want)


def test_torch_compile_traced_seeds():
    """Under torch.compile a tensor seed stays in the graph and gives the mask of its value (the
    reference formula, bit-identical to the kernels); seed=None draws a fresh one each call."""
    x = torch.randn(7, 301, generator=torch.Generator().manual_seed(1), requires_grad=True)
    seed = torch.tensor(2**33 + 5)

    def given(x, seed):
        return dropout(x, 0.3, seed=seed)

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache.*")
        compiled = torch.compile(given, backend="aot_eager", fullgraph=True)(x, seed)
        assert torch._dynamo.explain(lambda x: dropout(x, 0.3))(x).graph_break_count == 0
        fresh = torch.compile(lambda x: dropout(x, 0.3), backend="aot_eager", fullgraph=True)
        a, b = fresh(x), fresh(x)
    assert torch.equal(compiled, dropout(x, 0.3, seed=int(seed)))
    compiled.sum().backward()
    assert torch.equal(x.grad, (compiled != 0) * drop._scale(0.3))
    assert not torch.equal(a == 0, b == 0)  # not one seed baked into the graph
    for out in (a, b):
        assert abs((out == 0).float().mean().item() - 0.3) < 0.03
    # Dynamo wraps the TypeError under fullgraph; the message still names the argument
    with pytest.raises(Exception, match="seed: expected an integer or a one-element integer tensor"):
        torch.compile(given, backend="aot_eager", fullgraph=True)(x, torch.tensor([1.5]))


# ----------------------------------------------------------------------------- triton


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through TRITON_INTERPRET=1
TRITON = pytest.mark.skipif(
    drop.OP.backends["triton"].available() is not None
    or drop.OP.backends["triton"].supports(**drop.OP.probe(TRITON_DEVICE)) is not None,
    reason="Triton cannot run here (no CUDA device and TRITON_INTERPRET is not set)")
HALF = [torch.float16, torch.bfloat16]


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (17,), (1000,), (65537,), (3, 65536 + 5)])
def test_triton_bit_identical_forward_backward(dtype, shape):
    """The kernel is the reference bit for bit, forward and (same mask, recomputed) backward."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(TRITON_DEVICE, dtype)
    up = torch.randn(shape, generator=g).to(TRITON_DEVICE, dtype)
    xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = dropout(xt, 0.3, seed=2**40 + 7, backend="triton")
    ref = dropout(xr, 0.3, seed=2**40 + 7, backend="reference")
    assert out.dtype == dtype and out.is_contiguous() and torch.equal(_bits(out), _bits(ref))
    out.backward(up)
    ref.backward(up)
    assert torch.equal(_bits(xt.grad), _bits(xr.grad))


@TRITON
@pytest.mark.filterwarnings("ignore:.*encountered in multiply:RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("p", [0.1, 1 / 3])
def test_triton_every_half_value(dtype, p):
    """All 65536 bit patterns (subnormals, overflow to inf, NaN): rounded as torch rounds, +0 where dropped."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(TRITON_DEVICE)
    out, ref = dropout(x, p, seed=1, backend="triton"), dropout(x, p, seed=1, backend="reference")
    same = (_bits(out) == _bits(ref)) | (out.isnan() & ref.isnan())
    assert same.all(), x[~same][:5]


@TRITON
def test_triton_int64_offsets_are_the_same_mask():
    """The BIG (int64 offsets) variant, taken from 2**31 elements on, computes what the int32 one does."""
    dt = importlib.import_module("fastpt.ops.dropout_triton")
    x = torch.randn(3 * 65536 + 11, generator=torch.Generator().manual_seed(5)).to(TRITON_DEVICE)
    key, thr, scale = _rng.stream_key(9, _rng.STREAM_DROPOUT), _rng.threshold24(0.25), 1 / 0.75
    out = torch.empty_like(x)
    block = dt.GPU_BLOCK if x.is_cuda else dt.INTERPRET_BLOCK
    grid = (math.ceil(x.numel() / block),)
    dt._dropout_kernel[grid](x, out, x.numel(), _rng.signed32(key), thr, scale, BLOCK=block, BIG=True)
    assert torch.equal(out, dt.run(x, key, thr, scale))
    assert torch.equal(out, dropout(x, 0.25, seed=9, backend="reference"))


def test_dispatch_order():
    """CPU tensors go to the C++ kernel before Triton (which takes them under TRITON_INTERPRET=1);
    CUDA tensors to Triton before the reference; float64 never to Triton."""
    cpu = "cpu" if _native.cpu_unavailable() is None else None
    for dtype in DTYPES:
        x = torch.randn(8, dtype=dtype)
        assert cpu is None or drop.OP.select(x=x, key=0, p=0.5).name == "cpu"
    assert "float64" in drop.OP.backends["triton"].supports(x=torch.randn(8, dtype=torch.float64), key=0, p=0.5)
    if torch.cuda.is_available() and drop.OP.backends["triton"].available() is None:
        for dtype, want in [(torch.float32, "triton"), (torch.bfloat16, "triton"), (torch.float64, "reference")]:
            assert drop.OP.select(x=torch.randn(8, device="cuda", dtype=dtype), key=0, p=0.5).name == want


@TRITON
def test_triton_custom_op_registration():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 37, dtype=dtype, device=TRITON_DEVICE, requires_grad=True)
        torch.library.opcheck(drop._dropout_op, (x, _rng.stream_key(3, _rng.STREAM_DROPOUT), 0.3, "triton", None))


# ----------------------------------------------------------------------------- attention probabilities


@NATIVE
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 37), (2, 3, 130)])
def test_attention_dropout_is_the_torch_formula(dtype, shape):
    """The C++ kernel reproduces ops/attention.py's torch formula bit for bit, forward and backward."""
    n, h, length = shape
    g = torch.Generator().manual_seed(n * length)
    probs = torch.rand(n, h, length, length, generator=g).to(dtype).requires_grad_()
    up = torch.randn(n, h, length, length, generator=g).to(dtype)
    doc = torch.tensor([5, 0, 9])[:n]
    key = _rng.stream_key(7, _rng.STREAM_ATTN_DROPOUT)
    out = drop.attention_dropout(probs, doc, h, key, 0.3)
    (grad,) = torch.autograd.grad(out, probs, up)
    want = attn_cpu._drop_probs_torch(probs, doc, key, 0.3)
    (want_grad,) = torch.autograd.grad(want, probs, up)
    assert out.dtype == dtype and torch.equal(out, want.to(dtype)) and torch.equal(grad, want_grad)


@NATIVE
def test_attention_dropout_matches_dropout_keep():
    """Documents numbered as in the docs table: the mask is dropout_keep's (the reference's)."""
    s, h, p, key = 23, 2, 0.4, _rng.stream_key(3, _rng.STREAM_ATTN_DROPOUT)
    docs = torch.tensor([[0, 0, s, s], [1, 0, s, s]], dtype=torch.int32)
    keep = attn.dropout_keep(docs, h, s, key, p)  # (B, H, S, S)
    out = drop.attention_dropout(torch.ones(2, h, s, s), torch.tensor([0, 1]), h, key, p)
    assert torch.equal(out != 0, keep)


@NATIVE
def test_attention_dropout_gradcheck():
    probs = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    key = _rng.stream_key(2, _rng.STREAM_ATTN_DROPOUT)
    assert torch.autograd.gradcheck(lambda t: drop.attention_dropout(t, torch.tensor([1, 4]), 3, key, 0.3),
                                    (probs.requires_grad_(),))


def _rows_layout(b, s, g):
    """doc / local (B, S) int64 of rows cut into documents of random lengths (index n over all
    rows, as in the attention's docs table) with right padding (-1)."""
    doc, local, n = torch.full((b, s), -1), torch.zeros(b, s, dtype=torch.int64), 0
    for r in range(b):
        cuts = sorted(torch.randint(0, s + 1, (3,), generator=g).tolist())  # the last piece is padding
        for a, e in zip([0] + cuts[:-1], cuts):
            doc[r, a:e], local[r, a:e], n = n + 5, torch.arange(e - a), n + 1
    return doc, local


@NATIVE
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 37), (2, 3, 130)])
def test_attention_dropout_rows_is_the_torch_formula(dtype, shape):
    """The whole-row C++ kernel reproduces its torch formula bit for bit, forward and backward."""
    b, h, s = shape
    g = torch.Generator().manual_seed(b * s)
    probs = torch.rand(b, h, s, s, generator=g).to(dtype).requires_grad_()
    up = torch.randn(b, h, s, s, generator=g).to(dtype)
    doc, local = _rows_layout(b, s, g)
    key = _rng.stream_key(7, _rng.STREAM_ATTN_DROPOUT)
    out = drop.attention_dropout_rows(probs, doc, local, key, 0.3)
    (grad,) = torch.autograd.grad(out, probs, up)
    want = drop.attention_dropout_rows_torch(probs, doc, local, key, 0.3)
    (want_grad,) = torch.autograd.grad(want, probs, up)
    assert out.dtype == want.dtype == dtype
    assert torch.equal(_bits(out), _bits(want)) and torch.equal(_bits(grad), _bits(want_grad))


@NATIVE
def test_attention_dropout_rows_is_attention_dropout_per_document():
    """Each document's block of a row is what the per-document kernel makes of it; the rest is 0."""
    b, h, s = 3, 2, 45
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(b, h, s, s, generator=g)
    doc, local = _rows_layout(b, s, g)
    key = _rng.stream_key(5, _rng.STREAM_ATTN_DROPOUT)
    out = drop.attention_dropout_rows(probs, doc, local, key, 0.4)
    seen = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        for d in doc[r].unique().tolist():
            if d < 0:
                continue
            at = (doc[r] == d).nonzero()[:, 0]
            a, e = int(at[0]), int(at[-1]) + 1
            block = drop.attention_dropout(probs[r:r + 1, :, a:e, a:e], torch.tensor([d]), h, key, 0.4)
            assert torch.equal(out[r:r + 1, :, a:e, a:e], block)
            seen[r, :, a:e, a:e] = True
    assert not out.masked_select(~seen.expand_as(out)).any()


@NATIVE
def test_attention_dropout_rows_gradcheck():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    doc, local = _rows_layout(2, 6, g)
    key = _rng.stream_key(2, _rng.STREAM_ATTN_DROPOUT)
    assert torch.autograd.gradcheck(lambda t: drop.attention_dropout_rows(t, doc, local, key, 0.3), (probs,))


@NATIVE
def test_attention_dropout_rows_rejects_bad_input():
    """Shapes are checked in Python, values and sizes again in C++: ValueError, never a crash."""
    C, f32 = _native._C, _native.dtype_code(torch.float32)
    probs, out = torch.rand(2, 3, 4, 4), torch.empty(2, 3, 4, 4)
    doc, local = torch.zeros(2, 4, dtype=torch.int64), torch.arange(4).repeat(2, 1)
    with pytest.raises(ValueError, match="doc, local"):
        drop.attention_dropout_rows(probs, doc[:, :3], local, 0, 0.3)
    with pytest.raises(ValueError, match="doc, local"):
        drop.attention_dropout_rows(probs[..., :3], doc, local, 0, 0.3)

    def call(doc=doc, local=local, batch=2, heads=3, length=4, dtype=f32, out=out):
        C.attention_dropout_rows_cpu(probs.data_ptr(), out.data_ptr(), doc.data_ptr(), local.data_ptr(), batch,
                                     heads, length, dtype, 0, 100, 2.0, 1)

    call()  # the valid call these variants break
    with pytest.raises(ValueError, match="negative shape"):
        call(heads=-3)
    with pytest.raises(ValueError, match=r"doc\[1, 2\] = -2"):
        call(doc=doc.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(-2)))
    with pytest.raises(ValueError, match=r"doc\[0, 0\] = 2147483648"):  # 2**31 * 3 heads does not fit 32 bits
        call(doc=doc.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(2**31)))
    with pytest.raises(ValueError, match=r"local\[0, 3\] = 4 outside"):
        call(local=local + 1)
    with pytest.raises(ValueError, match="dtype code"):
        call(dtype=_native.dtype_code(torch.int32))
    with pytest.raises(ValueError, match="overlap"):
        call(out=probs)
    with pytest.raises(ValueError, match="null"):
        call(doc=torch.empty(0, dtype=torch.int64))


def test_torch_func_transforms():
    """Under torch.func.grad / vmap the custom op (no functorch rule) raised torch's 'setup_context'
    error and the seed draw (.item()) failed under vmap: the reference runs, the seed follows vmap's
    randomness mode, and the results equal a Python loop with the same seeds."""
    x = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    seeds = torch.randint(0, 2**62, (3,)).tolist()  # what vmap(randomness="different") draws: one per sample
    loop = torch.stack([dropout(x[i], 0.5, seed=s) for i, s in enumerate(seeds)])
    torch.manual_seed(5)
    got = torch.func.vmap(lambda a: dropout(a, 0.5), randomness="different")(x)
    assert torch.equal(got, loop) and not torch.equal(got[0] != 0, got[1] != 0)
    torch.manual_seed(5)
    same = torch.func.vmap(lambda a: dropout(a, 0.5), randomness="same")(x)
    torch.manual_seed(5)
    shared = int(torch.randint(0, 2**62, ()))
    assert torch.equal(same, torch.stack([dropout(x[i], 0.5, seed=shared) for i in range(3)]))
    with pytest.raises(RuntimeError, match="randomness"):  # torch's own rule, as for F.dropout
        torch.func.vmap(lambda a: dropout(a, 0.5))(x)
    # an explicit seed: the same mask for every sample, as in the loop
    fixed = torch.func.vmap(lambda a: dropout(a, 0.5, seed=9))(x)
    assert torch.equal(fixed, torch.stack([dropout(x[i], 0.5, seed=9) for i in range(3)]))
    # grad: the mask of the eager call after the same manual_seed, and its gradient
    w = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(8)
    got = torch.func.grad(lambda a: (dropout(a, 0.3) * w).sum())(x[0])
    torch.manual_seed(8)
    a = x[0].clone().requires_grad_(True)
    (dropout(a, 0.3) * w).sum().backward()
    assert torch.equal(got, a.grad)
    with pytest.raises(fastpt.BackendError, match="torch.func transform"):
        torch.func.grad(lambda a: dropout(a, 0.3, seed=1, backend="cpu").sum())(x[0])
