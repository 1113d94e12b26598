"""span_corrupt: identical on every backend, T5's layout and counts, the right span statistics."""
import math

import numpy as np
import pytest
import torch

import fastpt
from fastpt.ops import span_corrupt, span_corrupt_lengths
from tests.helpers import backend_grid

GRID = backend_grid("span_corrupt")
NATIVE = [(d, b) for d, b in GRID if b != "reference"]
SENT, EOS, PAD = 32099, 1, 0
TOKENS = (2, 32000)  # real ids lie below every sentinel a test uses
IDS = dict(sentinel_start_id=SENT, eos_id=EOS, pad_id=PAD)


def _batch(rows, cols, dtype=torch.int64, device="cpu", gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randint(*TOKENS, (rows, cols), generator=g, dtype=dtype).to(device)


def _ragged(rows, cols, gen_seed=0):
    """Random valid lengths in [0, cols], always including 0, 1 and cols when there is room."""
    g = torch.Generator().manual_seed(gen_seed + 1)
    lens = torch.randint(0, cols + 1, (rows,), generator=g)
    for i, v in enumerate([0, 1, cols][:rows]):
        lens[i] = min(v, cols)
    return lens


def _binomial_ok(k, n, p, sigmas=6.0):
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def _t5_counts(L, density, mean):
    """T5's random_spans_noise_mask rule in numpy float32 (tf.cast(length, tf.float32) * noise_density, then
    tf.round: half to even), independent of the library."""
    if L < 2:
        return 0, 0
    f32 = np.float32
    noise = min(max(int(np.round(f32(L) * f32(density))), 1), L - 1)
    spans = min(max(int(np.round(f32(noise) / f32(mean))), 1), noise, L - noise)
    return noise, spans


def _parse(inputs, targets, in_len, tgt_len):
    """Check one row's layout and return (original tokens, keep span lengths, noise span lengths)."""
    inp, tgt = inputs[:in_len], targets[:tgt_len]
    assert inp[-1] == EOS and tgt[-1] == EOS
    assert all(t == PAD for t in inputs[in_len:]) and all(t == PAD for t in targets[tgt_len:])
    sent_in = [t for t in inp[:-1] if t > TOKENS[1]]
    sent_tgt = [t for t in tgt[:-1] if t > TOKENS[1]]
    assert sent_in == sent_tgt == list(range(SENT, SENT - len(sent_in), -1))  # counting down, same order
    if not sent_in:  # no noise: the whole row is kept
        assert len(tgt) == 1
        return inp[:-1], [], []
    assert tgt[0] == SENT and inp[-2] > TOKENS[1] and inp[0] < TOKENS[1]  # starts non-noise, ends noise
    spans, cur = {}, None
    for t in tgt[:-1]:
        if t > TOKENS[1]:
            cur = spans.setdefault(t, [])
        else:
            cur.append(t)
    tokens, keep, run = [], [], 0
    for t in inp[:-1]:
        if t > TOKENS[1]:
            tokens += spans[t]
            keep.append(run)
            run = 0
        else:
            tokens.append(t)
            run += 1
    noise = [len(spans[s]) for s in sent_in]
    assert min(keep) >= 1 and min(noise) >= 1
    return tokens, keep, noise


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("cols", [1, 2, 17, 113, 512])
def test_backends_bit_identical(device, backend, rows, cols):
    for dtype in (torch.int32, torch.int64):
        ids = _batch(rows, cols, dtype, device, gen_seed=rows * cols)
        lens = _ragged(rows, cols, gen_seed=cols)
        g = torch.Generator().manual_seed(rows + cols)
        per_row = dict(noise_density=torch.rand(rows, generator=g, dtype=torch.float64) * 0.98 + 0.01,
                       mean_span_len=1 + 20 * torch.rand(rows, generator=g, dtype=torch.float64))
        for seqlens, rates in ((lens, dict()), (None, dict(noise_density=0.5, mean_span_len=1.0)),
                               (lens, dict(noise_density=0.9, mean_span_len=64.0)), (lens, per_row)):
            ref = span_corrupt(ids, seqlens, **rates, **IDS, seed=2**40 + cols, backend="reference")
            out = span_corrupt(ids, seqlens, **rates, **IDS, seed=2**40 + cols, backend=backend)
            assert out.inputs.dtype == out.targets.dtype == dtype and out.inputs.device == ids.device
            assert torch.equal(out.inputs, ref.inputs) and torch.equal(out.targets, ref.targets), rates


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.5, 8.0), (0.3, 1.0), (0.05, 2.5)])
def test_reconstruction_layout_and_counts(device, backend, density, mean):
    rows, cols = 48, 113
    ids = _batch(rows, cols, device=device, gen_seed=4)
    lens = _ragged(rows, cols, gen_seed=4)
    inputs, targets = span_corrupt(ids, lens, noise_density=density, mean_span_len=mean, **IDS, seed=9,
                                   backend=backend)
    in_len, tgt_len = span_corrupt_lengths(lens, noise_density=density, mean_span_len=mean)
    assert inputs.shape == (rows, int(in_len.max())) and targets.shape == (rows, int(tgt_len.max()))
    for r in range(rows):
        L = int(lens[r])
        tokens, keep, noise = _parse(inputs[r].tolist(), targets[r].tolist(), int(in_len[r]), int(tgt_len[r]))
        assert tokens == ids[r, :L].tolist()  # exact reconstruction
        assert (sum(noise), len(noise)) == _t5_counts(L, density, mean)
        assert len(keep) == len(noise)


