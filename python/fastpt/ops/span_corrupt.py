"""T5 span corruption ("random spans" denoising).

Each row of ``L`` valid tokens is cut into alternating spans: non-noise span 1,
noise span 1, non-noise span 2, noise span 2, ... (it starts with non-noise and
ends with noise, as T5's ``random_spans_noise_mask``). The inputs keep the
non-noise tokens and replace each noise span by one sentinel id; the targets
list each sentinel followed by the tokens it replaced::

    tokens   a b c d e f g h          (noise: c d, g h)
    inputs   a b <s0> e f <s1> EOS    (sentinels count down: s0 = sentinel_start_id, s1 = s0 - 1)
    targets  <s0> c d <s1> g h EOS

How many tokens and spans are noise is decided on the host in float32 as T5 does it, the
same for every backend (T5's rule, with ``round`` half to even as ``tf.round``)::

    num_noise = clamp(round(L * noise_density), 1, L - 1)
    num_spans = min(max(1, round(num_noise / mean_span_len)), num_noise, L - num_noise)

and rows with ``L < 2`` get no noise (inputs = tokens + EOS, targets = EOS).
Where the spans fall is random and counter-based (``ops/_rng.py``): ``n`` items
are cut into ``k`` nonempty spans at the ``k - 1`` positions of ``1 .. n - 1``
with the smallest ``(bits(key, row, pos), pos)`` pairs, with one key for the
noise items (``STREAM_SPAN_NOISE``) and one for the others (``STREAM_SPAN_KEEP``).
That picks a uniformly random composition, so span lengths follow T5's
distribution, and the result is identical on every backend.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _dispatch, _native
from . import _rng, _validate


class SpanCorruption(NamedTuple):
    """What ``span_corrupt`` returns; unpacks as ``inputs, targets``."""

    inputs: torch.Tensor
    targets: torch.Tensor


# ----------------------------------------------------------------------------- host-side plan


def _rate(name: str, value, rows: int, ok, expected: str) -> torch.Tensor:
    """A float or a per-row ``(rows,)`` sequence/tensor, as float64 on the host, each value checked."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name}: expected a real tensor, got dtype {value.dtype}")
        t = value.detach().to("cpu", torch.float64)
    else:
        try:
            t = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}: expected a float or a ({rows},) sequence of floats, got {value!r}") from None
    if t.dim() == 0:
        t = t.expand(rows)
    elif t.shape != (rows,):
        raise ValueError(f"{name}: expected a float or shape ({rows},) (one value per row), got shape {tuple(t.shape)}")
    bad = ~ok(t)  # NaN fails every check
    if bad.any():
        raise ValueError(f"{name}: expected {expected}, got {float(t[bad][0])}")
    return t.contiguous()


