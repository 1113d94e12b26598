"""Tiled contrastive losses: every backend against the float64 materialised references.

Accuracy follows the FlashAttention rule: for the loss and every gradient,
``max|kernel - ref64| <= 2 * max|ref_lowp - ref64| + floor``, where ``ref_lowp`` is the same
materialised reference run in the kernel's input dtype and ``floor`` = one ulp of the result's own
dtype (a bf16 gradient cannot be closer than its rounding; a bf16 reference can round luckily)
plus a few float32 ulps (an fp32 reference can be exact by luck on tiny inputs), both relative to
the largest reference value. Where the exact value is 0 (one query, one key: every gradient
vanishes) the unit is the loss scale.
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fastpt
import fastpt.nn
from fastpt.ops import clip_loss, contrastive, info_nce, nt_xent
from fastpt.ops.contrastive import clip_loss_reference, info_nce_reference, nt_xent_reference
from tests.helpers import backend_grid

GRID = backend_grid("contrastive")  # (device, backend) pairs usable here
IDS = [f"{dev}-{b}" for dev, b in GRID]
BACKENDS = [b for _, b in GRID]
LOWP = [torch.float32, torch.bfloat16]
INTERPRETED = fastpt._native.triton_interpreting()


def _rand(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _to(obj, device, dtype=None):
    """Tensors (also inside tuples / dicts) moved to device; float ones cast to dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if dtype is not None and obj.dtype.is_floating_point else obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _grads(fn, tensors, dtype, device="cpu", scalar_dtype=None):
    """Loss and gradients (on the CPU) of fn(*tensors) with the leaves cast to dtype on device (0-dim
    leaves, the temperature or logit_scale, to ``scalar_dtype`` when given)."""
    leaves = [t.detach().to(device=device, dtype=scalar_dtype if scalar_dtype and t.dim() == 0 else dtype)
              .requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach().cpu()] + [leaf.grad.cpu() for leaf in leaves]


def _assert_rule(name, got, ref64, ref_lowp, unit, ulps=8.0):
    out_eps = torch.finfo(got.dtype).eps
    got, ref64, ref_lowp = got.double(), ref64.double(), ref_lowp.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).abs().max().item()
    err_lowp = (ref_lowp - ref64).abs().max().item()
    floor = (out_eps + ulps * torch.finfo(torch.float32).eps) * (ref64.abs().max().item() or unit)
    assert err <= 2 * err_lowp + floor, f"{name}: error {err:.3e} > 2 * {err_lowp:.3e} + {floor:.1e}"


def _check(kernel_fn, ref_fn, tensors, dtype, names, device="cpu", scalar_dtype=None):
    """``scalar_dtype``: the dtype of a 0-dim leaf (temperature, logit_scale) in the low-precision runs, float32
    for a float32 parameter with bf16 embeddings (the reference math stays in ``dtype`` then)."""
    ref64 = _grads(ref_fn, tensors, torch.float64)
    ref_lowp = _grads(ref_fn, tensors, dtype, device, scalar_dtype)  # the same math in the kernel's dtype and device
    got = _grads(kernel_fn, tensors, dtype, device, scalar_dtype)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    unit = max(1.0, abs(ref64[0].item()))
    for name, g, r, rl in zip(["loss"] + names, got, ref64, ref_lowp):
        assert g.shape == r.shape
        _assert_rule(name, g, r, rl, unit)


def _small(backend):
    """Triton under the interpreter costs milliseconds per loop step: small shapes there."""
    return backend == "triton" and INTERPRETED


def _shapes(backend):
    if _small(backend):  # still crossing the 32-row / 32-column / 64-feature block edges
        return [(1, 17), (3, 17), (45, 80), (97, 128)]
    return [(1, 17), (3, 17), (97, 128), (1000, 768)]


SHAPE_GRID = [(dev, b, n, d) for dev, b in GRID for n, d in _shapes(b)]


@pytest.mark.parametrize("device,backend,n,d", SHAPE_GRID)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_sizes_and_temperature_grad(device, backend, n, d, dtype, symmetric):
    # symmetric at N = 97: several row blocks per program, so column statistics accumulate across them
    q, k = _rand((n, d), 1), _rand((n, d), 2)
    temp = torch.tensor(0.2, dtype=torch.float64)
    names = ["grad_query", "grad_key", "grad_temperature"]
    _check(lambda a, b, t: info_nce(a, b, temperature=t, normalize=True, symmetric=symmetric, backend=backend),
           lambda a, b, t: info_nce_reference(a, b, temperature=t, normalize=True, symmetric=symmetric),
           [q, k, temp], dtype, names, device)


