"""fastpt.ops.random_masking: MAE random masking and BEiT block masking, on every usable backend."""
import math

import pytest
import torch

from fastpt import BackendError
from fastpt.ops import _rng, random_masking
from fastpt.ops.random_masking import MAX_TRITON_PATCHES, OP

from ..helpers import backend_grid

GRID = backend_grid("random_masking")
# Block mode is implemented by the reference and the C++ CPU backend only.
BLOCK_BACKENDS = [b for dev, b in GRID if dev == "cpu" and b in ("reference", "cpu")]


def check_structure(ids_keep, mask, ids_restore, batch, num_patches, mask_ratio):
    """Every invariant of the outputs, independent of which patches were chosen."""
    num_masked = int(round(num_patches * mask_ratio))
    keep = num_patches - num_masked
    assert ids_keep.shape == (batch, keep) and ids_keep.dtype == torch.int64
    assert mask.shape == (batch, num_patches) and mask.dtype == torch.bool
    assert ids_restore.shape == (batch, num_patches) and ids_restore.dtype == torch.int64
    assert torch.equal(mask.sum(1), torch.full((batch,), num_masked, device=mask.device))
    if keep > 1:
        assert bool((ids_keep[:, 1:] > ids_keep[:, :-1]).all()), "ids_keep not strictly ascending"
    assert not bool(mask.gather(1, ids_keep).any()), "a kept position is marked masked"
    # ids_restore is a permutation of [0, L) whose first K slots are the kept positions in order.
    assert torch.equal(ids_restore.sort(1).values, torch.arange(num_patches, device=mask.device).expand(batch, -1))
    inverse = torch.argsort(ids_restore, dim=1)
    assert torch.equal(inverse[:, :keep], ids_keep)
    assert bool(mask.gather(1, inverse[:, keep:]).all())
    if num_masked > 1:
        assert bool((inverse[:, keep:][:, 1:] > inverse[:, keep:][:, :-1]).all()), "masked slots not in position order"


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("num_patches", [1, 17, 196, 197, 1000])
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_backends_match_reference(device, backend, num_patches, batch):
    for mask_ratio in (0.75, 0.5, 0.0):
        if num_patches - round(num_patches * mask_ratio) < 1:
            continue
        ref = random_masking(batch, num_patches, mask_ratio=mask_ratio, seed=11, device=device, backend="reference")
        out = random_masking(batch, num_patches, mask_ratio=mask_ratio, seed=11, device=device, backend=backend)
        check_structure(*out, batch, num_patches, mask_ratio)
        for name, r, o in zip(("ids_keep", "mask", "ids_restore"), ref, out):
            assert o.device.type == device
            assert torch.equal(r, o), f"{backend}: {name} differs from the reference (L={num_patches}, ratio={mask_ratio})"


@pytest.mark.parametrize("device,backend", GRID)
def test_kept_set_is_the_smallest_hashes(device, backend):
    # The spec, checked directly: row b keeps the K positions of smallest bits(key, b, l), all distinct.
    batch, num_patches, keep = 5, 37, 37 - round(37 * 0.6)
    ids_keep, _, _ = random_masking(batch, num_patches, mask_ratio=0.6, seed=2**40 + 3, device=device,
                                    backend=backend)
    h = _rng.grid_bits(_rng.stream_key(2**40 + 3, _rng.STREAM_MAE), batch, num_patches)
    assert all(len(set(row.tolist())) == num_patches for row in h), "hashes of a row must be distinct"
    assert torch.equal(ids_keep.cpu(), h.argsort(1)[:, :keep].sort(1).values)


