"""Counter-based random numbers shared by every masking backend.

Every random decision in fastpt's masking ops is a pure function of
``(seed, stream, row, col)``: no generator state, no thread or block layout in
the formula. The reference (this file, PyTorch int64 arithmetic), the Triton
kernels, and the C++ CPU and CUDA kernels (both through ``csrc/rng.h``)
implement the same three lines and therefore produce bit-identical masks on
any backend and device.

The scheme (all arithmetic modulo 2**32)::

    mix32(x):  x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15
    key(seed, stream) = mix32(mix32(mix32((stream + 1) * 0x9E3779B9) ^ seed_hi) ^ seed_lo)
    row_key          = mix32(key ^ row)
    bits(row, col)   = mix32(row_key ^ colmix(col)),   colmix(col) = col * 0x61C88647

``mix32`` is Chris Wellons' "lowbias32" integer hash, a bijection on 32-bit
words. Its multipliers and ``colmix``'s (2**32 - 0x9E3779B9, the golden ratio's
multiplicative hash) are below 2**31, so the PyTorch version computes the
products exactly in int64 before reducing them modulo 2**32.

``colmix`` spreads the column counter over all 32 bits before the XOR: with
``row_key ^ col`` alone (one ``mix32`` round over a small counter), columns a
fixed distance apart (multiples of 64 to 4096) had correlated bits (dropout
keep masks |corr| up to 0.006 at lags of a hidden size, z = -60; MLM selection
-0.017 at 12288), and two rows whose keys differed by ``d < n_cols`` drew the
same bits in XOR-permuted columns (a 65,536-element dropout chunk equal to
another's, permuted, in 85 of 2,000 seeds). Multiplying by an odd constant first
keeps ``bits`` a bijection of ``col`` within a row (``random_masking`` relies on it:
no ties) and removes both.

Decisions compare integers, never floats, so no backend can round differently:
an event of probability ``p`` happens when ``bits >> 8 < threshold24(p)``, and a
uniform integer in ``[0, n)`` is ``(bits * n) >> 32`` (Lemire's multiply-shift).
"""
from __future__ import annotations

import torch

from .. import _dispatch
from . import _validate

try:  # the Triton twin of mix32, for the kernels in ops/*.py
    import triton
    import triton.language as tl  # noqa: F401  (the interpreter needs it in a jit function's globals)
except ImportError:  # pragma: no cover - machines without triton
    triton = None

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MUL1 = 0x21F0AAAD
MUL2 = 0x735A2D97
COLMUL = 0x61C88647  # colmix: 2**32 - GOLDEN, odd, below 2**31

# Streams: one per kind of decision, so that e.g. which tokens are selected and
# what they are replaced with never share random bits.
STREAM_MLM_SELECT = 0
STREAM_MLM_ACTION = 1
STREAM_MLM_TOKEN = 2
STREAM_MAE = 3
STREAM_BLOCK = 4
STREAM_SPAN_NOISE = 5
STREAM_SPAN_KEEP = 6
STREAM_UL2_DENOISER = 7
STREAM_UL2_SPLIT = 8
STREAM_ATTN_DROPOUT = 9
STREAM_DROPOUT = 10