def _options():
    """(name, kwargs builder, N, M): the options users combine, on sizes that cross tile edges."""
    n, m = 45, 38
    labels_q = torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(3))
    labels_k = torch.cat([torch.arange(6), torch.randint(0, 6, (m - 6,), generator=torch.Generator().manual_seed(4))])
    repeated = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(5))
    return {
        "plain_raw_dot": (dict(temperature=0.5), n, n),
        "symmetric": (dict(temperature=0.3, symmetric=True, normalize=True), n, n),
        "repeated_labels_symmetric": (dict(temperature=0.3, labels=repeated, symmetric=True, normalize=True), n, n),
        "label_pair_n_ne_m": (dict(temperature=0.1, labels=(labels_q, labels_k), normalize=True), n, m),
        "label_pair_symmetric": (dict(temperature=0.1, labels=(labels_q, labels_k), symmetric=True), n, m),
        "queue": (dict(temperature=0.2, normalize=True, queue=_rand((70, 24), 6)), n, n),
        "queue_labels_symmetric": (dict(temperature=0.2, labels=repeated, symmetric=True, queue=_rand((33, 24), 7)),
                                   n, n),
    }


OPTIONS = _options()


@pytest.mark.parametrize("device,backend", GRID, ids=IDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", LOWP)
def test_info_nce_options(device, backend, option, dtype):
    """Loss, embedding gradients and d loss / d temperature of every option, the temperature a float32 tensor
    (a learnable parameter beside bf16 embeddings). It was a Python float here, so the SupCon positives' share
    of its gradient (labels) and the queue's went unchecked: a zeroed positive term (45% off) passed."""
    kwargs, n, m = OPTIONS[option]
    kwargs = dict(kwargs)
    temp = torch.tensor(kwargs.pop("temperature"), dtype=torch.float64)
    q, k = _rand((n, 24), 10), _rand((m, 24), 11)
    _check(lambda a, b, t: info_nce(a, b, temperature=t, backend=backend, **_to(kwargs, a.device, a.dtype)),
           lambda a, b, t: info_nce_reference(a, b, temperature=t, **_to(kwargs, a.device, a.dtype)), [q, k, temp],
           dtype, ["grad_query", "grad_key", "grad_temperature"], device, scalar_dtype=torch.float32)


def test_queue_gets_no_gradient_and_matters():
    q, k = _rand((9, 8), 1).float().requires_grad_(), _rand((9, 8), 2).float()
    queue = _rand((20, 8), 3).float().requires_grad_()
    with_queue = info_nce(q, k, queue=queue)
    with_queue.backward()
    assert queue.grad is None and q.grad is not None
    assert with_queue.item() > info_nce(q, k).item()  # more negatives, larger loss
    assert info_nce(q, k, queue=queue[:0]).item() == pytest.approx(info_nce(q, k).item(), rel=1e-6)


@pytest.mark.parametrize("device,backend", GRID, ids=IDS)
@pytest.mark.parametrize("dtype", LOWP)
def test_nt_xent(device, backend, dtype):
    for n, d in ([(1, 17), (3, 17), (29, 40)] if _small(backend) else [(1, 17), (3, 17), (97, 40), (500, 128)]):
        z1, z2 = _rand((n, d), 20 + n), _rand((n, d), 40 + n)
        temp = torch.tensor(0.5, dtype=torch.float64)
        _check(lambda a, b, t: nt_xent(a, b, temperature=t, backend=backend),
               lambda a, b, t: nt_xent_reference(a, b, temperature=t), [z1, z2, temp], dtype,
               ["grad_z1", "grad_z2", "grad_temperature"], device)


def test_nt_xent_single_pair_has_no_negatives():
    z1, z2 = torch.randn(1, 5), torch.randn(1, 5)
    assert nt_xent(z1, z2).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("device,backend", GRID, ids=IDS)
@pytest.mark.parametrize("dtype", LOWP)
def test_clip_loss(device, backend, dtype):
    n, d = (33, 40) if _small(backend) else (200, 96)
    img, txt = _rand((n, d), 50), _rand((n, d), 51)
    for logit_scale in (math.log(1 / 0.07), math.log(150.0)):  # the second is clamped at 100
        ls = torch.tensor(logit_scale, dtype=torch.float64)
        _check(lambda a, b, s: clip_loss(a, b, s, backend=backend), lambda a, b, s: clip_loss_reference(a, b, s),
               [img, txt, ls], dtype, ["grad_image", "grad_text", "grad_logit_scale"], device)


@pytest.mark.parametrize("device,backend", GRID, ids=IDS)
@pytest.mark.parametrize("dtype", LOWP)
def test_clip_loss_with_labels(device, backend, dtype):
    """Several captions per image (a labels pair): loss, embedding gradients and d loss / d logit_scale (a
    float32 parameter) against the materialised SupCon loss at temperature 1 / min(exp(logit_scale), 100).
    The logit_scale gradient through the positives' term (``_ClassMeanLogit``) was never compared."""
    n, m, d = 21, 45, 40
    img_cls = torch.randperm(n, generator=torch.Generator().manual_seed(52))
    txt_cls = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=torch.Generator().manual_seed(53))])
    labels = (img_cls.to(device), txt_cls.to(device))
    img, txt = _rand((n, d), 54), _rand((m, d), 55)
    for logit_scale in (math.log(1 / 0.07), math.log(150.0)):  # the second is clamped at 100: no gradient
        ls = torch.tensor(logit_scale, dtype=torch.float64)
        _check(lambda a, b, s: clip_loss(a, b, s, labels=labels, backend=backend),
               lambda a, b, s: info_nce_reference(a, b, temperature=1 / s.exp().clamp(max=100.0), labels=labels,
                                                  symmetric=True, normalize=True),
               [img, txt, ls], dtype, ["grad_image", "grad_text", "grad_logit_scale"], device,
               scalar_dtype=torch.float32)