def test_lengths_match_t5_helper():
    # T5's random_spans_helper: 568 raw tokens -> inputs of 512 and targets of 114 at 15% / 3.
    assert span_corrupt_lengths(568, noise_density=0.15, mean_span_len=3.0) == (512, 114)
    assert span_corrupt_lengths(0) == (1, 1) and span_corrupt_lengths(1) == (2, 1)
    lens = torch.tensor([568, 0, 1, 2, 10])
    in_len, tgt_len = span_corrupt_lengths(lens)
    for L, a, b in zip(lens.tolist(), in_len.tolist(), tgt_len.tolist()):
        n, k = _t5_counts(L, 0.15, 3.0)
        assert (a, b) == (L - n + k + 1, n + k + 1)
    for bad in (-3, [4, -1], torch.tensor(5), [[1]]):
        with pytest.raises(ValueError, match="seqlens"):
            span_corrupt_lengths(bad)
    with pytest.raises(ValueError, match="noise_density"):
        span_corrupt_lengths(lens, noise_density=[0.1, 0.2])


def test_counts_round_in_float32_as_t5():
    """Where float64 and T5's float32 round apart (L = 90 at 35% noise: 31.4999... vs 31.5 -> 32), the
    counts are T5's; the whole grid of lengths and rates agrees with the float32 rule (24 cases differed)."""
    from fastpt.ops.span_corrupt import span_counts
    f64 = lambda v: torch.full((1,), v, dtype=torch.float64)  # noqa: E731
    assert [int(x) for x in span_counts(torch.tensor([90]), f64(0.35), f64(3.0))] == [32, 11]
    lens = torch.arange(0, 600)
    for density in (0.15, 0.25, 0.35, 0.5, 0.8):
        for mean in (2.0, 3.0, 8.0, 64.0):
            noise, spans = span_counts(lens, f64(density).expand(600), f64(mean).expand(600))
            want = [_t5_counts(L, density, mean) for L in lens.tolist()]
            assert list(zip(noise.tolist(), spans.tolist())) == want, (density, mean)


