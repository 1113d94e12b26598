"""CUDA C++ contrastive kernels (kernels/contrastive.cu) against the float64 references.

Runs only where fastpt._C was built with CUDA and torch sees a GPU; skipped elsewhere. The generic
grid of test_contrastive.py also runs the ``cuda`` backend there; this file adds what is specific
to the CUDA kernels: tile-edge shapes (63 / 64 / 65 rows, 17 / 40 / 96 / 768 features), the split
paths (few query blocks against many keys and the reverse), misaligned operands (the scalar load
path), every output written over poisoned memory, bitwise reproducibility, and incoming gradients
far below fp16's range (their normalisation keeps the fp16 dS representable).
"""
import math

import pytest
import torch

from fastpt.ops import clip_loss, contrastive, info_nce, nt_xent
from fastpt.ops.contrastive import clip_loss_reference, info_nce_reference, nt_xent_reference
from tests.ops.test_contrastive import OPTIONS, _assert_rule, _grads, _rand, _to

pytestmark = pytest.mark.skipif(contrastive._cuda_unavailable() is not None or not torch.cuda.is_available(),
                                reason=f"CUDA kernels unavailable: {contrastive._cuda_unavailable()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(kernel_fn, ref_fn, tensors, dtype, names):
    """test_contrastive's FlashAttention rule on the GPU (loss and every gradient against float64, at most
    2x the error of the reference run in the kernel's dtype), except for the 0-dim outputs of fp16 / bf16
    (the loss, grad_temperature, grad_logit_scale). A single number of the low-precision reference can
    land close to float64 by luck (its error on the same loss varies 50x across seeds, while the
    kernel's, dominated by the unit vectors normalize=True rounds to the input dtype, stays put), so
    those get 2 ulps of the input dtype; the raw kernels are held to float64 more tightly below."""
    ref64 = _grads(ref_fn, tensors, torch.float64)
    ref_lowp = _grads(ref_fn, tensors, dtype, "cuda")
    got = _grads(kernel_fn, tensors, dtype, "cuda")
    assert got[0].dtype == torch.float32
    unit = max(1.0, abs(ref64[0].item()))
    for name, g, r, rl in zip(["loss"] + names, got, ref64, ref_lowp):
        assert g.shape == r.shape
        if dtype != torch.float32 and g.dim() == 0:
            err = abs(g.double().item() - r.item())
            bound = 2 * torch.finfo(dtype).eps * max(abs(r.item()), unit)
            assert err <= bound, f"{name}: error {err:.3e} > 2 ulps of {dtype} ({bound:.1e})"
        else:
            _assert_rule(name, g, r, rl, unit)


def _poison_allocator():
    """Leave NaN bytes (0xFF) in the caching allocator's free blocks, small and large pools, so an
    output element the kernels forget to write shows up as NaN."""
    junk = [torch.full((1 << 20,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(16)]
    junk += [torch.full((1 << 26,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(2)]
    del junk


# N crosses the 64-row tile edge both ways; D = 17 takes the scalar loads, 40 / 96 / 768 the 16-byte
# vector loads (4 fp32 or 8 fp16 / bf16 elements), and 40 and 17 end in a partial 32-feature chunk.
SHAPES = [(1, 17), (3, 40), (63, 96), (65, 17), (129, 40), (1000, 768)]


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_float64(n, d, dtype, symmetric):
    q, k = _rand((n, d), 1), _rand((n, d), 2)
    temp = torch.tensor(0.1, dtype=torch.float64)
    _check(lambda a, b, t: info_nce(a, b, temperature=t, normalize=True, symmetric=symmetric, backend="cuda"),
           lambda a, b, t: info_nce_reference(a, b, temperature=t, normalize=True, symmetric=symmetric),
           [q, k, temp], dtype, ["grad_query", "grad_key", "grad_temperature"])


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_options(option, dtype):
    """Repeated labels, label pairs with N != M, queues, symmetric: all gradients by the 2x rule."""
    kwargs, n, m = OPTIONS[option]
    q, k = _rand((n, 24), 10), _rand((m, 24), 11)
    _check(lambda a, b: info_nce(a, b, backend="cuda", **_to(kwargs, a.device, a.dtype)),
           lambda a, b: info_nce_reference(a, b, **_to(kwargs, a.device, a.dtype)), [q, k], dtype,
           ["grad_query", "grad_key"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_queue_labels_symmetric_large(dtype):
    """Several key and queue blocks, repeated labels, both directions: 300 queries, 257 keys, 97 queue rows."""
    n, m, d, classes = 300, 257, 80, 40
    gen = torch.Generator().manual_seed(5)
    labels = tuple(torch.cat([torch.arange(classes), torch.randint(0, classes, (rows - classes,), generator=gen)])
                   for rows in (n, m))  # every class on both sides: every row has a positive
    kwargs = dict(temperature=0.2, labels=labels, symmetric=True, normalize=True, queue=_rand((97, d), 6))
    _check(lambda a, b: info_nce(a, b, backend="cuda", **_to(kwargs, a.device, a.dtype)),
           lambda a, b: info_nce_reference(a, b, **_to(kwargs, a.device, a.dtype)),
           [_rand((n, d), 7), _rand((m, d), 8)], dtype, ["grad_query", "grad_key"])


@pytest.mark.parametrize("n,d", [(1, 17), (3, 40), (97, 96), (500, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nt_xent(n, d, dtype):
    temp = torch.tensor(0.5, dtype=torch.float64)
    _check(lambda a, b, t: nt_xent(a, b, temperature=t, backend="cuda"),
           lambda a, b, t: nt_xent_reference(a, b, temperature=t), [_rand((n, d), 20), _rand((n, d), 21), temp],
           dtype, ["grad_z1", "grad_z2", "grad_temperature"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_loss(dtype):
    img, txt = _rand((200, 96), 50), _rand((200, 96), 51)
    for logit_scale in (math.log(1 / 0.07), math.log(150.0)):  # the second is clamped at 100
        ls = torch.tensor(logit_scale, dtype=torch.float64)
        _check(lambda a, b, s: clip_loss(a, b, s, backend="cuda"), lambda a, b, s: clip_loss_reference(a, b, s),
               [img, txt, ls], dtype, ["grad_image", "grad_text", "grad_logit_scale"])


def _misaligned(t):
    """The same values at a storage offset of one element: not 16-byte aligned (scalar loads)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    flat[1:] = t.reshape(-1)
    return flat[1:].view(t.shape)


# (n, m, queue rows, d, symmetric, self_offset): few row blocks against many keys splits the columns
# (forward and dq); many rows against one key block splits the rows (dk); offsets as NT-Xent under gather.
KERNEL_CASES = [
    (2, 3000, 5000, 32, False, -1),
    (2, 3000, 0, 40, True, -1),
    (5000, 70, 0, 96, True, -1),
    (70, 140, 0, 33, False, 70),
    (129, 129, 65, 17, True, -1),
    (1, 1, 0, 1, True, -1),
]


def _kernel_check(n, m, kq, d, symmetric, self_offset, dtype, aligned=True, g_scale=1.0):
    """The raw forward / backward entry points over poisoned memory against float64 on the same inputs
    (the backward fed the float64 statistics, as the CPU kernel test does)."""
    # Logits within +-20: the fp32 tolerance below is relative to the largest gradient, and exp()
    # turns the fp32 rounding of a logit x into a relative error of about |x| ulps.
    q, k = (_rand((rows, d), seed, 0.5).to("cuda", dtype) for rows, seed in ((n, 40), (m, 41)))
    queue = _rand((kq, d), 42, 0.5).to("cuda", dtype) if kq else None
    if not aligned:
        q, k = _misaligned(q), _misaligned(k)
        queue = _misaligned(queue) if queue is not None else None
    scale = torch.tensor(3.0, device="cuda")
    _poison_allocator()
    row, col = contrastive._cuda_forward(q, k, queue, scale, symmetric, self_offset)
    f64 = [x.double() if x is not None else None for x in (q, k, queue)]
    ref_row, ref_col = contrastive._ref_forward(*f64, scale.double(), symmetric, self_offset)
    torch.testing.assert_close(row.double(), ref_row, rtol=1e-5, atol=1e-5)
    if symmetric:
        torch.testing.assert_close(col.double(), ref_col, rtol=1e-5, atol=1e-5)
    g_row, g_col = _rand((n,), 43).cuda() * (g_scale / n), _rand((m,), 44).cuda() * (g_scale / m)
    _poison_allocator()
    gq, gk = contrastive._cuda_backward(q, k, queue, scale, ref_row.float(), ref_col.float(), g_row.float(),
                                        g_col.float(), symmetric, self_offset)
    ref_gq, ref_gk = contrastive._ref_backward(*f64, scale.double(), ref_row, ref_col, g_row, g_col, symmetric,
                                               self_offset)
    # fp16 / bf16 round dS to the input dtype before the second product (2^-11 / 2^-8 relative).
    tol = {torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for name, got, ref in (("grad_q", gq, ref_gq), ("grad_k", gk, ref_gk)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), f"{name}: unwritten (NaN) elements"
        err = (got.double() - ref).abs().max().item()
        assert err <= tol * ref.abs().max().item(), f"{name}: error {err:.3e} (largest {ref.abs().max():.3e})"


@pytest.mark.parametrize("n,m,kq,d,symmetric,self_offset", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_kernels_write_every_output(n, m, kq, d, symmetric, self_offset, dtype, aligned):
    _kernel_check(n, m, kq, d, symmetric, self_offset, dtype, aligned)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_incoming_gradients(dtype):
    """Incoming gradients ~1e-12: dS = g * softmax would flush to zero in fp16 without the
    normalisation of the incoming gradients (fp32 results keep the full range)."""
    _kernel_check(300, 300, 0, 64, True, -1, dtype, g_scale=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_reproducible(dtype):
    """No float atomics: two runs (with column and row splits) give identical bits."""
    q, k, queue = (torch.randn(rows, 96, device="cuda", dtype=dtype) for rows in (300, 2000, 500))
    runs = []
    for _ in range(2):
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = info_nce(a, b[:300], symmetric=True, queue=queue, backend="cuda")
        loss.backward()
        a2 = q[:2].clone().requires_grad_()
        loss2 = info_nce(a2, k, labels=(torch.tensor([0, 1], device="cuda"), torch.arange(2000, device="cuda") % 2),
                         backend="cuda")
        loss2.backward()
        runs.append((loss, a.grad, b.grad, loss2, a2.grad))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_matches_triton_when_both_run():
    """The two GPU backends agree on the same inputs (fp32: both are exact fp32 FMA tiles)."""
    if contrastive.OP.backends["triton"].available() is not None:
        pytest.skip("triton unavailable")
    q, k = torch.randn(333, 72, device="cuda"), torch.randn(333, 72, device="cuda")
    out = [info_nce(q, k, symmetric=True, normalize=True, backend=b) for b in ("cuda", "triton")]
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_default_backend_on_cuda_prefers_blas():
    """Dispatch order (see contrastive.OP, measured on an H200): chunked cuBLAS products first."""
    probe = contrastive.OP.probe("cuda")
    assert contrastive.OP.select(None, **probe).name == "blas"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [256, 333])
def test_positives_keep_half_gradients_accurate_when_views_agree(dtype, n):
    """Once the two views agree (softmax of the positive ~ 0.9999) the positive's gradient cancels the
    softmax's to ~1e-4 of either: the kernels add it to dS in float32, before dS is rounded for the
    tensor cores. Added after the products (as before), blas measured a relative error above 1 here
    (test_contrastive_blas's twin); 333 rows wrap the positives across tiles (shift 77)."""
    g = torch.Generator().manual_seed(0)
    d = 64
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(q + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    shift = 0 if n == 256 else 77
    k = torch.roll(k, shift, 0)  # query i's positive is key (i + shift) % n
    q, k = q.to(dtype).double(), k.to(dtype).double()  # the inputs the kernel sees, exactly
    scale = torch.tensor(1 / 0.05, dtype=torch.float64)
    row, col = contrastive._ref_forward(q, k, None, scale, True, -1)
    g_row = torch.full((n,), 0.5 / n, dtype=torch.float64)
    targets = (torch.arange(n) + shift) % n
    gq64, gk64 = contrastive._ref_backward(q, k, None, scale, row, col, g_row, g_row, True, -1)
    gq64 = gq64 - 2 * g_row[:, None] * k[targets]
    gk64 = gk64.index_add(0, targets, -2 * g_row[:, None] * q)
    assert torch.exp(scale * (q * k[targets]).sum(1) - row).mean() > 0.999
    qc, kc = q.to("cuda", dtype), k.to("cuda", dtype)
    gq, gk = contrastive._cuda_backward(qc, kc, None, scale.float().cuda(), row.float().cuda(), col.float().cuda(),
                                        g_row.float().cuda(), g_row.float().cuda(), True, -1,
                                        pos=contrastive._positives(shift, n, 0), g_pos=-2 * g_row.float().cuda())
    for got, want in ((gq, gq64), (gk, gk64)):
        assert (got.cpu().double() - want).abs().max() < 0.1 * want.abs().max()