def test_clip_loss_clamped_scale_has_zero_gradient():
    ls = torch.tensor(math.log(150.0), requires_grad=True)
    clip_loss(torch.randn(6, 8), torch.randn(6, 8), ls).backward()
    assert ls.grad.item() == 0.0


@pytest.mark.parametrize("device,backend", GRID, ids=IDS)
def test_float16(device, backend):
    n = 29 if _small(backend) else 150
    q, k = _rand((n, 64), 60), _rand((n, 64), 61)
    labels = torch.randint(0, 9, (n,), generator=torch.Generator().manual_seed(62))
    temp = torch.tensor(0.1, dtype=torch.float64)  # a float32 parameter
    _check(lambda a, b, t: info_nce(a, b, temperature=t, labels=labels.to(a.device), symmetric=True, normalize=True,
                                    backend=backend),
           lambda a, b, t: info_nce_reference(a, b, temperature=t, labels=labels.to(a.device), symmetric=True,
                                              normalize=True), [q, k, temp],
           torch.float16, ["grad_query", "grad_key", "grad_temperature"], device, scalar_dtype=torch.float32)


def test_float64_runs_on_reference_and_is_exact():
    q, k = _rand((30, 12), 70).requires_grad_(), _rand((30, 12), 71)
    assert contrastive.OP.select(None, q=q, k=k, queue=None, scale=torch.ones(()), symmetric=True,
                                 self_offset=-1).name == "reference"
    got = info_nce(q, k, symmetric=True, temperature=0.3)
    ref = info_nce_reference(q, k, symmetric=True, temperature=0.3)
    assert got.dtype == torch.float64 and abs(got.item() - ref.item()) < 1e-12


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastpt._C not built")
@pytest.mark.parametrize("isa", [1, 2, 3])
def test_cpu_instruction_sets_agree(monkeypatch, isa):
    """Every compiled variant of the C++ kernels (baseline, AVX2, AVX-512) against float64."""
    best = {"baseline": 1, "avx2": 2, "avx512": 3}[fastpt._native._C.contrastive_cpu_isa()]
    if isa > best:
        pytest.skip("this CPU lacks the instruction set")
    monkeypatch.setattr(contrastive, "_CPU_ISA", isa)
    q, k, queue = _rand((131, 40), 80), _rand((131, 40), 81), _rand((250, 40), 82)
    labels = torch.randint(0, 11, (131,), generator=torch.Generator().manual_seed(83))
    _check(lambda a, b: info_nce(a, b, labels=labels, symmetric=True, queue=queue.to(a.dtype), backend="cpu"),
           lambda a, b: info_nce_reference(a, b, labels=labels, symmetric=True, queue=queue.to(a.dtype)),
           [q, k], torch.float32, ["grad_query", "grad_key"])
    z1, z2 = _rand((70, 40), 84), _rand((70, 40), 85)
    _check(lambda a, b: nt_xent(a, b, backend="cpu"), lambda a, b: nt_xent_reference(a, b), [z1, z2], torch.float32,
           ["grad_z1", "grad_z2"])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastpt._C not built")
