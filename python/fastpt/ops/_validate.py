"""Argument checks shared by the ops. Every error names the argument and what was expected."""
from __future__ import annotations

import contextlib
import numbers

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the ops compute in


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the ops' math: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_unit(*grads: torch.Tensor | None) -> torch.Tensor:
    """The largest |g| over the given gradients (Nones and empty ones skipped), 1 where that is 0: the
    contrastive backwards divide their incoming gradients by it so that dS stays representable when
    rounded to fp16, and multiply it back at the end. A 0-dim device tensor: no host sync."""
    maxima = [g.abs().amax() for g in grads if g is not None and g.numel()]
    gmax = torch.stack(maxima).amax() if maxima else torch.ones(())
    return torch.where(gmax > 0, gmax, torch.ones_like(gmax))


def index_tensor(name: str, t, *, ndim_min: int = 1) -> torch.Tensor:
    """An int32/int64 tensor with at least ``ndim_min`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got dtype {t.dtype}")
    if t.dim() < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} dimension(s), got shape {tuple(t.shape)}")
    return t


def same_shape_device(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (the shape of {like_name}), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device} (the device of {like_name}), got {t.device}")


def mask_tensor(name: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A bool/integer mask of the same shape and device as ``like``, returned as bool."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name}: expected a bool or integer tensor, got dtype {t.dtype}")
    same_shape_device(name, t, like, like_name)
    return t if t.dtype == torch.bool else t != 0


def probability(name: str, p) -> float:
    if isinstance(p, (bool, str, bytes)):  # float() would take "0.1" and True
        raise TypeError(f"{name}: expected a float in [0, 1], got {p!r}")
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float in [0, 1], got {p!r}") from None
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
    return p


def flag(name: str, v) -> bool:
    """A bool (``bool("no")`` is True, so strings and the like are refused, not read); numpy's
    bool and the SymBool a shape comparison gives under torch.compile pass."""
    if isinstance(v, (bool, torch.SymBool)):
        return v
    if type(v).__name__ == "bool_" and type(v).__module__ == "numpy":
        return bool(v)
    raise TypeError(f"{name}: expected True or False, got {v!r}")


def autocast_known(device_type: str) -> bool:
    """Whether ``torch.autocast`` knows the device type: ``torch.is_autocast_enabled`` and
    ``torch.autocast(...)`` raise for one it does not (meta tensors, shape inference)."""
    return device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or no context for a device type autocast does not
    know (``autocast_known``)."""
    return torch.autocast(device_type, enabled=False) if autocast_known(device_type) else contextlib.nullcontext()


def integer(v) -> int | None:
    """``v`` as a Python int when it is an integer (int, numpy integers; not bool), else None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        return None
    return int(v)


def positive_int(name: str, v, *, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point:
            v = int(v.item())
        elif integer(v) is None:  # numpy integers pass (numpy bools are no Integral)
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        else:
            v = integer(v)
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def ids_in_range(name: str, t: torch.Tensor, high: int, high_name: str) -> None:
    """Every id in ``[0, high)``."""
    ids_in_ranges([(name, t, high_name, high)])


def ids_in_ranges(tables) -> None:
    """ValueError naming the first ``(name, ids, size name, size)`` whose ids fall outside
    ``[0, size)``: one host read for every tensor's smallest and largest id."""
    tables = [row for row in tables if row[1].numel()]
    if not tables:
        return
    bounds = torch.stack([torch.stack(torch.aminmax(t.to(torch.int64))) for _, t, _, _ in tables]).tolist()
    for (name, _, size_name, size), (lo, hi) in zip(tables, bounds):
        if lo < 0 or hi >= size:
            raise ValueError(f"{name}: expected ids in [0, {size_name}={size}), found {lo if lo < 0 else hi}")
