"""Counter-based dropout: ``out = keep ? x / (1 - p) : 0`` with a mask that is a pure function of the seed.

The mask of ``x`` (any shape, read in row-major order as the flat elements ``i``) is the one of
``ops/_rng.py`` over the flat tensor seen as rows of 65536 columns::

    key  = stream_key(seed, STREAM_DROPOUT)
    keep = (bits(key, i // 65536, i % 65536) >> 8) >= threshold24(p)

Nothing is stored for the backward: the gradient is the same masked scaling of ``grad_out``, the
mask recomputed from ``(key, i)``. Kept elements are ``x * scale`` with ``scale = 1 / (1 - p)``
(rounded to float32 for half and float32 inputs, as torch rounds a Python scalar), computed in
float32 (float64) and rounded once to the input dtype; dropped elements are exactly 0, even where
``x`` is inf or NaN (torch's ``F.dropout`` multiplies, so it keeps a NaN there). "Bit-identical"
below holds for every value but a kept NaN, which stays NaN with a payload (and, in bfloat16 on
the ``cpu`` backend, a sign) that may differ between backends.

Backends, in the order ``backend=None`` tries them:

* ``cpu``: ``csrc/dropout_cpu.cpp`` through ``fastpt._C`` (one vectorised pass, fastpt's thread
  pool).
* ``triton``: ``ops/dropout_triton.py``, one elementwise kernel (float32, float16, bfloat16 on
  CUDA, or on any device under ``TRITON_INTERPRET=1``); what CUDA tensors get. Bit-identical to
  the others. Not measured on a GPU yet (``fastpt bench --ops dropout`` times it against
  ``F.dropout``), so ``fastpt.nn.Dropout`` keeps torch's fused CUDA dropout there.

  Both run inside the ``fastpt::dropout`` custom op (the backend an argument; fake and autograd
  registered), so ``torch.compile`` traces them without a graph break; a seed drawn in the graph
  reaches it as a 0-d key tensor read inside the op (``key_t``). Under compile ``triton`` refuses
  such a key and the reference serves, which Inductor fuses into the neighbouring kernels.
* ``reference``: the formula above in PyTorch int64 arithmetic with plain autograd (any device,
  any float dtype); bit-identical to ``cpu``. What float64 CUDA tensors get.

The same file holds the attention-probability dropout of the CPU attention backend, the mask of
``ops/attention.py``'s ``dropout_keep`` on dense probabilities, since it is the same kernel with
another counter layout: ``attention_dropout`` on ``(n, H, L, L)`` blocks of single documents,
``attention_dropout_rows`` on ``(B, H, S, S)`` whole rows of packed documents.

Measured (2-core AMD EPYC Zen 5, torch 2.13 CPU, 2 threads; ``benches/bench_dropout.py``,
``benches/results/dropout-cpu.md``): on (4096, 256) the forward takes 0.25-0.35 ms against 5-7 ms
for torch's ``F.dropout`` (float32 and bfloat16), 0.1 ms on its own (``x * 2`` takes 0.06-0.1 ms);
the attention mask on (32, 4, 128, 128) float32 probabilities 0.4 ms against 20 ms for the torch
int64 formula it replaces. The hash is one ``mix32`` per element; the AVX-512 clone of the loop
(half conversions included) measured 2.4x faster than the AVX2 one, single-threaded.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch, _native
from . import _rng, _validate
from ._validate import FLOAT_DTYPES, acc_dtype

COL_BITS = 16  # the flat tensor as rows of 2**16 columns (csrc/dropout_cpu.cpp: kColBits)


def _scale(p: float) -> float:
    return 1.0 / (1.0 - p)


def _check(x, p) -> float:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a float16, bfloat16, float32 or float64 tensor, got dtype {x.dtype}")
    p = _validate.probability("p", p)
    if p >= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1), got {p}")
    return p


# ----------------------------------------------------------------------------- reference


def keep_mask(key: int, shape, p: float, device=None) -> torch.Tensor:
    """The kept elements, bool of ``shape``: the contract every backend reproduces (module docstring)."""
    i = torch.arange(int(torch.Size(shape).numel()), device=device, dtype=torch.int64)
    r = _rng.bits(key, i >> COL_BITS, i & ((1 << COL_BITS) - 1))
    return ((r >> 8) >= _rng.threshold24(p)).reshape(shape)


def reference(x, key, p):
    """``where(keep, x * scale, 0)`` in PyTorch with plain autograd (so gradcheck applies)."""
    return torch.where(keep_mask(key, x.shape, p, x.device), x * _scale(p), 0.0)


# ----------------------------------------------------------------------------- cpu (fastpt._C)


def _native_dropout(x: torch.Tensor, key: int, p: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _native._C.dropout_cpu(x.data_ptr(), out.data_ptr(), x.numel(), _native.dtype_code(x.dtype), key,
                           _rng.threshold24(p), _scale(p), _native.num_threads())
    return out


TRACED_KEY = ("a seed drawn or given as a tensor under torch.compile goes to the reference formula on GPUs, "
              "which Inductor fuses into the neighbouring elementwise kernels")


def _cpu_supports(x, **_):
    if x.device.type != "cpu":
        return f"needs cpu tensors, got {x.device.type}"
    if x.dtype not in FLOAT_DTYPES:
        return f"supports {', '.join(str(d) for d in FLOAT_DTYPES)}, got {x.dtype}"
    return None


def _probe(device):
    return dict(x=torch.randn(4, 8, device=device), key=_rng.stream_key(0, _rng.STREAM_DROPOUT), p=0.5)


# ----------------------------------------------------------------------------- triton (ops/dropout_triton.py)


def _triton_run(x: torch.Tensor, key: int, p: float) -> torch.Tensor:
    from . import dropout_triton

    return dropout_triton.run(x, key, _rng.threshold24(p), _scale(p))


_KERNELS = {"cpu": _native_dropout, "triton": _triton_run}


@torch.library.custom_op("fastpt::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, key: int, p: float, backend: str, key_t: Optional[torch.Tensor]) -> torch.Tensor:
    """Masked scaling of ``x`` by ``backend``'s kernel (forward, and the backward on the gradient);
    contiguous output. ``key_t``: the key as a 0-d integer CPU tensor (a seed drawn under
    torch.compile), read here on the host; None: ``key`` is the key."""
    return _KERNELS[backend](x, _rng.key_value(key, key_t), p)


@_dropout_op.register_fake
def _dropout_fake(x, key, p, backend, key_t):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, ctx.key, ctx.p, ctx.backend, key_t = inputs
    ctx.save_for_backward(key_t)


def _backward(ctx, grad):
    # self-adjoint: the same mask and scale on the gradient
    (key_t,) = ctx.saved_tensors
    return _dropout_op(grad, ctx.key, ctx.p, ctx.backend, key_t), None, None, None, None


_dropout_op.register_autograd(_backward, setup_context=_setup_context)


def _run_op(backend: str):
    """A backend's run: the custom op with the key as an int, or as a tensor traced under compile."""
    def run(x, key, p):
        key, key_t = _rng.split_key(key)
        return _dropout_op(x, key, p, backend, key_t)
    return run


