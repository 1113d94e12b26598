"""CUDA C++ masking kernels (kernels/masking.cu) against the PyTorch references, bit for bit.

Runs only where fastpt._C was built with CUDA and torch sees a GPU; skipped elsewhere.
"""
import pytest
import torch

import fastpt
from fastpt import _native
from fastpt.ops import mlm_mask, random_masking

pytestmark = pytest.mark.skipif(_native.cuda_unavailable() is not None,
                                reason=f"CUDA kernels unavailable: {_native.cuda_unavailable()}")

V = 30522
MASK = 103
SPECIAL = [0, 100, 101, 102]  # pad, unk, cls, sep


def _poison_allocator():
    """Leave 0x5A garbage in the caching allocator's free blocks (small and large pools), so
    that an output element the kernel forgets to write shows up as a mismatch."""
    junk = [torch.full((1 << 20,), 0x5A, dtype=torch.uint8, device="cuda") for _ in range(16)]
    junk += [torch.full((1 << 26,), 0x5A, dtype=torch.uint8, device="cuda") for _ in range(2)]
    del junk


def _mlm_both(ids, **kwargs):
    ref = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, backend="reference", **kwargs)
    _poison_allocator()
    out = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, backend="cuda", **kwargs)
    torch.cuda.synchronize()
    return ref, out


def _mlm_variants(ids, dtype, gen):
    rows, cols = ids.shape
    attn = torch.ones_like(ids)
    attn[:, cols - cols // 4:] = 0
    special = (torch.rand(ids.shape, generator=gen) < 0.05).cuda()
    words = (torch.arange(cols, device="cuda") // 3).expand(rows, cols).to(dtype).contiguous()
    words[:, 0] = -1
    other = torch.int64 if dtype == torch.int32 else torch.int32
    return [
        {},
        {"attention_mask": attn, "special_token_ids": SPECIAL},
        {"special_tokens_mask": special, "word_ids": words},
        # the other word dtype, and the full 64 special ids
        {"word_ids": words.to(other), "special_token_ids": list(range(0, 6400, 100))},
        {"attention_mask": attn, "mask_prob": 0.9, "replace_prob": 0.3, "random_prob": 0.5},
    ]


@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("cols", [1, 17, 203, 1000])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_mlm_mask_matches_reference(rows, cols, dtype):
    gen = torch.Generator().manual_seed(rows * 1009 + cols)
    ids = torch.randint(0, V, (rows, cols), generator=gen, dtype=dtype)
    ids[:, 0] = 101
    ids[:, 1::7] = 0  # pad id, a special id in some variants
    ids = ids.cuda()
    for kwargs in _mlm_variants(ids, dtype, gen):
        for seed in (0, 2**40 + 7, 2**64 - 1):
            ref, out = _mlm_both(ids, seed=seed, **kwargs)
            assert out[0].dtype == dtype and out[1].dtype == torch.int64
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), (sorted(kwargs), seed)


def test_mlm_mask_many_rows():
    # More rows than one grid column of blocks covers (gridDim.y is capped at 65535): the row loop.
    ids = torch.randint(0, V, (600_001, 1), generator=torch.Generator().manual_seed(3)).cuda()
    ref, out = _mlm_both(ids, seed=9, mask_prob=0.5)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_mlm_mask_on_side_stream():
    ids = torch.randint(0, V, (64, 509), generator=torch.Generator().manual_seed(4)).cuda()
    ref = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=1, backend="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, seed=1, backend="cuda")
    side.synchronize()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_mlm_mask_empty():
    for shape in [(0, 5), (4, 0)]:
        ids = torch.zeros(shape, dtype=torch.int64, device="cuda")
        m, l = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, backend="cuda")
        assert m.shape == shape and l.shape == shape


def _max_patches():
    return fastpt._native._C.random_masking_cuda_max_patches()


# (L, mask_ratio) pairs that keep at least one patch (the public API refuses the others).
RM_CASES = [(L, r) for L in (1, 17, 196, 1000, 4096, 65537) for r in (0.0, 0.4, 0.75, 0.9)
            if round(L * r) < L]


@pytest.mark.parametrize("num_patches,mask_ratio", RM_CASES)
@pytest.mark.parametrize("batch", [1, 5])
def test_random_masking_matches_reference(batch, num_patches, mask_ratio):
    for seed in (0, 12345, 2**64 - 1):
        ref = random_masking(batch, num_patches, mask_ratio=mask_ratio, seed=seed, device="cuda", backend="reference")
        _poison_allocator()
        out = random_masking(batch, num_patches, mask_ratio=mask_ratio, seed=seed, device="cuda", backend="cuda")
        torch.cuda.synchronize()
        for name, a, b in zip(("ids_keep", "mask", "ids_restore"), out, ref):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), (name, seed)


def test_random_masking_many_rows():
    ref = random_masking(3000, 196, mask_ratio=0.75, seed=5, device="cuda", backend="reference")
    out = random_masking(3000, 196, mask_ratio=0.75, seed=5, device="cuda", backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_random_masking_at_the_limit():
    L = _max_patches()
    ref = random_masking(1, L, mask_ratio=0.75, seed=1, device="cuda", backend="reference")
    out = random_masking(1, L, mask_ratio=0.75, seed=1, device="cuda", backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_random_masking_refuses_above_the_limit():
    with pytest.raises(fastpt.BackendError, match="limit"):
        random_masking(1, _max_patches() + 1, device="cuda", backend="cuda")
