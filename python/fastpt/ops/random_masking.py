"""MAE per-sample random patch masking, and BEiT block-wise masking as an option.

Every row masks exactly ``num_masked = round(num_patches * mask_ratio)`` patches and keeps
``K = num_patches - num_masked``. (MAE's reference keeps ``int(L * (1 - mask_ratio))``; the two
agree on the usual grids, e.g. 196 and 49 patches at 0.75, and differ by one patch on some others,
e.g. 49 at 0.6 keeps 20 here and 19 there. Rounding the masked count also spares the float
artifacts of truncation: ``int(10 * (1 - 0.9))`` is 0.) The outputs are what an MAE encoder/decoder needs::

    x_keep = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))            # encoder input
    full = torch.gather(torch.cat([x_keep, mask_tokens], 1), 1,
                        ids_restore[..., None].expand(-1, -1, D))                 # decoder input

``ids_keep`` lists the kept positions in ascending order, ``mask`` is True where a patch was
removed, and ``ids_restore[l]`` is the rank of ``l`` among the kept positions (if kept) or
``K +`` its rank among the masked positions, so the gather above restores the original order.

Random mode ("random"): with ``h(b, l) = bits(stream_key(seed, STREAM_MAE), b, l)``
(``ops/_rng.py``), row ``b`` keeps the ``K`` positions with the smallest ``h``: a uniform random
``K``-subset. Within a row ``h = mix32(row_key ^ colmix(l))`` is a bijection of ``l``, so the values are
distinct and the kept set is well defined without a tie rule (the reference still sorts stably,
which would break ties by position). The reference sorts ``h``; the C++ backend finds the
``K``-th smallest ``h`` with an O(L) selection, and the Triton backend by a 32-step bitwise search
of counts, so no fast backend sorts.

Block mode ("block", BEiT): BEiT's ``MaskingGenerator`` on a ``grid = (H, W)`` of patches with
counter-based draws. Rectangles of area uniform in ``[min_block_patches, remaining]`` and aspect
ratio log-uniform in ``[min_aspect, 1 / min_aspect]`` are placed at random; a rectangle counts
only its newly covered patches and is rejected if that is zero or exceeds the patches still to
mask; ten rejections in a row end the loop. Because ``ids_keep`` must be rectangular, a row whose
rectangles fall short of ``num_masked`` is topped up with a uniform random subset of its still
unmasked patches (those of smallest ``h``, as in random mode), so every row masks exactly
``num_masked``. Draw ``d`` of row ``b`` is ``bits(stream_key(seed, STREAM_BLOCK), b, d)``; every
attempt takes four draws (area, aspect, top, left). The area is exact in float64
(``min + (remaining - min) * u`` with 24-bit ``u``), the aspect ratio comes from a table of
``2**ASPECT_BITS`` log-spaced values computed here on the host (so no backend evaluates
exp/log), and ``h = round(sqrt(area * ratio))``, ``w = round(sqrt(area / ratio))`` use only
correctly rounded IEEE operations and round-half-even, so Python and C++ decide identically.
As in BEiT, a block never spans a whole side of the grid (``h < H`` and ``w < W``).

Randomness is counter-based: the result is a pure function of ``(seed, row, position)`` and
identical on every backend and device.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _dispatch, _native
from . import _rng, _validate

try:  # Triton is optional: a GPU backend, or the CPU interpreter in tests.
    import triton
    import triton.language as tl

    from ._rng import colmix_tl as _colmix, mix32_tl as _mix32, signed32 as _signed32  # the one Triton copy
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

MODES = ("random", "block")
ASPECT_BITS = 10  # the aspect-ratio table has 2**ASPECT_BITS entries, indexed by the top bits of a draw
MAX_BLOCK_PATCHES = 1 << 24  # keeps the area arithmetic of block mode exact (see the module docstring)
MAX_TRITON_PATCHES = 1 << 14  # one program holds a whole row in registers


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise TypeError(f"device: expected a torch.device, a device string or None, got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device} requested but no CUDA device is visible to torch")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=32)
def aspect_table(min_aspect: float) -> tuple[float, ...]:
    """The block-mode aspect ratios: entry ``i`` is ``exp(lo + (hi - lo) * (i + 0.5) / N)`` with
    ``lo, hi = log(min_aspect), log(1 / min_aspect)`` and ``N = 2**ASPECT_BITS`` (bin midpoints)."""
    lo, hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    n = 1 << ASPECT_BITS
    return tuple(math.exp(lo + (hi - lo) * (i + 0.5) / n) for i in range(n))


def _prepare(batch, num_patches, *, mask_ratio, seed, device, mode, grid, min_block_patches, min_aspect):
    """Validate the public arguments and bring them into the backend-neutral form."""
    batch = _validate.positive_int("batch", batch, minimum=0)
    if batch >= 2**32:
        raise ValueError(f"batch: expected < 2**32 rows, got {batch}")
    num_patches = _validate.positive_int("num_patches", num_patches)
    if num_patches >= 2**31:
        raise ValueError(f"num_patches: expected < 2**31, got {num_patches}")
    try:
        if isinstance(mask_ratio, (bool, str, bytes)):  # float() would take "0.5" and False
            raise TypeError
        mask_ratio = float(mask_ratio)
    except (TypeError, ValueError):
        raise TypeError(f"mask_ratio: expected a float in [0, 1), got {mask_ratio!r}") from None
    if not 0.0 <= mask_ratio < 1.0:  # also rejects NaN
        raise ValueError(f"mask_ratio: expected a float in [0, 1), got {mask_ratio}")
    seed = _rng.check_seed(seed)
    device = _device(device)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if grid is not None:
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise TypeError(f"grid: expected a pair (height, width), got {grid!r}")
        grid = (_validate.positive_int("grid[0]", grid[0]), _validate.positive_int("grid[1]", grid[1]))
        if grid[0] * grid[1] != num_patches:
            raise ValueError(f"grid: height * width must equal num_patches={num_patches}, got {grid}")
    min_block_patches = _validate.positive_int("min_block_patches", min_block_patches)
    try:
        if isinstance(min_aspect, (bool, str, bytes)):  # float() would take "0.5" and True
            raise TypeError
        min_aspect = float(min_aspect)
    except (TypeError, ValueError):
        raise TypeError(f"min_aspect: expected a float in (0, 1], got {min_aspect!r}") from None
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect: expected a float in (0, 1], got {min_aspect}")

    num_masked = int(round(num_patches * mask_ratio))
    keep = num_patches - num_masked
    if keep < 1:  # round() can reach num_patches when mask_ratio * num_patches > num_patches - 0.5
        raise ValueError(
            f"mask_ratio: {mask_ratio} would mask all {num_patches} patches (round(num_patches * mask_ratio) = "
            f"{num_masked}); at least one patch must be kept"
        )
    block = None
    if mode == "block":
        if grid is None:
            raise ValueError("grid: block mode needs grid=(height, width) with height * width == num_patches")
        if num_patches > MAX_BLOCK_PATCHES:
            raise ValueError(f"num_patches: block mode supports at most {MAX_BLOCK_PATCHES} patches, got {num_patches}")
        if min_block_patches > num_patches:
            raise ValueError(f"min_block_patches: expected <= num_patches={num_patches}, got {min_block_patches}")
        block = dict(height=grid[0], width=grid[1], min_block_patches=min_block_patches,
                     aspect_table=aspect_table(min_aspect), key_block=_rng.stream_key(seed, _rng.STREAM_BLOCK))
    return dict(rows=batch, num_patches=num_patches, keep=keep, key=_rng.stream_key(seed, _rng.STREAM_MAE),
                device=device, block=block)


def _indices_from_mask(mask: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_keep, ids_restore)`` of a ``(B, L)`` bool mask with exactly ``L - keep`` True per row."""
    kept = (~mask).to(torch.int64)
    kept_before = torch.cumsum(kept, dim=1) - kept  # kept positions < l
    pos = torch.arange(mask.shape[1], device=mask.device, dtype=torch.int64)
    ids_restore = torch.where(mask, keep + pos - kept_before, kept_before)
    # Stable sort on the mask bit lists kept positions first, each group in ascending order.
    ids_keep = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, :keep]
    return ids_keep, ids_restore