def test_cpu_few_queries_many_keys_split_columns():
    """N = 2 against 3000 keys + a 5000-row queue: the C++ kernel splits the columns over threads."""
    q, k, queue = _rand((2, 32), 90), _rand((3000, 32), 91), _rand((5000, 32), 92)
    labels = (torch.tensor([0, 1]), torch.randint(0, 2, (3000,), generator=torch.Generator().manual_seed(93)))
    _check(lambda a, b: info_nce(a, b, labels=labels, queue=queue.to(a.dtype), normalize=True, backend="cpu"),
           lambda a, b: info_nce_reference(a, b, labels=labels, queue=queue.to(a.dtype), normalize=True), [q, k],
           torch.float32, ["grad_query", "grad_key"])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastpt._C not built")
def test_cpu_kernels_write_every_output():
    """The C++ entry points fill NaN-poisoned outputs completely (row / column statistics, G_q, G_k)."""
    C = fastpt._native._C
    q, k, queue, scale = torch.randn(101, 24), torch.randn(77, 24), torch.randn(30, 24), torch.tensor(3.0)
    for symmetric, self_offset in ((True, -1), (False, 2)):
        p = contrastive._cpu_params(q, k, queue, scale, symmetric, self_offset)
        row, col = torch.full((101,), float("nan")), torch.full((77,), float("nan"))
        p.row_lse, p.col_lse = row.data_ptr(), col.data_ptr()
        C.contrastive_forward_cpu(p, 2)
        ref_row, ref_col = contrastive._ref_forward(q, k, queue, scale, symmetric, self_offset)
        torch.testing.assert_close(row, ref_row, rtol=1e-5, atol=1e-5)
        if symmetric:
            torch.testing.assert_close(col, ref_col, rtol=1e-5, atol=1e-5)
        g_row, g_col = torch.randn(101), torch.randn(77)
        gq, gk = torch.full((101, 24), float("nan")), torch.full((77, 24), float("nan"))
        p.grad_row, p.grad_col, p.grad_q, p.grad_k = g_row.data_ptr(), g_col.data_ptr(), gq.data_ptr(), gk.data_ptr()
        C.contrastive_backward_cpu(p, 2)
        ref_gq, ref_gk = contrastive._ref_backward(q, k, queue, scale, ref_row, ref_col, g_row, g_col, symmetric,
                                                   self_offset)
        torch.testing.assert_close(gq, ref_gq, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gk, ref_gk, rtol=1e-4, atol=1e-5)
    # The positives' gradient in dS is the CUDA kernels' (their products round dS to fp16 / bf16); the CPU
    # kernel refuses it rather than ignore it.
    g_pos = torch.randn(101)
    p.grad_pos, p.pos_wrap = g_pos.data_ptr(), 77
    with pytest.raises(ValueError, match="grad_pos is for the CUDA kernels"):
        C.contrastive_backward_cpu(p, 2)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="fastpt._C not built")
