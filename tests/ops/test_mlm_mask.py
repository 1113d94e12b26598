"""mlm_mask: identical on every backend, right statistics, never touches what it must not."""
import math

import pytest
import torch

import fastpt
from fastpt.ops import mlm_mask
from tests.helpers import backend_grid

GRID = backend_grid("mlm_mask")
V = 30522
MASK = 103
SPECIAL = [0, 100, 101, 102]  # pad, unk, cls, sep


def _batch(rows, cols, dtype=torch.int64, device="cpu", gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randint(0, V, (rows, cols), generator=g, dtype=dtype).to(device)


def _binomial_ok(k, n, p, sigmas=6.0):
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 17), (7, 203), (2, 1000)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_backends_bit_identical(device, backend, rows, cols, dtype):
    ids = _batch(rows, cols, dtype, device, gen_seed=rows * cols)
    ids[:, 0] = 101
    attn = torch.ones_like(ids)
    attn[:, cols - cols // 4:] = 0
    special = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)).to(device) < 0.05
    words = (torch.arange(cols, device=device) // 3).expand(rows, cols).to(dtype).contiguous()
    words[:, 0] = -1
    for kwargs in ({}, {"attention_mask": attn, "special_token_ids": SPECIAL},
                   {"special_tokens_mask": special, "word_ids": words}):
        ref = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=2**40 + 7, backend="reference", **kwargs)
        out = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=2**40 + 7, backend=backend, **kwargs)
        assert out[0].dtype == dtype and out[1].dtype == torch.int64
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), kwargs


@pytest.mark.parametrize("device,backend", GRID)
def test_leading_dims_and_noncontiguous(device, backend):
    ids = _batch(6, 35, device=device).reshape(2, 3, 35)
    flat = mlm_mask(ids.reshape(6, 35), mask_token_id=MASK, vocab_size=V, seed=5, backend=backend)
    out = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=5, backend=backend)
    assert out[0].shape == ids.shape and torch.equal(out[0].reshape(6, 35), flat[0])
    t = _batch(35, 6, device=device).t()  # a transposed view
    a = mlm_mask(t, mask_token_id=MASK, vocab_size=V, seed=5, backend=backend)
    b = mlm_mask(t.contiguous(), mask_token_id=MASK, vocab_size=V, seed=5, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device,backend", GRID)
def test_empty(device, backend):
    for shape in [(0, 5), (4, 0)]:
        ids = torch.zeros(shape, dtype=torch.int64, device=device)
        m, l = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, backend=backend)
        assert m.shape == shape and l.shape == shape


def test_statistics_rate_and_split():
    ids = _batch(512, 509, gen_seed=3)
    ids[ids == MASK] = MASK + 1
    m, l = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=0.15, seed=11)
    n = ids.numel()
    sel = l != -100
    k = int(sel.sum())
    assert _binomial_ok(k, n, 0.15)
    assert torch.equal(l[sel], ids[sel]) and torch.equal(m[~sel], ids[~sel])
    n_mask = int((m[sel] == MASK).sum())
    n_keep = int((m[sel] == ids[sel]).sum())
    n_rand = k - n_mask - n_keep
    # a random replacement equals the original id with probability 1/V: within the bound
    assert _binomial_ok(n_mask, k, 0.8) and _binomial_ok(n_rand, k, 0.1 * (1 - 1 / V))
    assert _binomial_ok(n_keep, k, 0.1 + 0.1 / V)
    rnd = m[sel & (m != MASK) & (m != ids)]
    # uniform over the vocabulary: mean and spread of a discrete uniform
    assert abs(rnd.double().mean().item() - (V - 1) / 2) < 6 * V / math.sqrt(12 * rnd.numel())
    assert int(rnd.min()) >= 0 and int(rnd.max()) < V


@pytest.mark.parametrize("p,r,q", [(0.0, 0.8, 0.1), (1.0, 0.8, 0.1), (0.3, 1.0, 0.0), (0.3, 0.0, 1.0), (0.4, 0.5, 0.5)])
def test_statistics_other_rates(p, r, q):
    ids = _batch(300, 333, gen_seed=4)
    ids[ids == MASK] = MASK + 1
    m, l = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=p, replace_prob=r, random_prob=q, seed=1)
    sel = l != -100
    k = int(sel.sum())
    assert _binomial_ok(k, ids.numel(), p)
    if k:
        assert _binomial_ok(int((m[sel] == MASK).sum()), k, r)


def test_never_masks_specials_padding_or_wordless():
    ids = _batch(64, 257, gen_seed=5)
    ids[:, 0], ids[:, 100] = 101, 102
    attn = torch.ones_like(ids)
    attn[:, 200:] = 0
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 50] = True
    m, l = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=1.0, special_token_ids=[101, 102],
                    attention_mask=attn, special_tokens_mask=special)
    blocked = (ids == 101) | (ids == 102) | (attn == 0) | special
    assert (l[blocked] == -100).all() and torch.equal(m[blocked], ids[blocked])
    assert (l[~blocked] != -100).all()  # mask_prob=1 selects everything else
    words = torch.full_like(ids, -1)
    m, l = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=1.0, word_ids=words)
    assert (l == -100).all() and torch.equal(m, ids)


def test_whole_word_masking_selects_words_together():
    ids = _batch(128, 300, gen_seed=6)
    # word k spans tokens [3k, 3k + 3)
    words = (torch.arange(300) // 3).expand(128, 300).contiguous()
    m, l = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, word_ids=words, seed=9)
    sel = (l != -100).reshape(128, 100, 3)
    assert (sel.all(-1) | ~sel.any(-1)).all()  # every word fully selected or not at all
    assert _binomial_ok(int(sel[..., 0].sum()), 128 * 100, 0.15)