def test_statistics_noise_and_span_lengths():
    rows, cols, density, mean = 3000, 64, 0.15, 3.0
    inputs, targets = span_corrupt(_batch(rows, cols, gen_seed=5), noise_density=density, mean_span_len=mean,
                                   **IDS, seed=123)
    n_noise, k = _t5_counts(cols, density, mean)  # 10 noise tokens in 3 spans; 54 kept in 3 spans
    n_keep = cols - n_noise
    in_len, tgt_len = n_keep + k + 1, n_noise + k + 1
    assert inputs.shape == (rows, in_len) and targets.shape == (rows, tgt_len)
    sent = targets[:, :-1] > TOKENS[1]
    assert bool((sent.sum(1) == k).all())
    assert float((~sent).sum()) / (rows * cols) == pytest.approx(density, abs=0.5 / cols)
    # Noise span lengths: the gaps between sentinels in the targets.
    marks = torch.nonzero(targets > TOKENS[1])[:, 1].reshape(rows, k)
    noise_lens = torch.diff(marks, dim=1, append=torch.full((rows, 1), tgt_len - 1)) - 1
    keep_marks = torch.nonzero(inputs > TOKENS[1])[:, 1].reshape(rows, k)
    keep_lens = torch.diff(keep_marks, dim=1, prepend=torch.full((rows, 1), -1)) - 1
    assert bool((noise_lens >= 1).all()) and bool((keep_lens >= 1).all())
    # Cut points are uniform: k - 1 of the n - 1 gaps, each a cut with probability (k-1)/(n-1),
    # and a span length j has probability C(n-j-1, k-2) / C(n-1, k-1).
    for n, lens in ((n_noise, noise_lens), (n_keep, keep_lens)):
        cuts = torch.cumsum(lens, 1)[:, :-1]
        counts = torch.bincount(cuts.flatten(), minlength=n)[1:n]
        for c in counts.tolist():
            assert _binomial_ok(c, rows, (k - 1) / (n - 1))
        hist = torch.bincount(lens.flatten(), minlength=n + 1)
        pmf = {j: math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1) for j in range(1, n - k + 2)}
        for j, p in pmf.items():
            assert _binomial_ok(int(hist[j]), rows * k, p), (n, j)
        _assert_span_means(lens, pmf)


def _assert_span_means(lens, pmf, sigmas=6.0):
    """The mean length of the first, second, ... span of the rows: each is n / k within ``sigmas`` standard
    errors of the span-length law ``pmf``. (The mean over all spans, checked here before, is n / k by
    construction: a row's k spans always sum to n.)"""
    mean = sum(j * p for j, p in pmf.items())
    sd = math.sqrt(sum((j - mean) ** 2 * p for j, p in pmf.items()))
    got = lens.double().mean(0)
    bound = sigmas * sd / math.sqrt(lens.shape[0])
    assert bool(((got - mean).abs() <= bound).all()), f"mean span length per position {got.tolist()}, " \
        f"expected {mean:.4g} +- {bound:.3g}"


def test_statistics_over_ragged_rows():
    rows, cols = 1000, 512
    lens = torch.randint(200, cols + 1, (rows,), generator=torch.Generator().manual_seed(6))
    for density, mean in ((0.15, 3.0), (0.5, 8.0), (0.3, 2.0)):
        _, targets = span_corrupt(_batch(rows, cols, gen_seed=6), lens, noise_density=density, mean_span_len=mean,
                                  **IDS, seed=7)
        body = (targets != PAD) & (targets != EOS)
        spans = int((body & (targets > TOKENS[1])).sum())
        noise = int(body.sum()) - spans
        assert noise / int(lens.sum()) == pytest.approx(density, rel=0.01)
        assert noise / spans == pytest.approx(mean, rel=0.03)


@pytest.mark.parametrize("device,backend", GRID)
def test_sentinel_floor(device, backend):
    ids = _batch(2, 40, device=device) + 100  # tokens >= 100, EOS and PAD far from the sentinels
    _, k = _t5_counts(40, 0.5, 1.0)  # 20 noise tokens in 20 spans
    ok = dict(noise_density=0.5, mean_span_len=1.0, eos_id=90, pad_id=91, backend=backend)
    inputs, targets = span_corrupt(ids, sentinel_start_id=k - 1, **ok)
    # The sentinels of a row run from k - 1 down to exactly 0, in order.
    assert targets[0, :-1][targets[0, :-1] < 90].tolist() == list(range(k - 1, -1, -1))
    assert inputs[1, :-1][inputs[1, :-1] < 90].tolist() == list(range(k - 1, -1, -1))
    with pytest.raises(ValueError, match="sentinel_start_id"):
        span_corrupt(ids, sentinel_start_id=k - 2, **ok)


@pytest.mark.parametrize("device,backend", GRID)
def test_determinism_seed_and_rows(device, backend):
    ids = _batch(1, 200, device=device).expand(4, 200).contiguous()  # four identical rows
    a = span_corrupt(ids, **IDS, seed=2**64 - 1, backend=backend)
    b = span_corrupt(ids, **IDS, seed=2**64 - 1, backend=backend)
    c = span_corrupt(ids, **IDS, seed=2**64 - 2, backend=backend)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)
    # The row index enters the random bits: identical rows are corrupted differently.
    assert len({tuple(t) for t in a.targets.tolist()}) == 4


