"""Keep freed CPU memory for reuse: glibc malloc without mmap for large blocks.

glibc serves every block above its mmap threshold (at most 32 MiB on 64-bit) with a fresh ``mmap``
and gives it back with ``munmap`` when it is freed. A training step on the CPU allocates such
blocks every step (logits, the tied embedding's gradient and its dtype casts, a large batch's
activations), and each one is paid for again in page faults: the kernel maps and zeroes every
4 KiB page on first touch (~1 us each here). ``tune()`` turns that off for the process
(``M_MMAP_MAX = 0``: large blocks come from the heap; ``M_TRIM_THRESHOLD`` 2 GiB: freed memory is
kept for the next step instead of being returned), the effect of starting Python with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` or of preloading jemalloc / tcmalloc.

Measured (2-core Zen 5, torch 2.13, one training step each, medians of 6): fastpt bert-tiny MLM
32 x 128 bf16 128 -> 91 ms, float32 210 -> 198 ms; transformers' BertForMaskedLM on the same
batches 1,026 -> 375 ms bf16 and 1,263 -> 800 ms float32 (it materialises the (B, S, V) logits);
GPT-2 4 x 256, 16 x 128 bf16: fastpt 568 -> 450 ms, GPT2LMHeadModel 1,154 -> 514 ms.

The price: the process keeps its peak heap (what one step needs, for a training loop of fixed
shapes) instead of returning memory between steps. ``fastpt pretrain`` calls ``tune()`` for CPU
runs (``FASTPT_CPU_MALLOC=default`` in the environment leaves malloc alone); the bench runs both
sides of every CPU comparison under the same setting and says which. No-op (with the reason) where
the C library is not glibc.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameter numbers (glibc malloc.h)
TUNED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: (1 << 31) - 1}
# glibc's own behaviour, as a process that allocates and frees large tensors settles into it: at
# most 65536 mmapped blocks (the default), the mmap threshold at 32 MiB (its dynamic maximum on
# 64-bit) and the trim threshold at twice that (glibc's dynamic rule). Setting any parameter stops
# glibc from moving them, so restore() sets that steady state rather than the start-up values
# (128 KiB each), which would return and re-fault every freed block above 128 KiB.
DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 64 << 20, M_MMAP_THRESHOLD: 32 << 20}
ENV = "FASTPT_CPU_MALLOC"

_state = {"tuned": False}


@functools.lru_cache(maxsize=None)
def _libc():
    """glibc's handle, or None (another C library, or no libc.so.6)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError):
        return None


def unavailable() -> str | None:
    """Why ``tune()`` cannot act here, or None."""
    return None if _libc() is not None else "the C library is not glibc (no mallopt)"


def is_tuned() -> bool:
    """Whether ``tune()`` is in effect (and not undone by ``restore()``)."""
    return _state["tuned"]


def _set(params: dict) -> None:
    libc = _libc()
    for param, value in params.items():
        if not libc.mallopt(param, value):
            raise OSError(f"mallopt({param}, {value}) failed")


def refusal() -> str | None:
    """Why ``tune()`` would not act (not glibc, or ``FASTPT_CPU_MALLOC=default``), or None."""
    if os.environ.get(ENV, "").strip().lower() == "default":
        return f"{ENV}=default"
    return unavailable()


def tune() -> str | None:
    """Keep freed memory for reuse (module docstring). Returns None when it took effect, else why
    not (``refusal()``)."""
    why = refusal()
    if why is None:
        _set(TUNED)
        _state["tuned"] = True
    return why


def restore() -> None:
    """glibc's own behaviour again (``DEFAULTS``), freed memory at the heap's top returned now."""
    if unavailable() is None:
        _set(DEFAULTS)
        _libc().malloc_trim(0)
    _state["tuned"] = False


@contextlib.contextmanager
def tuned(on: bool = True):
    """``tune()`` inside the block when ``on`` (else glibc's own behaviour), the previous state after it."""
    was = is_tuned()
    if on:
        tune()
    else:
        restore()
    try:
        yield
    finally:
        if was and not is_tuned():
            tune()
        elif not was and is_tuned():
            restore()


def describe() -> str:
    """One line for logs and reports."""
    if is_tuned():
        return "glibc malloc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)"
    return "glibc malloc as it comes" if unavailable() is None else f"malloc as it comes ({unavailable()})"
