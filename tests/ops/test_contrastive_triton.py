"""The tiled Triton contrastive kernels in each tile layout, against float64 statistics and gradients.

``test_contrastive.py`` runs the public ops on the default tiles. Here ``contrastive_triton.config``
is replaced so that every layout runs on the same inputs: resident and chunked score tiles, one
and several accumulator slices of D, split and unsplit streamed sides, and the backward's two
orientations (G_q: queries' rows against keys then queue; G_k: keys' rows against queries), with
the symmetric column term, the self-pair exclusion and the positives' gradients (one positive per
query, shifted, wrapped and offset as NT-Xent and gathered keys place them). The kernels' outputs are
the raw statistics and the finished gradients (scale * (dS @ values)) with the scale's gradient,
compared with the same float64 formula.
"""
import pytest
import torch

from fastpt import _native

triton = pytest.importorskip("triton")
from fastpt.ops import contrastive_triton as ct  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not _native.triton_interpreting(),
                                reason="Triton on the CPU needs TRITON_INTERPRET=1")

# (rows, cols, bd, do, resident, target): tiles of 16 / 32 so that the small inputs cross edges
LAYOUTS = {
    "resident_one_slice": (32, 16, 64, None, True, 1),
    "resident_two_slices": (16, 32, 64, 16, True, 1),
    "chunked_one_slice": (32, 32, 16, None, False, 1),
    "chunked_three_slices_split": (16, 16, 16, 16, False, 64),
}


def _layout(name):
    rows, cols, bd, do, resident, target = LAYOUTS[name]

    def config(dtype, d, kind, *, sms, smem=0):
        dp = ct._dispatch.dot_width(d)
        return ct.Config(rows, cols, bd, dp, dp if kind == "fwd" or do is None else do, resident, 4, 1, target)
    return config


def _expected(q, k, queue, scale, symmetric, self_offset, g_row, g_col, pos=None, g_pos=None):
    """Row / column log-sum-exps, the gradients (scale * G_q, scale * G_k) of the kernels' contract and
    the scale's gradient, in float64; positives ``pos`` (a ``Positives``) get ``g_pos`` added to dS."""
    q, k = q.double(), k.double()
    keys = k if queue is None else torch.cat([k, queue.double()])
    s = scale * q @ keys.T
    m = k.shape[0]
    if self_offset >= 0:
        i = torch.arange(q.shape[0])
        ok = i + self_offset < m
        s[i[ok], i[ok] + self_offset] = float("-inf")
    row = s.logsumexp(1)
    ds = torch.exp(s - row[:, None]) * g_row.double()[:, None]
    col = None
    if symmetric:
        col = s[:, :m].logsumexp(0)
        ds[:, :m] += torch.exp(s[:, :m] - col[None, :]) * g_col.double()[None, :]
    if pos is not None:
        ds[torch.arange(q.shape[0]), pos.targets(q.shape[0], "cpu")] += g_pos.double()
    gq = ds @ keys
    return row, col, scale * gq, scale * (ds[:, :m].T @ q), (q * gq).sum()


def _close(name, got, want, rel):
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= rel * max(1.0, want.abs().max().item()), f"{name}: error {err:.3e}"