@pytest.mark.parametrize("device,backend", GRID)
def test_mae_round_trip(device, backend):
    batch, num_patches, dim = 3, 197, 8
    x = torch.randn(batch, num_patches, dim, device=device)
    mask_token = torch.randn(dim, device=device)
    ids_keep, mask, ids_restore = random_masking(batch, num_patches, seed=4, device=device, backend=backend)
    x_keep = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, dim))
    tokens = mask_token.expand(batch, num_patches - ids_keep.shape[1], dim)
    full = torch.gather(torch.cat([x_keep, tokens], 1), 1, ids_restore[..., None].expand(-1, -1, dim))
    assert torch.equal(full, torch.where(mask[..., None], mask_token, x))


@pytest.mark.parametrize("device,backend", GRID)
def test_determinism_per_seed(device, backend):
    a = random_masking(7, 196, seed=123, backend=backend, device=device)
    b = random_masking(7, 196, seed=123, backend=backend, device=device)
    c = random_masking(7, 196, seed=124, backend=backend, device=device)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    # Rows differ from each other, and row b does not depend on the batch size (pure function of row).
    assert len({tuple(r.tolist()) for r in a[1]}) == 7
    assert torch.equal(random_masking(3, 196, seed=123, backend=backend, device=device)[1], a[1][:3])


def binomial_bound(p, n, sigmas=5.0):
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in {b for _, b in GRID}])
def test_positions_masked_uniformly(backend):
    rows, num_patches, ratio = 40_000, 49, 0.75
    _, mask, _ = random_masking(rows, num_patches, mask_ratio=ratio, seed=9, backend=backend)
    p = round(num_patches * ratio) / num_patches
    freq = mask.double().mean(0)
    # 49 positions at 5 sigma: a false alarm is below 1e-4.
    assert float((freq - p).abs().max()) < binomial_bound(p, rows)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in {b for _, b in GRID}])
def test_subsets_are_uniform(backend):
    # L=5, K=2: all 10 kept pairs equally likely (chi-square, 9 dof; 40 is far beyond p=1e-5).
    rows = 50_000
    ids_keep, _, _ = random_masking(rows, 5, mask_ratio=0.6, seed=77, backend=backend)
    counts = torch.bincount(ids_keep[:, 0] * 5 + ids_keep[:, 1], minlength=25)
    observed = counts[counts > 0].double()
    assert observed.numel() == 10
    expected = rows / 10
    assert float(((observed - expected) ** 2 / expected).sum()) < 40.0


def test_edge_sizes():
    ids_keep, mask, ids_restore = random_masking(0, 17, backend="reference")
    assert ids_keep.shape == (0, 4) and mask.shape == (0, 17) and ids_restore.shape == (0, 17)
    for device, backend in GRID:
        ids_keep, mask, ids_restore = random_masking(2, 9, mask_ratio=0.0, device=device, backend=backend)
        assert not bool(mask.any()) and torch.equal(ids_keep.cpu(), torch.arange(9).expand(2, -1))
        assert torch.equal(ids_restore.cpu(), torch.arange(9).expand(2, -1))
        assert random_masking(0, 9, device=device, backend=backend)[0].shape == (0, 2)
    # num_masked = round(L * mask_ratio) rounds half to even (Python's round); pin it.
    assert random_masking(1, 10, mask_ratio=0.25)[1].sum() == 2  # round(2.5) == 2
    assert random_masking(1, 14, mask_ratio=0.25)[1].sum() == 4  # round(3.5) == 4


# ----------------------------------------------------------------------------- block mode


@pytest.mark.parametrize("grid,ratio,min_block,min_aspect", [
    ((14, 14), 0.4, 4, 0.3), ((14, 14), 0.75, 4, 0.3), ((7, 5), 0.5, 2, 0.5),
    ((1, 9), 0.5, 4, 0.3),  # no block fits a 1-high grid (BEiT needs h < H): pure top-up
    ((4, 4), 0.5, 16, 0.3),  # blocks this large never fit either
    ((16, 12), 0.6, 1, 1.0), ((13, 17), 0.3, 6, 0.1),
])
def test_block_backends_agree(grid, ratio, min_block, min_aspect):
    num_patches = grid[0] * grid[1]
    kw = dict(mask_ratio=ratio, seed=21, mode="block", grid=grid, min_block_patches=min_block, min_aspect=min_aspect)
    outs = [random_masking(6, num_patches, backend=b, **kw) for b in BLOCK_BACKENDS]
    for out in outs:
        check_structure(*out, 6, num_patches, ratio)
    for out in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outs[0], out))