def _triton_supports(x, key, **_):
    if isinstance(key, torch.Tensor):
        return TRACED_KEY
    return _dispatch.triton_device_refusal(x.device) or _dispatch.kernel_dtype_refusal(x.dtype)


# cpu before triton: under TRITON_INTERPRET=1 (the tests) Triton accepts CPU tensors too.
OP = _dispatch.Op("dropout", [
    _dispatch.backend("cpu", _cpu_supports, _run_op("cpu")),
    _dispatch.backend("triton", _triton_supports, _run_op("triton")),
    _dispatch.backend("reference", lambda **_: None, reference),
], probe=_probe)


# ----------------------------------------------------------------------------- attention probabilities


def _native_attention_dropout(probs, doc_ids, heads, key, p):
    probs = probs.contiguous()
    out = torch.empty_like(probs)
    n, _, length, _ = probs.shape
    _native._C.attention_dropout_cpu(probs.data_ptr(), out.data_ptr(), doc_ids.data_ptr(), n, heads, length,
                                     _native.dtype_code(probs.dtype), key, _rng.threshold24(p), _scale(p),
                                     _native.num_threads())
    return out


class _SelfAdjoint(torch.autograd.Function):
    """``kernel(probs, *args)``, a masked scaling: its backward is the same kernel on the gradient."""

    @staticmethod
    def forward(ctx, kernel, probs, *args):
        ctx.kernel, ctx.args = kernel, args
        return kernel(probs, *args)

    @staticmethod
    def backward(ctx, grad):
        return (None, ctx.kernel(grad, *ctx.args)) + (None,) * len(ctx.args)