CASES = {  # (N, M, K queue rows, D, symmetric, self_offset, positives (shift, wrap, base) or None)
    "info_nce": (37, 29, 0, 40, False, -1, (0, 29, 0)),  # wrap < N: queries i and i + 29 share a key
    "symmetric": (29, 37, 0, 24, True, -1, (0, 29, 5)),  # base: a rank's offset in gathered keys
    "queue": (21, 19, 35, 33, False, -1, None),
    "nt_xent": (38, 38, 0, 17, False, 0, (19, 38, 0)),  # view i's positive is view (i + 19) mod 38
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_layouts_agree_with_float64(monkeypatch, layout, case):
    monkeypatch.setattr(ct, "config", _layout(layout))
    n, m, kq, d, symmetric, self_offset, pos = CASES[case]
    pos = ct.Positives(*pos) if pos is not None else None
    g = torch.Generator().manual_seed(len(case) * 7 + len(layout))
    q, k = (torch.nn.functional.normalize(torch.randn(r, d, generator=g), dim=1) for r in (n, m))
    queue = torch.nn.functional.normalize(torch.randn(kq, d, generator=g), dim=1) if kq else None
    g_row, g_col, g_pos = torch.rand(n, generator=g), torch.rand(m, generator=g), -2 * torch.rand(n, generator=g)
    scale = torch.tensor(1 / 0.07)
    want = _expected(q, k, queue, scale.item(), symmetric, self_offset, g_row, g_col, pos, g_pos)
    dev = dict(device=DEVICE)
    args = [q.to(**dev), k.to(**dev), queue.to(**dev) if queue is not None else None, scale.to(**dev)]
    row, col = ct.forward(*args, symmetric, self_offset)
    _close("row_lse", row, want[0], 1e-5)
    if symmetric:
        _close("col_lse", col, want[1], 1e-5)
    # the backward takes the float64 statistics rounded to float32, as the op hands it its own
    f32 = dict(device=DEVICE, dtype=torch.float32)
    gq, gk, g_scale = ct.backward(*args, want[0].to(**f32), want[1].to(**f32) if symmetric else torch.empty(0, **f32),
                                  g_row.to(**f32), g_col.to(**f32) if symmetric else None, symmetric, self_offset,
                                  g_pos=g_pos.to(**f32) if pos else None, pos=pos, need_scale=True)
    assert gq.shape == q.shape and gk.shape == k.shape
    _close("grad_q", gq, want[2], 1e-4)
    _close("grad_k", gk, want[3], 1e-4)
    _close("grad_scale", g_scale, want[4], 1e-5)


def test_layouts_give_identical_statistics(monkeypatch):
    """Resident and chunked score tiles round every score alike in float32 with one feature chunk, so
    the log-sum-exps agree bit for bit; with several chunks they agree to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(33, 24, generator=g).to(DEVICE), torch.randn(41, 24, generator=g).to(DEVICE)
    scale = torch.tensor(3.0, device=DEVICE)
    outs = {}
    for name in ("resident_one_slice", "chunked_one_slice"):
        monkeypatch.setattr(ct, "config", _layout(name))
        outs[name] = ct.forward(q, k, None, scale, True, -1)
    for a, b in zip(*outs.values()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


RESIDENT_CFG = ct.Config(64, 64, 64, 64, 64, True, 8, 2, 4)
CHUNKED_CFG = ct.Config(64, 64, 64, 64, 64, False, 8, 3, 4)


def test_out_of_resources_skips_to_the_next_candidate(monkeypatch):
    """A GPU whose shared memory cannot hold a candidate's tiles (Triton raises OutOfResources at compile
    time) runs the next one, for this call and the next ones of the shape class."""
    monkeypatch.setattr(ct, "_device_candidates", lambda *a: [RESIDENT_CFG, CHUNKED_CFG])
    monkeypatch.setattr(ct, "_tuning_allowed", lambda q: False)
    monkeypatch.setattr(ct, "_TUNED", {})
    seen = []

    def run(cfg):
        seen.append(cfg.resident)
        if cfg.resident:
            raise triton.runtime.errors.OutOfResources(229376, 232448, "shared memory")
        return "ran"

    q = torch.zeros(8, 64)
    assert ct._run(run, q, 64, "grad_q") == "ran"
    assert ct._run(run, q, 64, "grad_q") == "ran"
    assert seen == [True, False, False]
    assert ct._run(run, q, 64, "grad_k") == "ran"  # another kernel: its own try
    assert seen[3:] == [True, False]


def test_out_of_resources_of_the_last_candidate_is_raised(monkeypatch):
    monkeypatch.setattr(ct, "_device_candidates", lambda *a: [CHUNKED_CFG])

    def run(cfg):
        raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")

    with pytest.raises(triton.runtime.errors.OutOfResources):
        ct._run(run, torch.zeros(8, 64), 64, "grad_q")


def test_tuning_keeps_the_fastest_candidate_per_shape_class(monkeypatch):
    slow, fast, refused = CHUNKED_CFG, CHUNKED_CFG._replace(rows=32), RESIDENT_CFG
    monkeypatch.setattr(ct, "_device_candidates", lambda *a: [slow, refused, fast])
    monkeypatch.setattr(ct, "_tuning_allowed", lambda q: True)
    monkeypatch.setattr(ct, "_TUNED", {})
    timed = []

    def fake_time(run, cfg):
        timed.append(cfg)
        if cfg.resident:
            raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")
        return 2.0 if cfg is slow else 1.0

    monkeypatch.setattr(ct, "_time", fake_time)
    ran = []
    q = torch.zeros(8, 64)
    assert ct._run(lambda cfg: ran.append(cfg) or cfg.rows, q, 64, "fwd", (False, 1024)) == 32
    assert timed == [slow, refused, fast] and ran == [fast]
    assert ct._run(lambda cfg: cfg.rows, q, 64, "fwd", (False, 1024)) == 32 and len(timed) == 3  # cached
    ct._run(lambda cfg: cfg.rows, q, 64, "fwd", (False, 4096))  # another size class: timed again
    assert len(timed) == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [16, 40, 128, 200, 512, 768, 2048])
@pytest.mark.parametrize("kind", ct.KINDS)
def test_gpu_candidates_fit_and_cover_d(dtype, d, kind):
    """Every GPU candidate (an H100: 132 SMs, 227 KiB of shared memory a program) fits its shared
    memory estimate, holds at most 32K float32 accumulator values (128 registers a thread at 8 warps),
    and its slices cover D; an RTX card's 99 KiB keeps at least one candidate."""
    for smem in (227 * 1024, 99 * 1024):
        cands = ct.candidates(dtype, d, kind, sms=132, smem=smem)
        assert cands and all(c.target == 264 for c in cands)
        for c in cands:
            assert c.dp >= d and c.do <= c.dp and (kind == "fwd") <= (c.do == c.dp)
            assert ct._smem_need(c, torch.empty(0, dtype=dtype).element_size()) + ct.SMEM_MARGIN <= smem
            assert kind == "fwd" or c.rows * c.do <= 128 * 256 or not c.resident and c.rows * c.do <= 64 * 512
            assert not (c.resident and c.dp > 512)
    with pytest.raises(ValueError, match="kind"):
        ct.candidates(dtype, d, "bwd", sms=132)