@pytest.mark.parametrize("device,backend", GRID)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_more_special_ids_than_the_kernels_compare(device, backend, dtype):
    """More than 64 special ids (a tokenizer with many added special tokens) raised ValueError; they
    are folded into the blocked mask instead, with the same result on every backend."""
    ids = _batch(5, 301, dtype, device, gen_seed=21)
    special = list(range(0, V, V // 100))  # 101 ids
    ids[:, ::7] = torch.tensor(special[:43], dtype=dtype, device=device)
    ref = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=1.0, special_token_ids=special, seed=3,
                   backend="reference")
    out = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=1.0, special_token_ids=special, seed=3,
                   backend=backend)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    blocked = torch.isin(ids, torch.tensor(special, device=device))
    assert torch.equal(out[1] == -100, blocked)  # mask_prob=1: everything else is selected
    stm = torch.zeros_like(ids, dtype=torch.bool)
    stm[:, 1] = True  # combines with a given special_tokens_mask
    out = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=1.0, special_token_ids=special,
                   special_tokens_mask=stm, seed=3, backend=backend)
    assert torch.equal(out[1] == -100, blocked | stm)


@pytest.mark.parametrize("device,backend", GRID)
def test_special_ids_outside_the_id_dtype_block_nothing(device, backend):
    """The cpu backend narrowed special ids to int32 for int32 ids, so 2**32 + 3 blocked token 3
    (the other backends compare in int64 and block nothing)."""
    ids = torch.tensor([[3, 4, 3, 5, 3, 6]], dtype=torch.int32, device=device)
    for special in ([2**32 + 3], [2**32 + 3, 2**31, -2**31 - 1, 4], list(range(2**32, 2**32 + 20)) + [4]):
        ref = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=1.0, special_token_ids=special,
                       backend="reference")
        out = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=1.0, special_token_ids=special,
                       backend=backend)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), special
        assert torch.equal(out[1] == -100, ids == (4 if 4 in special else -1)), special


def test_special_ids_reach_the_device_once():
    """The special ids were a fresh torch.tensor(..., device=ids.device) per call: a host-to-device copy on every
    GPU batch. They are made once per (ids, device); the same tensor serves every later call, untouched."""
    from fastpt import _dispatch

    _dispatch._CONSTANTS.clear()
    ids = _batch(4, 33)
    first = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIAL, seed=1)
    made = dict(_dispatch._CONSTANTS)
    assert [t.tolist() for t in made.values()] == [SPECIAL]
    for _ in range(3):
        again = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=list(reversed(SPECIAL)), seed=1)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert len(_dispatch._CONSTANTS) == 1 and all(_dispatch._CONSTANTS[k] is t for k, t in made.items())


def test_seed_determinism():
    ids = _batch(16, 128)
    a = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=42)
    b = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=42)
    c = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=43)
    d = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=42 + 2**32)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1]) and not torch.equal(a[1], d[1])
    # a pure function of (seed, row, position): a row's mask does not depend on other rows' content
    ids2 = ids.clone()
    ids2[1:] = _batch(15, 128, gen_seed=99)
    e = mlm_mask(ids2, mask_token_id=MASK, vocab_size=V, seed=42)
    assert torch.equal(e[1][0], a[1][0])


def test_rows_are_independent():
    ids = _batch(400, 64)
    _, l = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, mask_prob=0.5, seed=3)
    sel = (l != -100).double()
    corr = torch.corrcoef(sel[:, :32].t())  # across rows: positions must not be correlated
    off = corr - torch.diag(torch.diag(corr))
    assert off.abs().max() < 6 / math.sqrt(400)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"input_ids": torch.zeros(2, 3)}, TypeError, "input_ids"),
    ({"input_ids": torch.zeros(2, 3, dtype=torch.int64) + V}, ValueError, "input_ids"),
    ({"input_ids": torch.zeros(2, 3, dtype=torch.int64) - 1}, ValueError, "input_ids"),
    ({"input_ids": torch.tensor(5)}, ValueError, "input_ids"),
    ({"mask_prob": -0.1}, ValueError, "mask_prob"),
    ({"mask_prob": 1.5}, ValueError, "mask_prob"),
    ({"mask_prob": float("nan")}, ValueError, "mask_prob"),
    ({"replace_prob": 0.9, "random_prob": 0.2}, ValueError, "replace_prob"),
    ({"vocab_size": 0}, ValueError, "vocab_size"),
    ({"mask_token_id": V}, ValueError, "mask_token_id"),
    ({"word_ids": torch.zeros(2, 4, dtype=torch.int64)}, ValueError, "word_ids"),
    ({"word_ids": torch.zeros(2, 3)}, TypeError, "word_ids"),
    ({"attention_mask": torch.ones(3, 3, dtype=torch.int64)}, ValueError, "attention_mask"),
    ({"attention_mask": torch.ones(2, 3)}, TypeError, "attention_mask"),
    ({"special_tokens_mask": torch.ones(2, 3, device="meta", dtype=torch.bool)}, ValueError, "special_tokens_mask"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"backend": "tpu"}, ValueError, "backend"),
])
def test_bad_input(kwargs, err, match):
    args = dict(input_ids=torch.ones(2, 3, dtype=torch.int64), mask_token_id=MASK, vocab_size=V)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        mlm_mask(**args)


def test_forced_backend_refusal_lists_every_backend():
    ids = torch.ones(2, 3, dtype=torch.int64)
    if "cuda" in [b for _, b in GRID]:
        pytest.skip("cuda backend is usable here")
    with pytest.raises(fastpt.BackendError) as exc:
        mlm_mask(ids, mask_token_id=MASK, vocab_size=V, backend="cuda")
    msg = str(exc.value)
    for name in ("cuda", "cpu", "triton", "reference"):
        assert f"{name}:" in msg