@pytest.mark.parametrize("device,backend", GRID)
def test_per_row_rates_and_defaults(device, backend):
    rows, cols = 5, 97
    ids = _batch(rows, cols, device=device, gen_seed=8)
    dens, means = [0.1, 0.5, 0.3, 0.15, 0.8], [1.0, 8.0, 3.0, 64.0, 2.0]
    out = span_corrupt(ids, noise_density=torch.tensor(dens), mean_span_len=means, **IDS, seed=3, backend=backend)
    in_len, tgt_len = span_corrupt_lengths(torch.full((rows,), cols), noise_density=dens, mean_span_len=means)
    for r in range(rows):  # row r is what a batch-wide rate of dens[r] gives row r
        one = span_corrupt(ids, noise_density=dens[r], mean_span_len=means[r], **IDS, seed=3, backend=backend)
        assert torch.equal(out.inputs[r, : in_len[r]], one.inputs[r, : in_len[r]])
        assert torch.equal(out.targets[r, : tgt_len[r]], one.targets[r, : tgt_len[r]])
    full = torch.full((rows,), cols)
    a = span_corrupt(ids, **IDS, seed=3, backend=backend)
    b = span_corrupt(ids, full, noise_density=torch.full((rows,), 0.15), mean_span_len=3.0, **IDS, seed=3,
                     backend=backend)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    t = _batch(cols, rows, device=device).t()  # a transposed view
    assert torch.equal(span_corrupt(t, **IDS, backend=backend).targets,
                       span_corrupt(t.contiguous(), **IDS, backend=backend).targets)


@pytest.mark.parametrize("device,backend", GRID)
def test_empty_and_short(device, backend):
    out = span_corrupt(torch.zeros(0, 5, dtype=torch.int64, device=device), **IDS, backend=backend)
    assert out.inputs.shape == (0, 0) and out.targets.shape == (0, 0)
    out = span_corrupt(torch.zeros(3, 0, dtype=torch.int32, device=device), **IDS, backend=backend)
    assert out.inputs.tolist() == [[EOS]] * 3 and out.targets.tolist() == [[EOS]] * 3
    ids = _batch(3, 4, device=device)
    out = span_corrupt(ids, torch.tensor([1, 0, 2]), **IDS, backend=backend)
    assert out.inputs.tolist() == [[ids[0, 0].item(), EOS, PAD], [EOS, PAD, PAD], [ids[2, 0].item(), SENT, EOS]]
    assert out.targets.tolist() == [[EOS, PAD, PAD], [EOS, PAD, PAD], [SENT, ids[2, 1].item(), EOS]]


def test_dispatch_declarations():
    from fastpt.ops.span_corrupt import OP, _prepare

    assert set(OP.backends) == {"cpu", "reference"}
    meta = _prepare(torch.zeros(2, 8, dtype=torch.int64, device="meta"), None, noise_density=0.15,
                    mean_span_len=3.0, **IDS, seed=0)
    assert OP.select(None, **meta).name == "reference"  # non-CPU tensors: the cpu backend refuses
    with pytest.raises(fastpt.BackendError, match="needs cpu tensors"):
        OP.select("cpu", **meta)
    with pytest.raises(fastpt.BackendError, match="does not implement"):
        span_corrupt(_batch(2, 8), **IDS, backend="triton")
    assert "span_corrupt" in fastpt.info()["ops"]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_gpu_ids_are_corrupted_on_a_host_copy(device):
    """No GPU kernel: with backend None, ids on a GPU went to the reference on the device (three host reads and
    ~100 small ops per row). They are now corrupted by the C++ kernel on a host copy, the results moved back:
    the same tensors as the reference's, on the ids' device; a forced backend still runs where the ids are."""
    from fastpt.ops.span_corrupt import on_host
    from fastpt.ops.ul2 import ul2_denoise

    meta = torch.zeros(2, 8, dtype=torch.int64, device="meta")
    assert on_host(meta, None) == meta.device and on_host(meta, "reference") is None
    assert on_host(_batch(2, 8), None) is None
    ids, lens = _batch(5, 67, device=device), _ragged(5, 67).to(device)
    for rates in (dict(), dict(noise_density=torch.full((5,), 0.4, device=device), mean_span_len=2.0)):
        ref = span_corrupt(ids, lens, **rates, **IDS, seed=9, backend="reference")
        out = span_corrupt(ids, lens, **rates, **IDS, seed=9)
        assert out.inputs.device == ids.device and torch.equal(out.inputs, ref.inputs)
        assert torch.equal(out.targets, ref.targets)
    ref = ul2_denoise(ids, lens, **IDS, mode_token_ids={"R": 7, "X": 8, "S": 9}, seed=4, backend="reference")
    out = ul2_denoise(ids, lens, **IDS, mode_token_ids={"R": 7, "X": 8, "S": 9}, seed=4)
    for a, b in zip(out, ref, strict=True):
        assert a.device == ids.device and torch.equal(a, b)