@pytest.mark.parametrize("symmetric", [False, True])
def test_timing_runs_cover_a_few_rows_and_the_result_is_the_full_call(monkeypatch, symmetric):
    """Tuning times each candidate on at most TUNE_ROWS output rows (N = 1M would otherwise run the
    whole loss several times per candidate); the call's own result is the full one, by the winner."""
    layouts = [_layout("chunked_one_slice")(torch.float32, 24, kind, sms=None) for kind in ("fwd",)]
    cands = [layouts[0], layouts[0]._replace(rows=16)]
    monkeypatch.setattr(ct, "_device_candidates", lambda q, d, kind: [c._replace(
        do=c.dp if kind == "fwd" else c.do) for c in cands])
    monkeypatch.setattr(ct, "_tuning_allowed", lambda q: True)
    monkeypatch.setattr(ct, "_TUNED", {})
    monkeypatch.setattr(ct, "TUNE_ROWS", 8)
    shapes = []

    def fake_time(run, cfg):
        out = run(cfg, ct.TUNE_ROWS)
        shapes.append(tuple(out[0].shape) if isinstance(out, tuple) else tuple(out.shape))
        return float(cfg.rows)  # the 16-row candidate wins

    monkeypatch.setattr(ct, "_time", fake_time)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(37, 24, generator=g).to(DEVICE), torch.randn(29, 24, generator=g).to(DEVICE)
    scale = torch.tensor(2.0, device=DEVICE)
    row, col = ct.forward(q, k, None, scale, symmetric, -1)
    assert [s[-1] for s in shapes] == [8, 8]  # (splits, rows) partial statistics of 8 rows
    want = _expected(q.cpu(), k.cpu(), None, 2.0, symmetric, -1, torch.ones(37), torch.ones(29))
    _close("row_lse", row, want[0], 1e-5)
    gq, gk, _ = ct.backward(q, k, None, scale, row, col if symmetric else torch.empty(0, device=DEVICE),
                            torch.ones(37, device=DEVICE), torch.ones(29, device=DEVICE) if symmetric else None,
                            symmetric, -1)
    assert shapes[2:] == [(8, 24), (8, 24), (8, 24), (8, 24)]  # G_q then G_k timing runs: 8 rows each
    _close("grad_q", gq, want[2], 1e-4)
    _close("grad_k", gk, want[3], 1e-4)
    assert {key[3] for key in ct._TUNED} == set(ct.KINDS) and all(c.rows == 16 for c in ct._TUNED.values())


