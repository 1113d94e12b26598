"""Triton kernel of counter-based dropout (the contract and the reference are in ``dropout.py``).

One elementwise kernel over the flat contiguous tensor, a 1-D grid of ``BLOCK``-sized chunks:
element ``i`` (row ``i >> 16``, column ``i & 0xFFFF``) is kept iff
``mix32(mix32(key ^ row) ^ colmix(col)) >> 8 >= threshold``, kept values are ``x * scale`` in fp32 rounded
once to the dtype, dropped ones exactly +0. The same launch serves the backward on the gradient.

Offsets are int32 unless the tensor has 2**31 elements or more (``BIG``: int64 offsets).

Block sizes: on the GPU 2048 elements and 4 warps per program (16 elements per thread, so
vectorised 16-byte accesses at any dtype), not tuned: no GPU was at hand when this was written.
Under the interpreter (the CPU test path) every program costs milliseconds whatever its size, so
one program takes up to 2**16 elements; and since Triton 3.8's interpreter truncates fp32 -> bf16
stores (the GPU rounds to nearest even), half results go through an fp32 buffer that torch rounds.
The same interpreter also widens bf16 subnormals wrongly, so the kernel widens bf16 by a shift of
its bits (exact, and what the GPU does anyway).
"""
from __future__ import annotations

import contextlib

import torch

from .. import _native

try:  # Triton is optional: a GPU backend, or the CPU interpreter in tests.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

if triton is not None:
    from ._rng import colmix_tl as _colmix, mix32_tl as _mix32, signed32 as _signed32  # the one Triton copy

GPU_BLOCK, GPU_WARPS = 2048, 4
INTERPRET_BLOCK = 1 << 16


if triton is not None:

    @triton.jit(do_not_specialize=["key", "threshold"])
    def _dropout_kernel(X, OUT, n, key, threshold, scale, BLOCK: tl.constexpr, BIG: tl.constexpr):
        pid = tl.program_id(0)
        if BIG:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(X + offs, mask=ok, other=0.0)
        row = (offs >> 16).to(tl.uint32)  # dropout.COL_BITS: rows of 65536 columns
        col = (offs & 0xFFFF).to(tl.uint32)
        r = _mix32(_mix32(key.to(tl.uint32, bitcast=True) ^ row) ^ _colmix(col))
        keep = (r >> 8) >= threshold.to(tl.uint32)
        if X.dtype.element_ty == tl.bfloat16:
            # bf16 -> fp32 is the bits shifted left by 16 (exact); spelled out because Triton 3.8's
            # interpreter converts bf16 subnormals wrongly through its cast
            xf = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            xf = x.to(tl.float32)
        y = tl.where(keep, xf * scale, 0.0)
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=ok)


def run(x: torch.Tensor, key: int, threshold: int, scale: float) -> torch.Tensor:
    """``where(keep, x * scale, +0)`` as a new contiguous tensor of x's dtype (float32, float16 or
    bfloat16; CUDA, or any device under the interpreter); ``key`` in ``[0, 2**32)``, ``threshold``
    ``threshold24(p)``, ``scale`` the fp32 ``1 / (1 - p)``."""
    x = x.contiguous()
    n = x.numel()
    out = torch.empty_like(x)
    if n == 0:
        return out
    interpreting = _native.triton_interpreting()
    if interpreting:
        block, warps = min(INTERPRET_BLOCK, triton.next_power_of_2(n)), 4
    else:
        block, warps = GPU_BLOCK, GPU_WARPS
    buf = out if not interpreting or x.dtype == torch.float32 else torch.empty(x.shape, dtype=torch.float32,
                                                                               device=x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current one
        _dropout_kernel[(triton.cdiv(n, block),)](
            x, buf, n, _signed32(key), threshold, scale, BLOCK=block, BIG=n + block >= 2**31, num_warps=warps,
        )
    if buf is not out:
        out.copy_(buf)  # torch rounds to nearest even, as the GPU store does
    return out