# ----------------------------------------------------------------------------- reference


def _reference_random(rows, num_patches, keep, key, device):
    h = _rng.grid_bits(key, rows, num_patches, device=device)
    # h is distinct within a row (a bijection of l); stable only documents the tie rule.
    order = torch.sort(h, dim=1, stable=True).indices
    mask = torch.ones(rows, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :keep], False)
    return mask


def _block_row(row, height, width, target, min_block_patches, table, key_block):
    """BEiT's MaskingGenerator for one row; returns (flat mask list, masked count)."""
    rkey = _rng.mix32_int(key_block ^ row)
    shift = 32 - ASPECT_BITS
    mask = [False] * (height * width)
    draw = count = 0
    while count < target:
        remaining = target - count
        delta = 0
        for _ in range(10):
            u_bits, a_bits, top_bits, left_bits = (_rng.mix32_int(rkey ^ _rng.colmix_int(draw + i)) for i in range(4))
            draw += 4
            area = min_block_patches + (remaining - min_block_patches) * ((u_bits >> 8) / 2**24)
            ratio = table[a_bits >> shift]
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))  # round(): half to even
            if not (w < width and h < height):
                continue
            top = (top_bits * (height - h + 1)) >> 32
            left = (left_bits * (width - w + 1)) >> 32
            cells = [i * width + j for i in range(top, top + h) for j in range(left, left + w)]
            fresh = sum(not mask[c] for c in cells)
            if 0 < fresh <= remaining:
                for c in cells:
                    mask[c] = True
                delta = fresh
                break
        if delta == 0:
            break
        count += delta
    return mask, count


