"""ul2_denoise: the mixture picks denoisers by weight, R/X rows are span_corrupt rows, S rows split cleanly."""
import math

import pytest
import torch

from fastpt.ops import UL2_DENOISERS, Denoiser, span_corrupt, ul2_denoise
from tests.helpers import backend_grid

GRID = backend_grid("span_corrupt")
SENT, EOS, PAD = 32099, 1, 0
MODES = {"R": 32100, "X": 32101, "S": 32102}
IDS = dict(sentinel_start_id=SENT, eos_id=EOS, pad_id=PAD)


def _batch(rows, cols, device="cpu", gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randint(2, 32000, (rows, cols), generator=g).to(device)


def _ragged(rows, cols, gen_seed=0):
    lens = torch.randint(0, cols + 1, (rows,), generator=torch.Generator().manual_seed(gen_seed + 1))
    lens[:3] = torch.tensor([0, 1, cols])[: min(rows, 3)]
    return lens


def _binomial_ok(k, n, p, sigmas=6.0):
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("weights", [None, [1, 2, 3, 0, 0, 5, 4]])
def test_denoiser_frequencies_follow_weights(weights):
    rows = 20000
    out = ul2_denoise(_batch(rows, 4), **IDS, weights=weights, seed=17)
    w = torch.ones(7) if weights is None else torch.tensor(weights, dtype=torch.float64)
    counts = torch.bincount(out.denoiser, minlength=7)
    for c, p in zip(counts.tolist(), (w / w.sum()).tolist()):
        if p == 0:
            assert c == 0
        else:
            assert _binomial_ok(c, rows, p)


@pytest.mark.parametrize("device,backend", GRID)
def test_rows_are_span_corrupt_or_prefix_lm(device, backend):
    rows, cols = 64, 150
    ids, lens = _batch(rows, cols, device, 3), _ragged(rows, cols, 3)
    out = ul2_denoise(ids, lens, **IDS, mode_token_ids=MODES, seed=5, backend=backend)
    assert out.inputs.shape == (rows, int(out.input_lengths.max()))
    assert out.targets.shape == (rows, int(out.target_lengths.max()))
    picked = [UL2_DENOISERS[i] for i in out.denoiser.tolist()]
    assert {d.mode for d in picked} == {"R", "X", "S"}
    # R/X rows: exactly the rows span_corrupt gives with each row's own rates (S rows: any rate).
    dens = torch.tensor([d.noise_density or 0.5 for d in picked], dtype=torch.float64)
    means = torch.tensor([d.mean_span_len or 3.0 for d in picked], dtype=torch.float64)
    sc = span_corrupt(ids, lens, noise_density=dens, mean_span_len=means, **IDS, seed=5, backend=backend)
    for r, d in enumerate(picked):
        L, a, b = int(lens[r]), int(out.input_lengths[r]), int(out.target_lengths[r])
        inp, tgt = out.inputs[r].tolist(), out.targets[r].tolist()
        assert inp[0] == MODES[d.mode] and inp[a - 1] == EOS and tgt[b - 1] == EOS
        assert set(inp[a:]) <= {PAD} and set(tgt[b:]) <= {PAD}
        if d.mode == "S":
            prefix = a - 2
            assert (1 <= prefix <= L - 1) if L >= 2 else prefix == L
            assert inp[1: a - 1] + tgt[: b - 1] == ids[r, :L].tolist()
        else:
            assert inp[1:a] == sc.inputs[r, : a - 1].tolist() and tgt[:b] == sc.targets[r, :b].tolist()
            assert set(sc.inputs[r, a - 1:].tolist()) <= {PAD}


@pytest.mark.parametrize("device,backend", GRID)
def test_mode_tokens_only_prepend(device, backend):
    ids, lens = _batch(40, 33, device, 4), _ragged(40, 33, 4)
    plain = ul2_denoise(ids, lens, **IDS, seed=8, backend=backend)
    moded = ul2_denoise(ids, lens, **IDS, mode_token_ids=MODES, seed=8, backend=backend)
    assert torch.equal(plain.denoiser, moded.denoiser) and torch.equal(plain.targets, moded.targets)
    assert torch.equal(moded.inputs[:, 1:], plain.inputs)
    assert torch.equal(moded.input_lengths, plain.input_lengths + 1)
    modes = torch.tensor([MODES[UL2_DENOISERS[i].mode] for i in moded.denoiser.tolist()], device=device)
    assert torch.equal(moded.inputs[:, 0], modes)


def test_backends_agree_and_determinism():
    ids, lens = _batch(50, 97, gen_seed=6), _ragged(50, 97, 6)
    runs = [ul2_denoise(ids, lens, **IDS, mode_token_ids=MODES, seed=9, backend=b) for _, b in GRID]
    runs.append(ul2_denoise(ids.to(torch.int32), lens, **IDS, mode_token_ids=MODES, seed=9))
    for out in runs[1:]:
        for x, y in zip(out, runs[0]):
            assert torch.equal(x.long(), y.long())
    other = ul2_denoise(ids, lens, **IDS, mode_token_ids=MODES, seed=10)
    assert not torch.equal(other.denoiser, runs[0].denoiser)


def test_prefix_split_is_uniform():
    rows, L = 9000, 10
    out = ul2_denoise(_batch(rows, L, gen_seed=7), **IDS, denoisers=[Denoiser("S")], seed=1)
    assert out.inputs.shape[1] <= L and out.targets.shape[1] <= L
    counts = torch.bincount(out.input_lengths - 1, minlength=L)  # prefix lengths
    assert counts[0] == 0 and counts[L:].sum() == 0
    for c in counts[1:L].tolist():
        assert _binomial_ok(c, rows, 1 / (L - 1))


def test_custom_mixture_and_edges():
    ids = _batch(6, 20, gen_seed=2)
    only_r = ul2_denoise(ids, **IDS, denoisers=[("R", 3.0, 0.15)], seed=4)
    sc = span_corrupt(ids, noise_density=0.15, mean_span_len=3.0, **IDS, seed=4)
    assert torch.equal(only_r.inputs, sc.inputs) and torch.equal(only_r.targets, sc.targets)
    # A batch with no span rows never needs a sentinel.
    s_only = ul2_denoise(ids, sentinel_start_id=0, eos_id=EOS, pad_id=PAD, denoisers=[Denoiser("S")])
    assert bool((s_only.denoiser == 0).all())
    empty = ul2_denoise(torch.zeros(0, 5, dtype=torch.int64), **IDS, mode_token_ids=MODES)
    assert empty.inputs.shape == (0, 0) and empty.denoiser.shape == (0,)
    no_cols = ul2_denoise(torch.zeros(9, 0, dtype=torch.int32), **IDS)  # every row: inputs = targets = EOS
    assert no_cols.inputs.tolist() == [[EOS]] * 9 and no_cols.targets.tolist() == [[EOS]] * 9
    assert {UL2_DENOISERS[i].mode for i in no_cols.denoiser.tolist()} >= {"S", "X"}


BAD = [
    (dict(input_ids=torch.zeros(2, 8)), TypeError, "input_ids"),
    (dict(input_ids=torch.zeros(8, dtype=torch.int64)), ValueError, "input_ids"),
    (dict(seqlens=torch.tensor([3, 9])), ValueError, "seqlens"),
    (dict(denoisers=[]), ValueError, "denoisers"),
    (dict(denoisers=[("Q", 3.0, 0.15)]), ValueError, r"denoisers\[0\]"),
    (dict(denoisers=[Denoiser("S"), Denoiser("R")]), ValueError, r"denoisers\[1\]"),
    (dict(denoisers=[("X", 0.5, 0.5)]), ValueError, r"denoisers\[0\]"),
    (dict(denoisers=[("X", 3.0, 1.5)]), ValueError, r"denoisers\[0\]"),
    (dict(denoisers=[("X", "a", 0.5)]), ValueError, r"denoisers\[0\]"),
    (dict(denoisers=5), TypeError, "denoisers"),
    (dict(weights=[1, 1]), ValueError, "weights"),
    (dict(weights=[0] * 7), ValueError, "weights"),
    (dict(weights=[1, 1, 1, -1, 1, 1, 1]), ValueError, "weights"),
    (dict(weights="abc"), TypeError, "weights"),
    (dict(mode_token_ids={"R": 5, "X": 6}), ValueError, "mode_token_ids"),
    (dict(mode_token_ids=[5, 6, 7]), TypeError, "mode_token_ids"),
    (dict(mode_token_ids={"R": 5, "X": -6, "S": 7}), ValueError, "mode_token_ids"),
    (dict(sentinel_start_id=-1), ValueError, "sentinel_start_id"),
    (dict(sentinel_start_id=2), ValueError, "sentinel_start_id"),  # R/X rows need more sentinels
    (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(seed=2**64), ValueError, "seed"),
]


@pytest.mark.parametrize("change,exc,name", BAD)
def test_bad_inputs_name_the_argument(change, exc, name):
    kwargs = dict(input_ids=_batch(16, 64), **IDS)
    kwargs.update(change)
    with pytest.raises(exc, match=name):
        ul2_denoise(**kwargs)


def test_choice_and_split_follow_the_spec():
    from fastpt.ops import _rng

    seed, scale = 21, 1 << 24
    u0 = int(_rng.bits(_rng.stream_key(seed, _rng.STREAM_UL2_DENOISER), torch.tensor(0), torch.tensor(0))) >> 8
    ids = _batch(1, 12)
    mix = [Denoiser("R", 3.0, 0.15), Denoiser("S")]
    # Row 0 draws u0: a table boundary exactly at u0 sends it to the second denoiser, one above to the first.
    assert ul2_denoise(ids, **IDS, denoisers=mix, weights=[u0, scale - u0], seed=seed).denoiser.item() == 1
    assert ul2_denoise(ids, **IDS, denoisers=mix, weights=[u0 + 1, scale - u0 - 1], seed=seed).denoiser.item() == 0
    lens = torch.tensor([12, 7, 2, 11])
    out = ul2_denoise(_batch(4, 12), lens, **IDS, denoisers=[Denoiser("S")], seed=seed)
    b = _rng.bits(_rng.stream_key(seed, _rng.STREAM_UL2_SPLIT), torch.arange(4), torch.zeros(4, dtype=torch.int64))
    assert torch.equal(out.input_lengths - 1, 1 + ((b * (lens - 1)) >> 32))