def test_tuning_choices_name_each_shape_class_and_config(monkeypatch):
    cfg = ct.Config(64, 32, 64, 512, 512, False, 8, 2, 264)
    monkeypatch.setattr(ct, "_TUNED", {("cuda:0", torch.bfloat16, 512, "grad_k", True, False, 16384, 16384): cfg})
    (got,) = ct.tuning_choices()
    assert got == dict(op="contrastive", kernel="grad_k", device="cuda:0", dtype="bfloat16", dp=512,
                       key=["True", "False", "16384", "16384"], config=cfg._asdict())


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """(dtype, numel) of every tensor the torch ops under it return."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.seen.append((t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_backward_holds_no_float32_copy_of_the_embeddings(dtype):
    """The backward writes the finished gradients (positives added, times the scale) in the inputs'
    dtype from the kernels: besides them only O(N) float32 statistics are allocated (the memory goal of
    issue 4 needs this: float32 (N, D) gradients alone would be twice the bf16 ones)."""
    n, d = 160, 48  # 5 row blocks x 1 slice: enough programs, so the streamed side is not split
    g = torch.Generator().manual_seed(3)
    q, k = (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE, dtype) for _ in range(2))
    scale = torch.tensor(1 / 0.07, device=DEVICE)
    row, col = ct.forward(q, k, None, scale, True, -1)
    g_row = torch.full((n,), 0.5 / n, device=DEVICE)
    pos = ct.Positives(0, n, 0)
    with _Allocations() as allocs:
        gq, gk, g_scale = ct.backward(q, k, None, scale, row, col, g_row, g_row, True, -1, g_pos=-2 * g_row, pos=pos,
                                      need_scale=True)
    assert gq.dtype == gk.dtype == dtype and g_scale.dtype == torch.float32
    wide = [numel for dt, numel in allocs.seen if dt in (torch.float32, torch.float64)]
    assert max(wide) <= 4 * n, f"float32 allocations of {sorted(wide)[-3:]} elements for N={n}, D={d}"
    want = _expected(q.cpu().double(), k.cpu().double(), None, 1 / 0.07, True, -1, g_row.cpu(), g_row.cpu(), pos,
                     -2 * g_row.cpu())
    _close("grad_q", gq, want[2], 2e-2)
    _close("grad_k", gk, want[3], 2e-2)
    _close("grad_scale", g_scale, want[4], 1e-4)


def test_positives_keep_bf16_gradients_accurate_when_views_agree():
    """As the blas backend's test: with the views agreeing (softmax of the positive ~ 0.9999) the positive's
    gradient cancels the softmax's; the kernels add it to dS in float32 before the bf16 rounding, so the
    bf16 gradients keep a few percent of relative accuracy (added after the products: above 100%)."""
    g = torch.Generator().manual_seed(0)
    n, d = 96, 64
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(q + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    q, k = q.bfloat16().double(), k.bfloat16().double()  # the inputs the kernel sees, exactly
    g_row = torch.full((n,), 0.5 / n)
    pos = ct.Positives(0, n, 0)
    want = _expected(q, k, None, 20.0, True, -1, g_row, g_row, pos, -2 * g_row)
    assert torch.exp(20.0 * (q * k).sum(1) - want[0]).mean() > 0.999
    dev = dict(device=DEVICE)
    gq, gk, _ = ct.backward(q.bfloat16().to(**dev), k.bfloat16().to(**dev), None, torch.tensor(20.0, **dev),
                            want[0].float().to(**dev), want[1].float().to(**dev), g_row.to(**dev), g_row.to(**dev), True,
                            -1, g_pos=-2 * g_row.to(**dev), pos=pos)
    for got, ref in ((gq, want[2]), (gk, want[3])):
        assert (got.double().cpu() - ref).abs().max() < 0.1 * ref.abs().max()