@pytest.mark.skipif("cpu" not in BLOCK_BACKENDS, reason="C++ CPU backend not built")
def test_cpu_threaded_batches_match_reference():
    # Large enough that the C++ kernels split rows across OpenMP threads.
    for kw in (dict(), dict(mode="block", grid=(14, 14), mask_ratio=0.4)):
        ref = random_masking(300, 196, seed=31, backend="reference", **kw)
        out = random_masking(300, 196, seed=31, backend="cpu", **kw)
        assert all(torch.equal(x, y) for x, y in zip(ref, out)), kw


def masked_neighbour_fraction(mask, grid):
    """Mean fraction of the in-grid 4-neighbours of masked patches that are masked too."""
    m = mask.view(-1, *grid).float()
    pad = torch.nn.functional.pad(m, (1, 1, 1, 1))
    ones = torch.nn.functional.pad(torch.ones_like(m), (1, 1, 1, 1))
    nb = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    deg = ones[:, :-2, 1:-1] + ones[:, 2:, 1:-1] + ones[:, 1:-1, :-2] + ones[:, 1:-1, 2:]
    return float((nb / deg)[m.bool()].mean())


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_block_masks_are_blocky(backend):
    grid, ratio = (14, 14), 0.4
    _, block, _ = random_masking(64, 196, mask_ratio=ratio, seed=5, mode="block", grid=grid, backend=backend)
    _, rand, _ = random_masking(64, 196, mask_ratio=ratio, seed=5, backend=backend)
    assert block.sum(1).eq(78).all()
    random_frac, block_frac = masked_neighbour_fraction(rand, grid), masked_neighbour_fraction(block, grid)
    assert random_frac < 0.5 and block_frac > 0.75, (random_frac, block_frac)
    # Over many rows every patch gets masked sometimes (placement and top-up cover the grid).
    _, many, _ = random_masking(2000, 196, mask_ratio=ratio, seed=6, mode="block", grid=grid, backend=backend)
    assert bool(many.any(0).all())
    assert not torch.equal(many[:64], block)


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_block_top_up_is_uniform(backend):
    # A 1-high grid admits no block, so block mode reduces to a uniform subset from the top-up.
    rows = 20_000
    _, mask, _ = random_masking(rows, 9, mask_ratio=0.5, seed=8, mode="block", grid=(1, 9), backend=backend)
    p = 4 / 9  # round(4.5) == 4
    assert float((mask.double().mean(0) - p).abs().max()) < binomial_bound(p, rows)


def test_block_aspect_table_matches_log_uniform():
    from fastpt.ops.random_masking import ASPECT_BITS, aspect_table

    table = aspect_table(0.3)
    assert len(table) == 1 << ASPECT_BITS
    assert 0.3 < table[0] < table[-1] < 1 / 0.3 and all(a < b for a, b in zip(table, table[1:]))
    assert math.isclose(table[0] * table[-1], 1.0, rel_tol=1e-12)  # symmetric in log space


# ----------------------------------------------------------------------------- errors and dispatch