def _rates(noise_density, mean_span_len, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both rates as checked float64 ``(rows,)`` host tensors."""
    density = _rate("noise_density", noise_density, rows, lambda t: (t > 0) & (t < 1), "values in (0, 1)")
    mean = _rate("mean_span_len", mean_span_len, rows, lambda t: (t >= 1) & torch.isfinite(t), "finite values >= 1")
    return density, mean


def check_seqlens(seqlens, rows: int | None, cols: int | None) -> torch.Tensor:
    """Valid length of each row as int64 on the host (None: every row is full).

    ``rows``/``cols``: the shape of ``input_ids``; None skips the row-count / upper-bound check.
    """
    if seqlens is None:
        return torch.full((rows,), cols, dtype=torch.int64)
    if not isinstance(seqlens, torch.Tensor):
        if isinstance(seqlens, (str, bytes)):
            raise TypeError(f"seqlens: expected an integer tensor or a sequence of ints, got {seqlens!r}")
        try:
            seqlens = torch.as_tensor(seqlens)
        except (ValueError, OverflowError) as exc:  # torch: "Overflow when unpacking long long"
            raise ValueError(f"seqlens: expected int64 lengths, got {seqlens!r} ({exc})") from None
        except (TypeError, RuntimeError) as exc:
            raise TypeError(f"seqlens: expected an integer tensor or a sequence of ints, got {seqlens!r} "
                            f"({exc})") from None
    if seqlens.dtype.is_floating_point or seqlens.dtype.is_complex or seqlens.dtype == torch.bool:
        raise TypeError(f"seqlens: expected an integer tensor, got dtype {seqlens.dtype}")
    if seqlens.dim() != 1 or (rows is not None and seqlens.shape[0] != rows):
        want = f"({rows},) (one length per row of input_ids)" if rows is not None else "(B,)"
        raise ValueError(f"seqlens: expected shape {want}, got {tuple(seqlens.shape)}")
    seqlens = seqlens.to("cpu", torch.int64)
    bad = seqlens < 0
    if cols is not None:
        bad |= seqlens > cols
    if bad.any():
        where = f"in [0, {cols}] (the width of input_ids)" if cols is not None else ">= 0"
        raise ValueError(f"seqlens: expected lengths {where}, found {int(seqlens[bad][0])}")
    return seqlens


def span_counts(lengths: torch.Tensor, noise_density: torch.Tensor, mean_span_len: torch.Tensor):
    """Noise tokens and noise spans per row: T5's ``random_spans_noise_mask`` rule, in float32 as T5
    computes it (``round(float32(L) * density)``, then ``round(float32(noise) / mean_span_len)``, rounding
    half to even), so the counts are T5's also where float64 would round the other way (L = 90,
    density 0.35: 31.5 in float32, 31.4999... in float64).

    Args:
        lengths: int64 ``(B,)`` valid lengths; noise_density, mean_span_len: float64 ``(B,)``.
    Returns:
        ``(num_noise, num_spans)``, int64 ``(B,)``; both 0 where ``lengths < 2``.
    """
    L = lengths.to(torch.float32)
    noise = torch.round(L * noise_density.to(torch.float32)).clamp(min=1.0)
    noise = torch.minimum(noise, L - 1)
    spans = torch.round(noise / mean_span_len.to(torch.float32)).clamp(min=1.0)
    spans = torch.minimum(spans, torch.minimum(noise, L - noise))
    short = lengths < 2
    noise, spans = noise.to(torch.int64), spans.to(torch.int64)
    return noise.masked_fill(short, 0), spans.masked_fill(short, 0)


def span_corrupt_lengths(seqlens, *, noise_density=0.15, mean_span_len=3.0):
    """Lengths of the inputs and targets ``span_corrupt`` produces, without running it.

    They depend only on the valid lengths and the rates, so a pipeline can size its
    sequences ahead (as T5's ``random_spans_helper``): inputs hold
    ``L - num_noise + num_spans + 1`` ids, targets ``num_noise + num_spans + 1`` (EOS included).

    Args:
        seqlens: an int (one row), or an integer ``(B,)`` tensor/sequence of valid lengths.
        noise_density, mean_span_len: floats or per-row ``(B,)`` values, as in ``span_corrupt``.
    Returns:
        ``(input_lengths, target_lengths)``: ints for an int ``seqlens``, else int64 ``(B,)``
        tensors on the device of ``seqlens``.
    Raises:
        TypeError / ValueError naming the argument.
    """
    value = _validate.integer(seqlens)  # an int or a numpy integer
    scalar = value is not None
    if scalar:
        seqlens = value
    if scalar and not 0 <= seqlens < 2**63:
        raise ValueError(f"seqlens: expected a length in [0, 2**63), got {seqlens}")
    device = seqlens.device if isinstance(seqlens, torch.Tensor) else torch.device("cpu")
    lengths = torch.as_tensor([seqlens]) if scalar else check_seqlens(seqlens, None, None)
    rows = lengths.shape[0]
    noise, spans = span_counts(lengths, *_rates(noise_density, mean_span_len, rows))
    inp, tgt = lengths - noise + spans + 1, noise + spans + 1
    return (int(inp), int(tgt)) if scalar else (inp.to(device), tgt.to(device))


def check_token_id(name: str, v, dtype: torch.dtype) -> int:
    v = _validate.positive_int(name, v, minimum=0)
    if v > torch.iinfo(dtype).max:
        raise ValueError(f"{name}: {v} does not fit the dtype of input_ids ({dtype})")
    return v


def op_inputs(ids, lengths, num_noise, num_spans, row_ids, *, sentinel_start_id, eos_id, pad_id, seed) -> dict:
    """The backend-neutral inputs of ``OP`` for a planned batch (also used by ``ul2_denoise``).

    ``ids`` (B, S) int32/int64; ``lengths``, ``num_noise``, ``num_spans``, ``row_ids``: int64 ``(B,)`` on
    the host, ``row_ids`` being the row index each row draws its random bits with.
    """
    sentinel_start_id = check_token_id("sentinel_start_id", sentinel_start_id, ids.dtype)
    max_spans = int(num_spans.max()) if num_spans.numel() else 0
    if sentinel_start_id - max_spans + 1 < 0:
        raise ValueError(
            f"sentinel_start_id: sentinels count down from it and a row needs {max_spans}, "
            f"so it must be >= {max_spans - 1}, got {sentinel_start_id}"
        )
    in_len, tgt_len = lengths - num_noise + num_spans + 1, num_noise + num_spans + 1
    return dict(
        ids=ids.contiguous(),
        lengths=lengths.contiguous(),
        num_noise=num_noise.contiguous(),
        num_spans=num_spans.contiguous(),
        row_ids=row_ids.contiguous(),
        keys=(_rng.stream_key(seed, _rng.STREAM_SPAN_NOISE), _rng.stream_key(seed, _rng.STREAM_SPAN_KEEP)),
        sentinel_start_id=sentinel_start_id,
        eos_id=check_token_id("eos_id", eos_id, ids.dtype),
        pad_id=check_token_id("pad_id", pad_id, ids.dtype),
        in_width=int(in_len.max()) if in_len.numel() else 0,
        tgt_width=int(tgt_len.max()) if tgt_len.numel() else 0,
    )


def _prepare(input_ids, seqlens, *, noise_density, mean_span_len, sentinel_start_id, eos_id, pad_id, seed) -> dict:
    """Validate the public arguments and plan the batch."""
    ids = _validate.index_tensor("input_ids", input_ids)
    if ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, S), got {tuple(ids.shape)}")
    seed = _rng.check_seed(seed)
    rows, cols = ids.shape
    lengths = check_seqlens(seqlens, rows, cols)
    noise, spans = span_counts(lengths, *_rates(noise_density, mean_span_len, rows))
    return op_inputs(ids, lengths, noise, spans, torch.arange(rows, dtype=torch.int64),
                     sentinel_start_id=sentinel_start_id, eos_id=eos_id, pad_id=pad_id, seed=seed)


# ----------------------------------------------------------------------------- reference


def _segment(key: int, row: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Lengths of the ``k`` nonempty spans that cut ``n`` items (``1 <= k <= n``), int64 ``(k,)``."""
    pos = torch.arange(1, n, dtype=torch.int64, device=row.device)
    # The k-1 smallest (bits, pos) pairs; a stable sort puts the smaller pos first among equal bits.
    order = torch.sort(_rng.bits(key, row, pos), stable=True).indices[: k - 1]
    cuts = torch.sort(pos[order]).values
    return torch.diff(cuts, prepend=cuts.new_zeros(1), append=cuts.new_full((1,), n))


def reference(ids, lengths, num_noise, num_spans, row_ids, keys, sentinel_start_id, eos_id, pad_id, in_width,
              tgt_width):
    """Pure-PyTorch ground truth, one row at a time; returns ``(inputs, targets)``."""
    key_noise, key_keep = keys
    dev = ids.device
    inputs = torch.full((ids.shape[0], in_width), pad_id, dtype=ids.dtype, device=dev)
    targets = torch.full((ids.shape[0], tgt_width), pad_id, dtype=ids.dtype, device=dev)
    eos = torch.tensor([eos_id], dtype=torch.int64, device=dev)
    for r in range(ids.shape[0]):
        L, n, k = int(lengths[r]), int(num_noise[r]), int(num_spans[r])
        tokens = ids[r, :L].to(torch.int64)
        if k == 0:
            inp, tgt = tokens, tokens[:0]
        else:
            row = torch.tensor(int(row_ids[r]), dtype=torch.int64, device=dev)
            # Spans in row order: keep 1, noise 1, keep 2, noise 2, ...; span[t] is token t's span (odd: noise).
            spans = torch.stack([_segment(key_keep, row, L - n, k), _segment(key_noise, row, n, k)], 1).flatten()
            span = torch.searchsorted(torch.cumsum(spans, 0), torch.arange(L, device=dev), right=True)
            noise = span % 2 == 1
            first = torch.ones(L, dtype=torch.bool, device=dev)
            first[1:] = span[1:] != span[:-1]
            starts = noise & first
            # Token t contributes its span's sentinel if it starts a noise span, then itself if it is kept
            # (inputs) or noise (targets); boolean indexing of the (L, 2) pairs reads them in that order.
            pairs = torch.stack([sentinel_start_id - span // 2, tokens], 1)
            inp = pairs[torch.stack([starts, ~noise], 1)]
            tgt = pairs[torch.stack([starts, noise], 1)]
        inp, tgt = torch.cat([inp, eos]), torch.cat([tgt, eos])
        inputs[r, : inp.numel()] = inp.to(ids.dtype)
        targets[r, : tgt.numel()] = tgt.to(ids.dtype)
    return inputs, targets


# ----------------------------------------------------------------------------- cpu


def _run_cpu(ids, lengths, num_noise, num_spans, row_ids, keys, sentinel_start_id, eos_id, pad_id, in_width,
             tgt_width):
    inputs = torch.empty((ids.shape[0], in_width), dtype=ids.dtype)
    targets = torch.empty((ids.shape[0], tgt_width), dtype=ids.dtype)
    p = _native._C.SpanCorruptParams()
    p.ids, p.inputs, p.targets = ids.data_ptr(), inputs.data_ptr(), targets.data_ptr()
    p.lengths, p.num_noise, p.num_spans, p.row_ids = (t.data_ptr() for t in (lengths, num_noise, num_spans, row_ids))
    p.rows, p.cols = ids.shape
    p.in_width, p.tgt_width = in_width, tgt_width
    p.id_dtype = _native.dtype_code(ids.dtype)
    p.key_noise, p.key_keep = keys
    p.sentinel_start_id, p.eos_id, p.pad_id = sentinel_start_id, eos_id, pad_id
    _native._C.span_corrupt_cpu(p, _native.num_threads())
    return inputs, targets


# ----------------------------------------------------------------------------- dispatch

# No GPU kernel: the work is a few hashes and a selection per token, and the plan is made on the
# host anyway. The cpu backend takes CPU tensors only; with ``backend=None`` ids on another device (CUDA)
# go through ``on_host``: the C++ kernel on a host copy, the results moved back (one read of the ids,
# against the reference's three host reads and ~100 small ops per row on the device: B = 64 x 512 took
# 254 ms that way on a CPU, 0.4 ms in the kernel). ``backend="reference"`` still runs on the device.
_on_cpu = _dispatch.device_is("cpu")


def on_host(input_ids, backend: str | None) -> torch.device | None:
    """The device to move the results back to when a call runs on a host copy of its inputs: ids on a
    device other than the CPU and no forced backend; None when the call runs where its inputs are."""
    if backend is None and isinstance(input_ids, torch.Tensor) and input_ids.device.type != "cpu":
        return input_ids.device
    return None


def host(value):
    """``value`` on the host: a tensor's CPU copy; anything else (a float, a list, None) as it is."""
    return value.cpu() if isinstance(value, torch.Tensor) else value

OP = _dispatch.Op("span_corrupt", [
    _dispatch.backend("cpu", lambda ids, **_: _on_cpu(ids.device), _run_cpu),
    _dispatch.backend("reference", lambda **_: None, reference),
], probe=lambda device: _prepare(torch.zeros(2, 8, dtype=torch.int64, device=device), None, noise_density=0.15,
                                  mean_span_len=3.0, sentinel_start_id=100, eos_id=1, pad_id=0, seed=0))


def span_corrupt(input_ids: torch.Tensor, seqlens: torch.Tensor | None = None, *, noise_density=0.15,
                 mean_span_len=3.0, sentinel_start_id: int, eos_id: int, pad_id: int, seed: int = 0,
                 backend: str | None = None) -> SpanCorruption:
    """T5 span corruption of right-padded (or packed, full) rows.

    Args:
        input_ids: int32/int64 ``(B, S)`` token ids, right padded.
        seqlens: optional integer ``(B,)`` valid length of each row, in ``[0, S]`` (read on the host);
            None means every row is full (packed rows).
        noise_density: fraction of each row to corrupt, in (0, 1): a float or a per-row ``(B,)`` tensor.
        mean_span_len: mean noise span length, >= 1: a float or a per-row ``(B,)`` tensor.
        sentinel_start_id: id of the first sentinel; the next spans of a row get ``sentinel_start_id - 1``,
            ``- 2``, ... (T5's ``<extra_id_0>``, ``<extra_id_1>``, ... at the top of its vocabulary).
        eos_id: id appended to inputs and targets. pad_id: id filling each row after its EOS.
        seed: int in ``[0, 2**64)``; the result is a pure function of (seed, row, tokens). Pass a
            different seed per batch (e.g. derived from the step), or every batch repeats the same spans.
        backend: None (fastest that fits; ids on a GPU are corrupted by the C++ kernel on a host copy, one
            device read, the results moved back), "cpu" (C++, CPU tensors) or "reference" (torch ops
            where the ids are: slow on a GPU, several host reads per row).

    Returns:
        ``SpanCorruption(inputs, targets)``, both with the dtype and device of ``input_ids``:
        inputs ``(B, max input length)``, targets ``(B, max target length)``, each row ending with EOS
        and padded with ``pad_id``. The widths depend only on ``seqlens`` and the rates;
        ``span_corrupt_lengths`` gives every row's lengths.

    Raises:
        TypeError / ValueError naming the argument: non-integer or non-2-D ``input_ids``, ``seqlens`` of
        the wrong shape or outside ``[0, S]``, densities outside (0, 1), ``mean_span_len < 1``, negative
        ids or ids that do not fit the dtype, ``sentinel_start_id`` too small for the number of spans;
        ``BackendError`` if the forced backend cannot serve.
    """
    device = on_host(input_ids, backend)
    if device is not None:  # the C++ kernel on a host copy (see ``on_host``)
        out = span_corrupt(input_ids.cpu(), host(seqlens), noise_density=host(noise_density),
                           mean_span_len=host(mean_span_len), sentinel_start_id=sentinel_start_id, eos_id=eos_id,
                           pad_id=pad_id, seed=seed)
        return SpanCorruption(out.inputs.to(device), out.targets.to(device))
    inputs = _prepare(input_ids, seqlens, noise_density=noise_density, mean_span_len=mean_span_len,
                      sentinel_start_id=sentinel_start_id, eos_id=eos_id, pad_id=pad_id, seed=seed)
    return SpanCorruption(*OP(backend, **inputs))
