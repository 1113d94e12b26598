"""UL2's mixture of denoisers (Tay et al., 2022) as a ready recipe on ``span_corrupt``.

Every row picks one denoiser at random:

- R (regular): T5 span corruption with short spans and 15% noise;
- X (extreme): long spans and/or 50% noise;
- S (sequential): prefix-LM, the row is split into a prefix (inputs) and the rest (targets).

The pick is counter-based (``ops/_rng.py``): row ``r`` takes denoiser ``i`` with
``cum[i-1] <= uniform_int(bits(stream_key(seed, STREAM_UL2_DENOISER), r, 0), 2**24) < cum[i]``,
where ``cum`` is the cumulative weight table scaled to ``2**24`` in float64 on the host.
R/X rows then go through ``span_corrupt`` with their own rates, drawing their spans with
their own row index ``r``, so a row gets exactly the spans ``span_corrupt`` would give row
``r`` of the batch with those rates. An S row of length ``L >= 2`` keeps a prefix of
``1 + uniform_int(bits(stream_key(seed, STREAM_UL2_SPLIT), r, 0), L - 1)`` tokens, i.e.
uniform in ``[1, L - 1]``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _rng, _validate
from .span_corrupt import OP as SPAN_OP
from .span_corrupt import check_seqlens, check_token_id, host, on_host, op_inputs, span_counts

MODES = ("R", "X", "S")
WEIGHT_SCALE = 1 << 24  # resolution of the denoiser weights: 2**-24


class Denoiser(NamedTuple):
    """One denoiser of the mixture: ``mode`` "R" or "X" (span corruption with ``mean_span_len`` and
    ``noise_density``) or "S" (prefix-LM, no parameters)."""

    mode: str
    mean_span_len: float | None = None
    noise_density: float | None = None


# The seven denoisers of the UL2 paper (section 3.1.2): R: spans 3 and 8 at 15% noise;
# X: spans 3 and 8 at 50%, span 64 at 15% and 50%; S: prefix-LM.
UL2_DENOISERS = (
    Denoiser("R", 3.0, 0.15),
    Denoiser("R", 8.0, 0.15),
    Denoiser("X", 3.0, 0.5),
    Denoiser("X", 8.0, 0.5),
    Denoiser("X", 64.0, 0.15),
    Denoiser("X", 64.0, 0.5),
    Denoiser("S"),
)


class UL2Batch(NamedTuple):
    """What ``ul2_denoise`` returns; unpacks as ``inputs, targets, denoiser, input_lengths, target_lengths``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    denoiser: torch.Tensor
    input_lengths: torch.Tensor
    target_lengths: torch.Tensor


def _denoisers(denoisers) -> tuple[Denoiser, ...]:
    try:
        out = tuple(d if isinstance(d, Denoiser) else Denoiser(*d) for d in denoisers)
    except TypeError:
        raise TypeError(f"denoisers: expected a sequence of Denoiser(mode, mean_span_len, noise_density), "
                        f"got {denoisers!r}") from None
    if not out:
        raise ValueError("denoisers: expected at least one denoiser")
    for i, d in enumerate(out):
        if d.mode not in MODES:
            raise ValueError(f"denoisers[{i}]: mode must be one of {MODES}, got {d.mode!r}")
        if d.mode == "S":
            continue
        try:
            mean, density = float(d.mean_span_len), float(d.noise_density)
        except (TypeError, ValueError):
            mean = density = float("nan")
        if not (mean >= 1 and mean < float("inf") and 0 < density < 1):
            raise ValueError(f"denoisers[{i}]: an {d.mode} denoiser needs a finite mean_span_len >= 1 and a "
                             f"noise_density in (0, 1), got {d}")
    return out


def denoiser_table(weights, n: int) -> torch.Tensor:
    """Cumulative integer weight table, int64 ``(n,)`` ending at ``WEIGHT_SCALE``.

    ``weights``: None (uniform) or ``n`` non-negative numbers, not all zero; normalised, so
    ``[1, 1, 2]`` and ``[0.25, 0.25, 0.5]`` are the same mixture. Raises ValueError/TypeError naming ``weights``.
    """
    if weights is None:
        w = torch.ones(n, dtype=torch.float64)
    else:
        try:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"weights: expected {n} numbers, got {weights!r}") from None
        if w.numel() != n:
            raise ValueError(f"weights: expected one weight per denoiser ({n}), got {w.numel()}")
        if not bool(((w >= 0) & torch.isfinite(w)).all()) or not float(w.sum()) > 0:
            raise ValueError(f"weights: expected finite non-negative weights, not all zero, got {w.tolist()}")
    w = w / w.max()  # the same mixture; a sum of huge finite weights no longer overflows to inf
    # Rounding the cumulative sum (not each weight) keeps the table ending exactly at the scale.
    return torch.round(torch.cumsum(w, 0) / w.sum() * WEIGHT_SCALE).to(torch.int64)