def test_cpu_is_reproducible():
    q, k = torch.randn(300, 64), torch.randn(300, 64)
    runs = []
    for _ in range(2):
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = info_nce(a, b, symmetric=True, backend="cpu")
        loss.backward()
        runs.append((loss, a.grad, b.grad))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_supcon_class_means_are_reproducible_across_row_chunks(monkeypatch, device):
    """The SupCon positive term sums class members row chunk by row chunk (no float32 copy of the
    embeddings): with 5-row chunks, two runs agree bit for bit and match one-chunk sums closely."""
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(53, 24, generator=g).to(device), torch.randn(53, 24, generator=g).to(device)
    labels = torch.randint(0, 6, (53,), generator=g).to(device)
    temp = torch.tensor(0.3, device=device)
    runs = []
    for chunk in (5 * 24, 5 * 24, 1 << 20):
        monkeypatch.setattr(contrastive, "CHUNK_ELEMENTS", chunk)
        a, b, t = q.clone().requires_grad_(), k.clone().requires_grad_(), temp.clone().requires_grad_()
        loss = info_nce(a, b, temperature=t, labels=labels, symmetric=True, backend="reference")
        loss.backward()
        runs.append((loss, a.grad, b.grad, t.grad))
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1]))
    for x, y in zip(runs[0], runs[2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_scales_cost_no_host_traffic_per_call(device):
    """A float temperature became a fresh torch.tensor(..., device=cuda) on every call (a host-to-device copy per
    step), and CLIP's learnable logit_scale was read with float() on every call (a wait for the GPU). Floats
    become one cached tensor; a GPU tensor's value is checked on the GPU, a bad one making the loss NaN (on a
    CPU, where reading it is free, the ValueError stays)."""
    from fastpt import _dispatch

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 16, generator=g).to(device), torch.randn(9, 16, generator=g).to(device)
    _dispatch._CONSTANTS.clear()
    first = nt_xent(a, b, temperature=0.3)
    made = dict(_dispatch._CONSTANTS)
    assert len(made) == 1
    for _ in range(3):
        assert torch.equal(nt_xent(a, b, temperature=0.3), first)
    assert len(_dispatch._CONSTANTS) == 1 and all(_dispatch._CONSTANTS[k] is t for k, t in made.items())
    good = clip_loss(a, b, torch.tensor(2.0, device=device))
    torch.testing.assert_close(good, clip_loss(a, b, 2.0))
    for bad in (math.inf, math.nan):
        scale = torch.tensor(bad, device=device, requires_grad=True)
        temp = torch.tensor(bad, device=device)
        if device == "cpu":
            with pytest.raises(ValueError, match="logit_scale"):
                clip_loss(a, b, scale)
            with pytest.raises(ValueError, match="temperature"):
                info_nce(a, b, temperature=temp)
        else:
            assert torch.isnan(clip_loss(a, b, scale)) and torch.isnan(info_nce(a, b, temperature=temp))
    if device != "cpu":
        assert torch.isnan(info_nce(a, b, temperature=torch.tensor(-0.5, device=device)))


def test_scale_checks_read_host_values_whatever_the_embeddings_device():
    """A float or a CPU-tensor logit_scale is read on the host for free: its ValueError stays when the
    embeddings are on a GPU ("meta" stands in: only a tensor living on the GPU is checked there, NaN loss)."""
    from fastpt.ops.contrastive import _scale_from_logit_scale

    meta = torch.device("meta")
    for bad in (math.inf, torch.tensor(math.nan)):
        with pytest.raises(ValueError, match="logit_scale: expected a finite value"):
            _scale_from_logit_scale(bad, meta, torch.float32)
    assert _scale_from_logit_scale(torch.tensor(math.inf, device=meta), meta, torch.float32).device == meta


def test_constants_made_under_a_fake_mode_are_not_cached():
    """device_constant cached what FakeTensorMode made: the next eager call with the same temperature got a
    FakeTensor back (a loss without data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastpt import _dispatch

    _dispatch._CONSTANTS.clear()
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    with FakeTensorMode() as mode:
        nt_xent(mode.from_tensor(z1), mode.from_tensor(z2), temperature=0.2)
    loss = nt_xent(z1, z2, temperature=0.2)
    assert type(loss) is torch.Tensor and torch.isfinite(loss)
    torch.testing.assert_close(loss, nt_xent_reference(z1.double(), z2.double(), temperature=0.2).float())


def test_nt_xent_subtracts_the_positive_per_row():
    """nt_xent summed every row's log-sum-exp and every positive separately, then subtracted: two sums of size
    ~N * |logit| cancelling. With views that nearly agree (loss ~ 0) its error was 12x torch's own float32
    error; per row, the kernel's error is within the 2x rule."""
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(2048, 32, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(z1 + 1e-3 * torch.randn(2048, 32, generator=g, dtype=torch.float64), dim=1)
    exact = nt_xent_reference(z1, z2, temperature=0.1)
    torch32 = nt_xent_reference(z1.float(), z2.float(), temperature=0.1).double()
    ours = nt_xent(z1.float(), z2.float(), temperature=0.1).double()
    assert abs(ours - exact) <= 2 * abs(torch32 - exact) + 4 * torch.finfo(torch.float32).eps * abs(exact)


@pytest.mark.parametrize("device,backend", GRID, ids=IDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the Triton interpreter, about the NaNs
def test_non_finite_embedding_gives_non_finite_loss(device, backend):
    q, k = torch.randn(37, 16), torch.randn(37, 16)
    q[5, 3] = float("nan")
    q, k = q.to(device).requires_grad_(), k.to(device).requires_grad_()
    loss = info_nce(q, k, symmetric=True, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(q.grad).any() and torch.isnan(k.grad).any()
    z1 = torch.randn(5, 8)
    z1[0, 0] = float("inf")
    z1, z2 = z1.to(device), torch.randn(5, 8).to(device)
    assert not torch.isfinite(nt_xent(z1, z2, normalize=False, backend=backend))  # inf - inf somewhere, or inf
    assert torch.isnan(nt_xent(z1, z2, backend=backend))  # normalising inf gives NaN


def _compiled_vs_eager(fn, tensors, device):
    """fn traced whole by torch.compile (fullgraph: a graph break raises) against eager: loss and grads."""
    import torch._dynamo

    torch._dynamo.reset()
    runs = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().to(device).requires_grad_(True) for t in tensors]
        loss = f(*leaves)
        loss.backward()
        runs.append([loss.detach()] + [x.grad for x in leaves])
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", GRID, ids=IDS)
@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # torch 2.11: a failure
def test_torch_compile_full_graph(device, backend):
    """The custom op (fake + autograd) lets torch.compile trace the losses without graph breaks."""
    n = 29 if _small(backend) else 70
    q, k, queue = _rand((n, 24), 100).float(), _rand((n, 24), 101).float(), _rand((40, 24), 102).float().to(device)
    temp = torch.tensor(0.2)
    _compiled_vs_eager(lambda a, b: info_nce(a, b, backend=backend), [q, k], device)
    _compiled_vs_eager(lambda a, b, t: info_nce(a, b, temperature=t, symmetric=True, normalize=True, queue=queue,
                                                backend=backend), [q, k, temp], device)
    _compiled_vs_eager(lambda a, b, s: clip_loss(a, b, s, backend=backend), [q, k, torch.tensor(math.log(1 / 0.07))],
                       device)
    _compiled_vs_eager(lambda a, b: nt_xent(a, b, temperature=0.3, backend=backend), [q, k], device)


@pytest.mark.parametrize("device,backend", GRID, ids=IDS)
def test_custom_op_registration(device, backend):
    """torch.library.opcheck: schema, fake tensors against the real op, autograd registration."""
    q = _rand((37, 24), 110).float().to(device).requires_grad_()
    k = _rand((30, 24), 111).float().to(device).requires_grad_()
    queue = _rand((11, 24), 112).float().to(device)
    scale = torch.tensor(2.0, device=device, requires_grad=True)
    for symmetric, self_offset, qu in ((True, -1, queue), (False, 3, None)):
        torch.library.opcheck(contrastive._lse_op, (q, k, qu, scale, backend, symmetric, self_offset))


def test_default_backend_on_cpu():
    probe = contrastive.OP.probe("cpu")
    expected = "cpu" if "cpu" in BACKENDS else "reference"
    assert contrastive.OP.select(None, **probe).name == expected
    assert "contrastive" in fastpt.info()["ops"]


BAD = [
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 9)), ValueError, "key: expected D=8"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8).double()), TypeError, "key: expected dtype"),
    (lambda: info_nce(torch.randn(8), torch.randn(8)), ValueError, "query: expected shape"),
    (lambda: info_nce(torch.randn(0, 8), torch.randn(0, 8)), ValueError, "query: expected shape"),
    (lambda: info_nce(torch.randint(0, 3, (4, 8)), torch.randn(4, 8)), TypeError, "query: expected float"),
    (lambda: info_nce([1.0], torch.randn(4, 8)), TypeError, "query: expected a torch.Tensor"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(5, 8)), ValueError, "N == M"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0), ValueError, "temperature"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=-0.1), ValueError, "temperature"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=float("nan")), ValueError, "temperature"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=torch.tensor(0.0)), ValueError, "temperature"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature=torch.ones(2)), TypeError, "temperature"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), temperature="0.1"), TypeError, "temperature"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), labels=torch.tensor([0, 1, -1, 2])), ValueError,
     "labels: class labels must be >= 0"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), labels=torch.tensor([0, 1, 2])), ValueError,
     r"labels: expected shape \(4,\)"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), labels=torch.zeros(4)), TypeError, "labels"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(5, 8), labels=torch.zeros(4, dtype=torch.long)), ValueError,
     "N == M"),
    (lambda: info_nce(torch.randn(2, 8), torch.randn(3, 8), labels=(torch.tensor([0, 5]), torch.tensor([0, 1, 1]))),
     ValueError, "query row 1 .label 5. has no positive"),
    (lambda: info_nce(torch.randn(2, 8), torch.randn(3, 8), labels=(torch.tensor([0, 1]), torch.tensor([0, 1, 2])),
                      symmetric=True), ValueError, "key row 2 .label 2. has no positive"),
    (lambda: info_nce(torch.randn(2, 8), torch.randn(3, 8), labels=(torch.tensor([0, 1]), torch.tensor([0, 1]))),
     ValueError, r"labels\[1\] \(key labels\): expected shape \(3,\)"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), queue=torch.randn(5, 7)), ValueError,
     "queue: expected D=8"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), gather=True), RuntimeError, "init_process_group"),
    (lambda: info_nce(torch.randn(4, 8).double(), torch.randn(4, 8).double(), backend="cpu"), fastpt.BackendError,
     "cpu: (supports float32, float16 and bfloat16, got torch.float64|fastpt._C did not load)"),
    (lambda: info_nce(torch.randn(4, 8), torch.randn(4, 8), backend="cuda"), fastpt.BackendError,
     r"forced backend 'cuda' cannot serve .*cuda: (needs cuda tensors|fastpt._C|no CUDA device)"),
    (lambda: nt_xent(torch.randn(4, 8), torch.randn(3, 8)), ValueError, "z2: expected shape"),
    (lambda: nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0), ValueError, "temperature"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(float("nan"))), ValueError, "logit_scale"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(float("inf"))), ValueError, "logit_scale"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.zeros(3)), TypeError, "logit_scale"),
    (lambda: clip_loss(torch.randn(4, 8), torch.randn(5, 8), 1.0), ValueError, "text_emb"),
    (lambda: fastpt.nn.InfoNCELoss(temperature=0), ValueError, "temperature"),
    (lambda: fastpt.nn.CLIPLoss(init_temperature=-1.0), ValueError, "temperature"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_modules_match_the_functions():
    q, k = torch.randn(20, 16), torch.randn(20, 16)
    labels = torch.randint(0, 4, (20,))
    queue = torch.randn(7, 16)
    m = fastpt.nn.InfoNCELoss(0.2, symmetric=True, normalize=True)
    assert torch.equal(m(q, k, labels, queue), info_nce(q, k, temperature=0.2, labels=labels, symmetric=True,
                                                       normalize=True, queue=queue))
    assert torch.equal(fastpt.nn.NTXentLoss(0.3)(q, k), nt_xent(q, k, temperature=0.3))
    clip = fastpt.nn.CLIPLoss()
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    loss = clip(q, k)
    loss.backward()
    assert loss.item() == pytest.approx(clip_loss_reference(q, k, clip.logit_scale.detach()).item(), rel=1e-5)
    assert clip.logit_scale.grad is not None and clip.logit_scale.grad.item() != 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_normalize_matches_f_normalize_in_row_chunks(monkeypatch, dtype):
    """The losses' ``normalize=True`` (chunked, keeping no float32 copy of the embeddings for the
    backward) against F.normalize in the accumulation dtype: values and gradients, with a zero row
    and one below F.normalize's eps (whose norm gets no gradient)."""
    monkeypatch.setattr(contrastive, "CHUNK_ELEMENTS", 5 * 24)  # 5 rows a chunk: 61 rows are 13 chunks
    x = _rand((61, 24), 90)
    x[4] = 0.0
    x[9] *= 1e-14
    g = _rand((61, 24), 91)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got_x, want_x = (x.to(dtype).requires_grad_() for _ in range(2))
    got = contrastive._normalize(got_x)
    want = F.normalize(want_x.to(acc), dim=1).to(dtype)
    got.backward(g.to(dtype))
    want.backward(g.to(dtype))
    assert got.dtype == dtype and got_x.grad.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # (g - y (y . g)) cancels: elementwise relative errors are meaningless; compare with each row's largest
    # value (row 9's gradient is g / eps, ~1e12)
    eps = 0.0 if dtype == torch.float64 else torch.finfo(dtype).eps
    atol = 2 * eps * want_x.grad.double().abs().amax(1, keepdim=True)
    assert ((got_x.grad.double() - want_x.grad.double()).abs() <= atol).all()



CLASSES = torch.tensor([0, 1, 0, 2, 1, 2])
QUEUE = _rand((5, 8), 9).float()
LOSSES = {  # (query, key, backend) -> loss
    "info_nce": lambda a, b, be: info_nce(a, b, temperature=0.2, backend=be),
    "info_nce-symmetric-normalize": lambda a, b, be: info_nce(a, b, symmetric=True, normalize=True, backend=be),
    "info_nce-labels-symmetric": lambda a, b, be: info_nce(a, b, labels=CLASSES, symmetric=True, backend=be),
    "info_nce-queue": lambda a, b, be: info_nce(a, b, queue=QUEUE, backend=be),
    "nt_xent": lambda a, b, be: nt_xent(a, b, backend=be),
    "clip_loss": lambda a, b, be: clip_loss(a, b, torch.tensor(2.0), backend=be),
    "clip_loss-labels": lambda a, b, be: clip_loss(a, b, torch.tensor(2.0), labels=CLASSES, backend=be),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("backend", [None, "reference"])
def test_torch_func_transforms(name, backend):
    """Per-sample gradients with vmap(grad(...)): the custom op and the autograd.Function helpers
    (normalisation, class means) raised torch's 'setup_context' error under the transforms, the
    reference backend too (it ran inside the same custom op). The losses are plain torch ops
    there: values and gradients equal a Python loop of eager calls."""
    loss = functools.partial(LOSSES[name], be=backend)
    q, k = _rand((3, 6, 8), 1).float(), _rand((3, 6, 8), 2).float()
    values = torch.func.vmap(loss)(q, k)
    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(q, k)
    for i in range(3):
        a, b = q[i].clone().requires_grad_(True), k[i].clone().requires_grad_(True)
        want = loss(a, b)
        want.backward()
        torch.testing.assert_close(values[i], want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[0][i], a.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1][i], b.grad, rtol=1e-5, atol=1e-6)


def test_forced_kernel_backend_under_a_transform_raises():
    """A kernel backend cannot run under a transform: BackendError naming why, not torch's error."""
    q = _rand((4, 8), 1).float()
    with pytest.raises(fastpt.BackendError, match="torch.func transform"):
        torch.func.grad(lambda a: info_nce(a, q, backend="cpu"))(q)


def test_batched_temperature_and_logit_scale_under_vmap():
    """A temperature / logit_scale batched by vmap has no host value (its .item() raised): the checks
    are skipped for it, as under compile, and the losses equal the loop. Unbatched values are still
    read and checked under the transforms."""
    q, k = _rand((6, 8), 1).float(), _rand((6, 8), 2).float()
    temps, scales = torch.tensor([0.1, 0.5, 2.0]), torch.tensor([0.5, 2.0, 3.0])
    torch.testing.assert_close(torch.func.vmap(lambda t: info_nce(q, k, temperature=t))(temps),
                               torch.stack([info_nce(q, k, temperature=t) for t in temps]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.vmap(lambda s: clip_loss(q, k, s))(scales),
                               torch.stack([clip_loss(q, k, s) for s in scales]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature: expected a finite value > 0"):
        torch.func.grad(lambda a: info_nce(a, k, temperature=torch.tensor(-1.0)))(q)
    with pytest.raises(ValueError, match="logit_scale: expected a finite value"):
        torch.func.grad(lambda a: clip_loss(a, k, torch.tensor(float("inf"))))(q)