def _reference_block(rows, num_patches, keep, key, device, block):
    target = num_patches - keep
    mask = torch.zeros(rows, num_patches, dtype=torch.bool)
    pos = torch.arange(num_patches, dtype=torch.int64)
    for b in range(rows):
        flat, count = _block_row(b, block["height"], block["width"], target, block["min_block_patches"],
                                 block["aspect_table"], block["key_block"])
        row = torch.tensor(flat, dtype=torch.bool)
        if count < target:
            # Top up with the (target - count) unmasked positions of smallest h; 2**32 puts masked ones last.
            h = torch.where(row, 1 << 32, _rng.bits(key, torch.tensor(b), pos))
            row[torch.sort(h, stable=True).indices[: target - count]] = True
        mask[b] = row
    return mask.to(device)


def reference(rows, num_patches, keep, key, device, block=None):
    """Pure-PyTorch ground truth: ``(ids_keep (rows, keep), mask (rows, num_patches), ids_restore)``."""
    if block is None:
        mask = _reference_random(rows, num_patches, keep, key, device)
    else:
        mask = _reference_block(rows, num_patches, keep, key, device, block)
    ids_keep, ids_restore = _indices_from_mask(mask, keep)
    return ids_keep, mask, ids_restore


# ----------------------------------------------------------------------------- native (cpu, cuda)


def _outputs(rows, num_patches, keep, device):
    return (torch.empty(rows, keep, dtype=torch.int64, device=device),
            torch.empty(rows, num_patches, dtype=torch.bool, device=device),
            torch.empty(rows, num_patches, dtype=torch.int64, device=device))


def _fill(p, outs, rows, num_patches, keep):
    p.ids_keep, p.mask, p.ids_restore = (t.data_ptr() for t in outs)
    p.rows, p.keep = rows, keep


def _run_cpu(rows, num_patches, keep, key, device, block=None):
    outs = _outputs(rows, num_patches, keep, device)
    if rows == 0:
        return outs
    if block is None:
        p = _native._C.RandomMaskingParams()
        p.num_patches, p.key = num_patches, key
        _fill(p, outs, rows, num_patches, keep)
        _native._C.random_masking_cpu(p, _native.num_threads())
        return outs
    table = torch.tensor(block["aspect_table"], dtype=torch.float64)
    p = _native._C.BlockMaskingParams()
    _fill(p, outs, rows, num_patches, keep)
    p.height, p.width, p.min_block_patches = block["height"], block["width"], block["min_block_patches"]
    p.aspect_table, p.aspect_table_size = table.data_ptr(), table.numel()
    p.key_block, p.key_fill = block["key_block"], key
    _native._C.block_masking_cpu(p, _native.num_threads())
    return outs


def _run_cuda(rows, num_patches, keep, key, device, block=None):
    outs = _outputs(rows, num_patches, keep, device)
    if rows == 0:
        return outs
    p = _native._C.RandomMaskingParams()
    p.num_patches, p.key = num_patches, key
    _fill(p, outs, rows, num_patches, keep)
    with torch.cuda.device(device):
        _native._C.random_masking_cuda(p, _native.cuda_stream(device))
    return outs


# ----------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _random_masking_kernel(keep_ptr, mask_ptr, restore_ptr, L, K, key, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        pos = tl.arange(0, BLOCK)
        inside = pos < L
        rk = _mix32(key.to(tl.uint32, bitcast=True) ^ row.to(tl.uint32))
        # h in int64 so that padding can sit above every 32-bit value and the search below never wraps.
        h = _mix32(rk ^ _colmix(pos.to(tl.uint32))).to(tl.uint64).to(tl.int64)
        h = tl.where(inside, h, 1 << 32)
        # The K-th smallest h is the largest t with #(h < t) < K: build t bit by bit from the top.
        # The h of a row are distinct (mix32 is a bijection), so h <= t keeps exactly K.
        t = tl.zeros((), dtype=tl.int64)
        for bit in tl.static_range(31, -1, -1):
            trial = t | (1 << bit)
            t = tl.where(tl.sum((h < trial).to(tl.int32), axis=0) < K, trial, t)
        keep = h <= t
        k32 = keep.to(tl.int32)
        kept_before = (tl.cumsum(k32, axis=0) - k32).to(tl.int64)
        restore = tl.where(keep, kept_before, K + pos.to(tl.int64) - kept_before)
        base = row.to(tl.int64) * L
        tl.store(mask_ptr + base + pos, (~keep).to(tl.uint8), mask=inside)
        tl.store(restore_ptr + base + pos, restore, mask=inside)
        tl.store(keep_ptr + row.to(tl.int64) * K + kept_before, pos.to(tl.int64), mask=keep & inside)