def choose_denoisers(rows: int, table: torch.Tensor, seed: int) -> torch.Tensor:
    """Index of the denoiser each of ``rows`` rows uses, int64 ``(rows,)`` on the host."""
    u = _rng.uniform_int(_rng.grid_bits(_rng.stream_key(seed, _rng.STREAM_UL2_DENOISER), rows, 1)[:, 0], WEIGHT_SCALE)
    return torch.searchsorted(table, u, right=True)


def prefix_lengths(lengths: torch.Tensor, rows: torch.Tensor, seed: int) -> torch.Tensor:
    """S-denoiser split: prefix length per row, uniform in ``[1, L - 1]`` (``L`` itself when ``L < 2``)."""
    b = _rng.bits(_rng.stream_key(seed, _rng.STREAM_UL2_SPLIT), rows, torch.zeros_like(rows))
    return torch.where(lengths < 2, lengths, 1 + _rng.uniform_int(b, (lengths - 1).clamp(min=1)))


def ul2_denoise(input_ids: torch.Tensor, seqlens: torch.Tensor | None = None, *, sentinel_start_id: int,
                eos_id: int, pad_id: int, mode_token_ids: dict | None = None, denoisers=UL2_DENOISERS,
                weights=None, seed: int = 0, backend: str | None = None) -> UL2Batch:
    """Apply UL2's mixture of denoisers, one denoiser per row.

    R/X rows are span-corrupted (``span_corrupt`` layout: inputs with sentinels counting down from
    ``sentinel_start_id``, targets = sentinel + span tokens, each ending with EOS). S rows follow
    T5's prefix-LM: inputs = prefix + EOS, targets = the rest + EOS (the prefix is uniform in
    ``[1, L - 1]`` tokens; rows with ``L < 2`` give inputs = tokens + EOS, targets = EOS).
    With ``mode_token_ids`` the row's mode token (UL2's [NLU]/[NLG]/[S2S] paradigm tokens) is
    prepended to its inputs.

    Args:
        input_ids: int32/int64 ``(B, S)`` token ids, right padded.
        seqlens: optional integer ``(B,)`` valid lengths in ``[0, S]``; None: every row full (packed).
        sentinel_start_id, eos_id, pad_id: as in ``span_corrupt``.
        mode_token_ids: None, or a dict mapping every mode used by ``denoisers`` ("R", "X", "S") to an id.
        denoisers: sequence of ``Denoiser(mode, mean_span_len, noise_density)`` (or plain tuples);
            default ``UL2_DENOISERS``, the paper's seven.
        weights: None (uniform over ``denoisers``: 1/7 each by default) or one non-negative weight per
            denoiser, e.g. to give S rows a larger share; normalised, resolved to 2**-24.
        seed: int in ``[0, 2**64)``; pass a different seed per batch.
        backend: backend of the span corruption: None, "cpu" or "reference". With None, ids on a GPU are
            denoised on a host copy (``span_corrupt``'s C++ kernel, the plan made there anyway; one device
            read) and the results moved back.

    Returns:
        ``UL2Batch(inputs, targets, denoiser, input_lengths, target_lengths)`` on the device of
        ``input_ids``: inputs ``(B, max input length)`` and targets ``(B, max target length)`` with the
        dtype of ``input_ids``, padded with ``pad_id``; ``denoiser`` int64 ``(B,)`` index into
        ``denoisers``; the lengths int64 ``(B,)`` (EOS and mode token included).

    Raises:
        TypeError / ValueError naming the argument (the checks of ``span_corrupt``, plus bad
        ``denoisers``, ``weights`` and ``mode_token_ids``); ``BackendError`` if the forced backend cannot serve.
    """
    device = on_host(input_ids, backend)
    if device is not None:  # on a host copy (see span_corrupt.on_host): no per-row device reads and uploads
        out = ul2_denoise(input_ids.cpu(), host(seqlens), sentinel_start_id=sentinel_start_id, eos_id=eos_id,
                          pad_id=pad_id, mode_token_ids=mode_token_ids, denoisers=denoisers, weights=host(weights),
                          seed=seed)
        return UL2Batch(*(t.to(device) for t in out))
    ids = _validate.index_tensor("input_ids", input_ids)
    if ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, S), got {tuple(ids.shape)}")
    seed = _rng.check_seed(seed)
    denoisers = _denoisers(denoisers)
    table = denoiser_table(weights, len(denoisers))
    rows, cols = ids.shape
    lengths = check_seqlens(seqlens, rows, cols)
    # Checked here too: a batch without R/X rows never reaches span_corrupt's checks.
    check_token_id("sentinel_start_id", sentinel_start_id, ids.dtype)
    eos_id = check_token_id("eos_id", eos_id, ids.dtype)
    pad_id = check_token_id("pad_id", pad_id, ids.dtype)
    mode_ids = None
    if mode_token_ids is not None:
        if not isinstance(mode_token_ids, dict):
            raise TypeError(f"mode_token_ids: expected a dict mode -> id, got {type(mode_token_ids).__name__}")
        missing = sorted({d.mode for d in denoisers} - set(mode_token_ids))
        if missing:
            raise ValueError(f"mode_token_ids: no id for mode(s) {missing} used by the denoisers")
        mode_ids = {m: check_token_id(f"mode_token_ids[{m!r}]", v, ids.dtype) for m, v in mode_token_ids.items()}

    choice = choose_denoisers(rows, table, seed)
    is_s = torch.tensor([d.mode == "S" for d in denoisers])[choice]
    span_rows, s_rows = (~is_s).nonzero()[:, 0], is_s.nonzero()[:, 0]
    off = 0 if mode_ids is None else 1

    # Plan both kinds of rows on the host so the output widths are known before any work.
    picked = choice[span_rows]
    density = torch.tensor([float(d.noise_density or 0) for d in denoisers], dtype=torch.float64)[picked]
    mean = torch.tensor([float(d.mean_span_len or 0) for d in denoisers], dtype=torch.float64)[picked]
    noise, spans = span_counts(lengths[span_rows], density, mean)
    prefix = prefix_lengths(lengths[s_rows], s_rows, seed)
    in_len = torch.empty(rows, dtype=torch.int64)
    tgt_len = torch.empty(rows, dtype=torch.int64)
    in_len[span_rows] = lengths[span_rows] - noise + spans + 1 + off
    tgt_len[span_rows] = noise + spans + 1
    in_len[s_rows] = prefix + 1 + off
    tgt_len[s_rows] = lengths[s_rows] - prefix + 1
    in_width = int(in_len.max()) if rows else 0
    tgt_width = int(tgt_len.max()) if rows else 0

    dev = ids.device
    inputs = torch.full((rows, in_width), pad_id, dtype=ids.dtype, device=dev)
    targets = torch.full((rows, tgt_width), pad_id, dtype=ids.dtype, device=dev)
    if span_rows.numel():
        op_in = op_inputs(ids[span_rows.to(dev)], lengths[span_rows], noise, spans, span_rows,
                          sentinel_start_id=sentinel_start_id, eos_id=eos_id, pad_id=pad_id, seed=seed)
        sp_in, sp_tgt = SPAN_OP(backend, **op_in)
        idx = span_rows.to(dev)
        inputs[idx, off: off + sp_in.shape[1]] = sp_in
        targets[idx, : sp_tgt.shape[1]] = sp_tgt
    if s_rows.numel():
        _prefix_lm(ids[s_rows.to(dev)], lengths[s_rows].to(dev), prefix.to(dev), s_rows.to(dev), inputs, targets,
                   off, eos_id)
    if mode_ids is not None and rows:
        mode_of = torch.tensor([mode_ids[d.mode] for d in denoisers], dtype=torch.int64, device=dev)
        inputs[:, 0] = mode_of[choice.to(dev)].to(ids.dtype)
    return UL2Batch(inputs, targets, choice.to(dev), in_len.to(dev), tgt_len.to(dev))


def _prefix_lm(ids, lengths, prefix, rows, inputs, targets, off, eos_id):
    """Write S rows in place: inputs[off:] = prefix + EOS, targets = suffix + EOS (pad after, already there)."""
    # One extra column so gathers past the row end stay in bounds (and S == 0 works).
    src = torch.nn.functional.pad(ids, (0, 1))
    last = src.shape[1] - 1
    j = torch.arange(inputs.shape[1] - off, device=ids.device).unsqueeze(0)
    p = prefix.unsqueeze(1)
    inp = torch.where(j < p, src.gather(1, j.clamp(max=last).expand(len(rows), -1)), eos_id)
    inputs[rows, off:] = torch.where(j <= p, inp, inputs[rows, off:])
    j = torch.arange(targets.shape[1], device=ids.device).unsqueeze(0)
    n = (lengths - prefix).unsqueeze(1)
    tgt = torch.where(j < n, src.gather(1, (p + j).clamp(max=last)), eos_id)
    targets[rows] = torch.where(j <= n, tgt, targets[rows])