def mix32_int(x: int) -> int:
    """``mix32`` on a Python int (host-side key derivation)."""
    x &= M32
    x ^= x >> 16
    x = (x * MUL1) & M32
    x ^= x >> 15
    x = (x * MUL2) & M32
    x ^= x >> 15
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` on an int64 tensor holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & M32
    x = x ^ (x >> 15)
    x = (x * MUL2) & M32
    return x ^ (x >> 15)


def check_seed(seed) -> int:
    """Validate ``seed`` (an int in ``[0, 2**64)``) and return it as a Python int."""
    if isinstance(seed, torch.Tensor):
        _check_seed_tensor(seed)
        seed = int(seed.item())
    value = _validate.integer(seed)  # ints, numpy integers
    if value is None:
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    seed = value
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected 0 <= seed < 2**64, got {seed}")
    return seed


def generator_seed(seed) -> int:
    """``seed`` (an int in ``[0, 2**64)``) as the seed of a ``torch.Generator`` / ``torch.manual_seed``:
    torch's CPU generator (mt19937) keeps only a seed's low 32 bits, so seeds that differ above them
    (``s`` and ``s + 2**32``, or ``(epoch << 32) | step``) would draw the same numbers. Seeds below
    ``2**32`` pass unchanged; larger ones fold their high half in by a hash, ``mix32(mix32(hi) ^ lo)``: every
    bit of the seed moves the draws, though two seeds still meet the generator's 32 bits by chance (2**-32 a
    pair, ~5 pairs among 200,000 steps' seeds), as they meet ``stream_key``'s 32-bit keys: draws that repeat
    on other data."""
    seed = check_seed(seed)
    return seed if seed < 2**32 else mix32_int(mix32_int(seed >> 32) ^ (seed & M32))


def draw_seed() -> int:
    """A fresh seed from torch's default CPU generator: ``torch.manual_seed`` reproduces it, and a
    checkpoint that restores torch's RNG state replays it (as ``nn.Dropout``'s masks would be)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def traced_seeds() -> bool:
    """Whether a seed tensor must stay a tensor (its value cannot be read on the host): under
    ``torch.compile`` (a read breaks the graph) and under a ``torch.func`` transform (vmap cannot
    read a batched tensor: ``.item()`` raises there)."""
    return torch.compiler.is_compiling() or _dispatch.transforms_active()


def fresh_seed():
    """A seed for one call of a counter-based op that was given none.

    Eager code gets ``draw_seed()``'s int. Under ``torch.compile`` the host read of ``draw_seed``
    would break the graph, so the seed stays a 0-d int64 CPU tensor from ``torch.randint``, which
    the graph computes (Inductor draws it from its own generator, seeded from torch's: reproducible
    under ``torch.manual_seed``, but not the eager draw); the ops take such a seed as a tensor
    (``stream_key_tensor``) and read it on the host only inside their custom op (a CPU tensor: no
    device sync).

    Under a ``torch.func`` transform the seed is that tensor too, drawn by ``torch.randint`` with
    torch's own randomness rules: under ``vmap(randomness="different")`` one seed per sample (the
    masks differ across the batch, as ``torch.nn.Dropout``'s do), under ``"same"`` one shared seed,
    under the default ``"error"`` torch's error. It takes the same value as the eager draw (the
    same generator call), so ``torch.func.grad`` sees the masks that eager autograd sees. The ops'
    reference backends (what runs under the transforms) compute the key from it in tensor ops."""
    if traced_seeds():
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    return draw_seed()


def stream_key_tensor(seed: torch.Tensor, stream: int) -> torch.Tensor:
    """``stream_key`` of a one-element integer tensor seed, in tensor ops (traceable, no host read).

    The seed's 64 bits are read as an unsigned integer (a negative int64 ``s`` is ``s + 2**64``),
    so for seeds in ``[0, 2**63)`` this equals ``stream_key(int(seed), stream)``. Returns a 0-d
    int64 tensor on the seed's device holding a value in ``[0, 2**32)``."""
    s = seed.reshape(()).to(torch.int64)
    k = mix32_int(((stream + 1) * GOLDEN) & M32)
    k = mix32(((s >> 32) & M32) ^ k)
    return mix32(k ^ (s & M32))


def op_key(seed, stream: int):
    """The key of ``stream`` for an op's checked seed: an int (``stream_key``), or for a seed traced
    under ``torch.compile`` a 0-d tensor computed in the graph (``stream_key_tensor``)."""
    if isinstance(seed, torch.Tensor):
        return stream_key_tensor(seed, stream)
    return stream_key(seed, stream)


def split_key(key) -> tuple[int, torch.Tensor | None]:
    """``(int key, None)``, or ``(0, key tensor)`` for a traced key: the two arguments of a custom
    op that takes either (the tensor is read inside it, ``key_value``)."""
    return (0, key) if isinstance(key, torch.Tensor) else (key, None)


def key_value(key: int, key_t: torch.Tensor | None) -> int:
    """Inside a custom op: the key, read from ``key_t`` (on the host) when the graph computed it."""
    return key if key_t is None else int(key_t)


def check_op_seed(seed):
    """``check_seed`` for ops that also take a seed traced under ``torch.compile`` or a ``torch.func``
    transform (``traced_seeds``): there a tensor seed stays a tensor (its value cannot be read
    without a graph break, nor per sample under vmap), checked for type and shape only; anywhere
    else the value is read and checked (``check_seed``)."""
    if not (isinstance(seed, torch.Tensor) and traced_seeds()):
        return check_seed(seed)
    _check_seed_tensor(seed)
    return seed


def _check_seed_tensor(seed: torch.Tensor) -> None:
    """TypeError naming seed unless it is a one-element integer tensor (not bool: True is no seed)."""
    if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
        raise TypeError(f"seed: expected an integer or a one-element integer tensor, got {seed.dtype} "
                        f"tensor of shape {tuple(seed.shape)}")


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of one random stream for ``seed`` (computed on the host)."""
    seed = check_seed(seed)
    k = mix32_int(((stream + 1) * GOLDEN) & M32)
    k = mix32_int(k ^ (seed >> 32))
    return mix32_int(k ^ (seed & M32))


def colmix(cols: torch.Tensor) -> torch.Tensor:
    """``col * COLMUL mod 2**32`` of int64 counters in ``[0, 2**32)`` (exact in int64: both factors < 2**32, one
    below 2**31): what a row key is XORed with (module docstring)."""
    return (cols.to(torch.int64) * COLMUL) & M32


def colmix_int(col: int) -> int:
    """``colmix`` on a Python int."""
    return (col * COLMUL) & M32


def bits(key: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """32 random bits per element of the broadcast of ``rows`` and ``cols`` (int64 tensors)."""
    row_key = mix32(rows.to(torch.int64) ^ key)
    return mix32(row_key ^ colmix(cols))


def grid_bits(key: int, n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """``bits`` for every ``(row, col)`` of an ``(n_rows, n_cols)`` grid, as int64."""
    rows = torch.arange(n_rows, device=device, dtype=torch.int64).unsqueeze(1)
    cols = torch.arange(n_cols, device=device, dtype=torch.int64).unsqueeze(0)
    return bits(key, rows, cols)


def threshold24(p: float) -> int:
    """Integer threshold so that ``(bits >> 8) < threshold24(p)`` has probability ``p`` (to 2**-25)."""
    return int(round(float(p) * (1 << 24)))


def uniform_int(b: torch.Tensor, n) -> torch.Tensor:
    """Map 32 random bits to a uniform integer in ``[0, n)`` (``n`` int or int64 tensor, < 2**31)."""
    return (b * n) >> 32


def signed32(k: int) -> int:
    """A 32-bit key as a signed int, so Triton always types the kernel argument int32."""
    return k - (1 << 32) if k >= (1 << 31) else k


if triton is not None:

    @triton.jit
    def colmix_tl(c):
        """``colmix`` inside a Triton kernel, on a uint32 tensor (wraps modulo 2**32)."""
        return c * 0x61C88647

    @triton.jit
    def mix32_tl(x):
        """``mix32`` inside a Triton kernel, on uint32 tensors (wraps modulo 2**32)."""
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0x735A2D97
        return x ^ (x >> 15)