BAD = [
    (dict(input_ids=torch.zeros(2, 8)), TypeError, "input_ids"),
    (dict(input_ids=torch.zeros(8, dtype=torch.int64)), ValueError, "input_ids"),
    (dict(input_ids=torch.zeros(2, 2, 8, dtype=torch.int64)), ValueError, "input_ids"),
    (dict(seqlens=torch.tensor([8, 9])), ValueError, "seqlens"),
    (dict(seqlens=torch.tensor([8, -1])), ValueError, "seqlens"),
    (dict(seqlens=torch.tensor([8])), ValueError, "seqlens"),
    (dict(seqlens=torch.tensor([8.0, 8.0])), TypeError, "seqlens"),
    (dict(noise_density=0.0), ValueError, "noise_density"),
    (dict(noise_density=1.0), ValueError, "noise_density"),
    (dict(noise_density=float("nan")), ValueError, "noise_density"),
    (dict(noise_density=torch.tensor([0.1, 0.2, 0.3])), ValueError, "noise_density"),
    (dict(noise_density="x"), TypeError, "noise_density"),
    (dict(mean_span_len=0.5), ValueError, "mean_span_len"),
    (dict(mean_span_len=torch.tensor([3.0, float("inf")])), ValueError, "mean_span_len"),
    (dict(sentinel_start_id=-1), ValueError, "sentinel_start_id"),
    (dict(sentinel_start_id=1.5), TypeError, "sentinel_start_id"),
    (dict(input_ids=torch.zeros(2, 8, dtype=torch.int32), sentinel_start_id=2**31), ValueError, "sentinel_start_id"),
    (dict(eos_id=-2), ValueError, "eos_id"),
    (dict(pad_id=None), TypeError, "pad_id"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(backend="nope"), ValueError, "backend"),
]


@pytest.mark.parametrize("change,exc,name", BAD)
def test_bad_inputs_name_the_argument(change, exc, name):
    kwargs = dict(input_ids=torch.zeros(2, 8, dtype=torch.int64), seqlens=None, **IDS)
    kwargs.update(change)
    with pytest.raises(exc, match=name):
        span_corrupt(**kwargs)


def test_cpu_selection_fallback_row():
    # White-box: the cpu kernel selects cut points among the positions whose bits fall below a
    # bound expecting need + need // 4 + 16 of them, and among all positions when fewer pass
    # (under 1e-3 of rows). Row 1566 of seed 0 takes that path in the non-noise domain here.
    from fastpt.ops import _rng
    from fastpt.ops.span_corrupt import OP, op_inputs

    L, density, mean, row = 7497, 0.0128, 2.0, 1566
    n_noise, k = _t5_counts(L, density, mean)
    m, need = L - n_noise - 1, k - 1
    assert (m, need) == (7400, 47)
    bound = ((need + need // 4 + 16) << 32) // m
    h = _rng.bits(_rng.stream_key(0, _rng.STREAM_SPAN_KEEP), torch.tensor(row), torch.arange(1, m + 1))
    assert int((h < bound).sum()) < need
    rows = torch.tensor([row, 7])  # and an ordinary row
    inputs = op_inputs(_batch(2, L, gen_seed=9), torch.full((2,), L), torch.full((2,), n_noise), torch.full((2,), k),
                       rows, **IDS, seed=0)
    ref, out = OP("reference", **inputs), OP(None, **inputs)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