def attention_dropout(probs: torch.Tensor, doc_ids: torch.Tensor, heads: int, key: int, p: float) -> torch.Tensor:
    """Dropout of dense attention probabilities with ``ops/attention.py``'s counter-based mask.

    probs: ``(n, H, L, L)`` CPU float tensor (float16, bfloat16, float32, float64), over (document,
    query head, local query i, local key j); doc_ids: int64 ``(n,)`` CPU, the index of each
    document in the attention's ``docs`` table (each below ``2**32 / H``); key:
    ``stream_key(seed, STREAM_ATTN_DROPOUT)``; p in (0, 1). Entry ``[n, h, i, j]`` is kept iff
    ``mix32(mix32(mix32(key ^ (doc_ids[n] * H + h)) ^ colmix(i)) ^ colmix(j)) >> 8 >= threshold24(p)``, and kept
    entries are scaled by ``1 / (1 - p)`` (in float32, float64 for float64). Returns a new
    contiguous tensor of probs' dtype; differentiable in probs. Needs ``fastpt._C``.
    """
    doc_ids = doc_ids.to(torch.int64).contiguous()
    return _SelfAdjoint.apply(_native_attention_dropout, probs, doc_ids, heads, key, p)


def _native_rows_dropout(probs, doc, local, key, p):
    probs = probs.contiguous()
    out = torch.empty_like(probs)
    b, h, s, _ = probs.shape
    _native._C.attention_dropout_rows_cpu(probs.data_ptr(), out.data_ptr(), doc.data_ptr(), local.data_ptr(), b, h,
                                          s, _native.dtype_code(probs.dtype), key, _rng.threshold24(p), _scale(p),
                                          _native.num_threads())
    return out


def attention_dropout_rows_torch(probs, doc, local, key, p):
    """``attention_dropout_rows`` in torch int64 arithmetic with plain autograd (any device): the
    formula the C++ kernel reproduces bit for bit, and what builds without fastpt._C run."""
    h = probs.shape[1]
    heads = torch.arange(h, device=probs.device)
    rk = _rng.mix32(key ^ (doc.clamp(min=0)[:, None, :] * h + heads[None, :, None]))  # (B, H, S)
    r = _rng.mix32(_rng.mix32(rk ^ _rng.colmix(local[:, None, :]))[..., None] ^ _rng.colmix(local[:, None, None, :]))  # (B, H, S, S)
    same = (doc[:, :, None] == doc[:, None, :]) & (doc >= 0)[:, :, None]  # (B, S, S)
    keep = ((r >> 8) >= _rng.threshold24(p)) & same[:, None]
    # +0 where dropped, as in C++
    return torch.where(keep, probs.to(acc_dtype(probs.dtype)) * _scale(p), 0.0).to(probs.dtype)