def gpu_tiles(num_patches: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the Triton kernel: one program per row, the whole row in one block."""
    block = max(16, triton.next_power_of_2(num_patches))
    return block, 4 if block <= 1024 else (8 if block <= 4096 else 16)


def _run_triton(rows, num_patches, keep, key, device, block=None):
    ids_keep, mask, ids_restore = outs = _outputs(rows, num_patches, keep, device)
    if rows == 0:
        return outs
    block_size, num_warps = gpu_tiles(num_patches)
    _random_masking_kernel[(rows,)](ids_keep, mask.view(torch.uint8), ids_restore, num_patches, keep,
                                    _signed32(key), BLOCK=block_size, num_warps=num_warps)
    return outs


# ----------------------------------------------------------------------------- dispatch


def _random_only(device, block, **_):
    return "implements mode='random' only (block mode: cpu or reference)" if block is not None else None


def _cuda_supports(device, block, num_patches, **_):
    why = _dispatch.device_is("cuda")(device) or _random_only(device, block)
    if why:
        return why
    # Only CUDA builds define the limit; without it cuda_unavailable() has refused already.
    limit = getattr(_native._C, "random_masking_cuda_max_patches", None)
    if limit is not None and num_patches > limit():
        return f"num_patches={num_patches} exceeds the CUDA kernel's limit of {limit()}"
    return None


def _triton_supports(device, block, num_patches, **_):
    why = _dispatch.triton_device_refusal(device)
    if why is not None:
        return why
    if num_patches > MAX_TRITON_PATCHES:
        return f"num_patches={num_patches} exceeds the Triton kernel's limit of {MAX_TRITON_PATCHES}"
    return _random_only(device, block)


OP = _dispatch.Op("random_masking", [
    _dispatch.backend("cuda", _cuda_supports, _run_cuda),
    _dispatch.backend("cpu", lambda device, **_: _dispatch.device_is("cpu")(device), _run_cpu),
    _dispatch.backend("triton", _triton_supports, _run_triton),
    _dispatch.backend("reference", lambda **_: None, reference),
], probe=lambda device: _prepare(4, 196, mask_ratio=0.75, seed=0, device=device, mode="random", grid=None,
                                  min_block_patches=4, min_aspect=0.3))


def random_masking(batch: int, num_patches: int, *, mask_ratio: float = 0.75, seed: int = 0, device=None,
                   mode: str = "random", grid: tuple[int, int] | None = None, min_block_patches: int = 4,
                   min_aspect: float = 0.3, backend: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample patch masks for MAE (``mode="random"``) or BEiT (``mode="block"``) pre-training.

    Args:
        batch: number of rows ``B`` (int >= 0).
        num_patches: patches per row ``L`` (int >= 1).
        mask_ratio: fraction masked, in ``[0, 1)``; every row masks exactly ``round(L * mask_ratio)``
            and keeps ``K = L - round(L * mask_ratio)`` patches, which must be at least 1.
        seed: int in ``[0, 2**64)``; the masks are a pure function of (seed, row, position).
        device: where the outputs live (default CPU).
        mode: ``"random"`` (uniform K-subset per row) or ``"block"`` (BEiT rectangles, then a
            uniform top-up to the exact count; see the module docstring).
        grid: ``(H, W)`` with ``H * W == num_patches``; required for block mode.
        min_block_patches: smallest rectangle area in block mode (``<= num_patches``).
        min_aspect: block aspect ratios are log-uniform in ``[min_aspect, 1 / min_aspect]``, ``(0, 1]``.
        backend: None (fastest that fits) or one of "cuda", "cpu", "triton", "reference".

    Returns:
        ``(ids_keep, mask, ids_restore)``: int64 ``(B, K)`` kept positions in ascending order; bool
        ``(B, L)`` True where masked; int64 ``(B, L)`` with ``ids_restore[b, l]`` the rank of ``l``
        among kept positions, or ``K +`` its rank among masked ones (the MAE un-shuffle index).

    Raises:
        TypeError / ValueError naming the argument for a wrong type or value (including a
        ``mask_ratio`` that would keep no patch, or block mode without a matching ``grid``);
        ``BackendError`` if the forced backend cannot serve (e.g. block mode on triton/cuda).
    """
    inputs = _prepare(batch, num_patches, mask_ratio=mask_ratio, seed=seed, device=device, mode=mode, grid=grid,
                      min_block_patches=min_block_patches, min_aspect=min_aspect)
    return OP(backend, **inputs)