@pytest.mark.parametrize("args,kwargs,exc,name", [
    ((-1, 16), {}, ValueError, "batch"),
    ((2.0, 16), {}, TypeError, "batch"),
    ((2, 0), {}, ValueError, "num_patches"),
    ((2, "16"), {}, TypeError, "num_patches"),
    ((2, 16), dict(mask_ratio=1.0), ValueError, "mask_ratio"),
    ((2, 16), dict(mask_ratio=-0.1), ValueError, "mask_ratio"),
    ((2, 16), dict(mask_ratio=float("nan")), ValueError, "mask_ratio"),
    ((2, 16), dict(mask_ratio="x"), TypeError, "mask_ratio"),
    ((2, 1), dict(mask_ratio=0.6), ValueError, "mask_ratio"),  # round(0.6) masks the only patch
    ((2, 16), dict(seed=-1), ValueError, "seed"),
    ((2, 16), dict(seed=1.5), TypeError, "seed"),
    ((2, 16), dict(device="nodevice"), TypeError, "device"),
    ((2, 16), dict(mode="grid"), ValueError, "mode"),
    ((2, 16), dict(mode="block"), ValueError, "grid"),
    ((2, 16), dict(mode="block", grid=(3, 5)), ValueError, "grid"),
    ((2, 16), dict(mode="block", grid=4), TypeError, "grid"),
    ((2, 16), dict(mode="block", grid=(4, 0)), ValueError, "grid"),
    ((2, 16), dict(mode="block", grid=(4, 4), min_block_patches=0), ValueError, "min_block_patches"),
    ((2, 16), dict(mode="block", grid=(4, 4), min_block_patches=17), ValueError, "min_block_patches"),
    ((2, 16), dict(mode="block", grid=(4, 4), min_aspect=0.0), ValueError, "min_aspect"),
    ((2, 16), dict(mode="block", grid=(4, 4), min_aspect=1.5), ValueError, "min_aspect"),
    ((2, 16), dict(backend="fast"), ValueError, "backend"),
])
def test_bad_inputs_name_the_argument(args, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        random_masking(*args, **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(mask_ratio="0.5"), "mask_ratio"),
    (dict(mask_ratio=b"0.5"), "mask_ratio"),
    (dict(mask_ratio=False), "mask_ratio"),
    (dict(mask_ratio=True), "mask_ratio"),
    (dict(mode="block", grid=(4, 4), min_aspect="0.5"), "min_aspect"),
    (dict(mode="block", grid=(4, 4), min_aspect=True), "min_aspect"),
])
def test_strings_and_bools_are_not_ratios(kwargs, name):
    """float() took mask_ratio="0.5" and mask_ratio=False (and the same for min_aspect), so a
    wrong type gave masks instead of the TypeError the docstring promises."""
    with pytest.raises(TypeError, match=name):
        random_masking(2, 16, **kwargs)


def test_forced_backend_refusals_list_reasons():
    block = dict(mode="block", grid=(4, 4))
    with pytest.raises(BackendError, match="triton: .*random") as err:
        random_masking(2, 16, backend="triton", **block)
    for name in ("cuda", "cpu", "triton", "reference"):
        assert f"{name}:" in str(err.value)
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="cuda: "):
            random_masking(2, 16, backend="cuda")
    probe = OP.probe("cpu")
    if OP.refusals(**probe)["triton"] is None:  # triton usable here: only the size makes it refuse
        refusals = OP.refusals(**probe | dict(num_patches=MAX_TRITON_PATCHES + 1))
        assert "limit" in refusals["triton"] and refusals["reference"] is None


def test_default_backend_is_the_fastest_usable():
    usable = [b for dev, b in GRID if dev == "cpu"]
    expected = next(b for b in ("cpu", "triton", "reference") if b in usable)
    assert OP.select(None, **OP.probe("cpu")).name == expected


def test_numpy_integers_are_ints():
    # np.prod(grid) is a numpy integer: accepted as an int (it was refused); bools and floats are not
    np = pytest.importorskip("numpy")
    ids_keep, mask, _ = random_masking(np.int64(2), np.prod((3, 3)), mask_ratio=0.5)
    assert ids_keep.shape == (2, 5) and mask.shape == (2, 9)  # round(4.5) == 4 masked
    with pytest.raises(TypeError, match="num_patches: expected an int, got bool"):
        random_masking(2, np.bool_(True))
    with pytest.raises(TypeError, match="num_patches: expected an int, got float"):
        random_masking(2, 9.0)