def attention_dropout_rows(probs: torch.Tensor, doc: torch.Tensor, local: torch.Tensor, key: int,
                           p: float) -> torch.Tensor:
    """Dropout of whole-row attention probabilities of packed documents, ``dropout_keep``'s mask.

    probs: ``(B, H, S, S)`` float tensor (float16, bfloat16, float32, float64) over (row, query
    head, query position, key position); doc: integer ``(B, S)``, the index in the attention's
    ``docs`` table of the document holding each position (-1: none, each below ``2**32 / H``);
    local: integer ``(B, S)``, each position's offset inside its document (in ``[0, S)``). Entry
    ``[b, h, i, j]`` is kept iff ``doc[b, i] == doc[b, j] >= 0`` and the counter-based bits of
    (document ``doc[b, i]``, head h, local query ``local[b, i]``, local key ``local[b, j]``)
    pass, exactly as ``attention_dropout`` would keep them on that document's own block; kept
    entries are scaled by ``1 / (1 - p)`` (in float32, float64 for float64), every other entry
    is exactly 0 (a padding query row included). Returns a new contiguous tensor of probs'
    dtype, differentiable in probs: the C++ kernel (self-adjoint autograd) on CPU tensors when
    fastpt._C is built, else ``attention_dropout_rows_torch``, bit-identical.

    Measured (2-core Zen 5, 2 threads; (32, 4, 128, 128) float32, the README demo's windows): 0.23 ms
    into a reused buffer, 0.4-1.0 ms with a fresh output (page faults), 16 ms for the torch formula.

    Raises ValueError when doc or local is not ``(B, S)`` or holds a value out of range (C++ path).
    """
    rows = probs.shape[::2] if probs.dim() == 4 and probs.shape[2] == probs.shape[3] else None
    if rows is None or doc.shape != rows or local.shape != rows:
        raise ValueError(f"attention_dropout_rows: expected probs (B, H, S, S) and doc, local (B, S), got "
                         f"{tuple(probs.shape)}, {tuple(doc.shape)}, {tuple(local.shape)}")
    doc, local = (x.to(torch.int64).contiguous() for x in (doc, local))
    if probs.device.type == "cpu" and _native.cpu_unavailable() is None:
        return _SelfAdjoint.apply(_native_rows_dropout, probs, doc, local, key, p)
    return attention_dropout_rows_torch(probs, doc, local, key, p)


# ----------------------------------------------------------------------------- public API


def dropout(x: torch.Tensor, p: float = 0.5, *, training: bool = True, seed: int | None = None,
            backend: str | None = None) -> torch.Tensor:
    """Dropout with a counter-based mask: zero each element with probability ``p``, scale the rest.

    Args:
        x: a floating-point tensor, any shape and strides (non-contiguous input is copied to
            row-major first; the mask follows the logical row-major order, not the memory one).
        p: drop probability in ``[0, 1)``; kept elements are multiplied by ``1 / (1 - p)``.
        training: False returns ``x`` itself, as do ``p == 0`` and an empty ``x`` (no seed is
            drawn then, as torch's dropout draws no random numbers there).
        seed: int in ``[0, 2**64)``; the mask is a pure function of ``(seed, element index)``.
            None draws one from torch's default generator (``torch.manual_seed`` reproduces it).
            A one-element integer tensor is read on the host in eager code; under
            ``torch.compile`` a tensor seed (and None, drawn by ``torch.randint`` in the graph)
            stays in the graph: CPU tensors go to the C++ kernel's custom op, which reads the key
            inside, other devices to the reference formula, which Inductor fuses with its
            neighbours; the same mask either way, and no graph break. Under a ``torch.func``
            transform (where the reference backend runs) None is drawn as a tensor too, under
            torch's randomness rules (``vmap(randomness="different")``: one seed per sample; the
            default "error": torch's error), and a tensor seed is not read (``_rng.fresh_seed``).
        backend: None (``cpu`` for CPU tensors when fastpt._C is built, ``triton`` for CUDA
            tensors but float64, else ``reference``; always ``reference`` under a ``torch.func``
            transform, where the others raise ``fastpt.BackendError``), "cpu", "triton" or
            "reference"; all give bit-identical results.

    Returns:
        A new contiguous tensor shaped like ``x``, in its dtype; differentiable (the gradient is
        the same mask times the same scale, recomputed, never stored).

    Raises:
        TypeError naming ``x`` (not a float16 / bfloat16 / float32 / float64 tensor), ``seed`` (not
        an int) or ``training`` (not a bool); ValueError naming ``p`` (outside [0, 1)), ``seed``
        (outside [0, 2**64)) or ``backend`` (an unknown name, also when nothing is dropped);
        ``fastpt.BackendError`` when the forced backend cannot serve.
    """
    p = _check(x, p)
    seed = None if seed is None else _rng.check_op_seed(seed)
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    OP.check_name(backend)
    if not training or p == 0.0 or x.numel() == 0:
        return x
    key = _rng.op_key(_rng.fresh_seed() if seed is None else seed, _rng.STREAM_DROPOUT)
    return OP(backend, x=x, key=key, p=p)
