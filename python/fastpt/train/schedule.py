"""Learning-rate schedule: linear warmup, then cosine / linear decay to ``min_lr_ratio * lr`` or constant.

A pure function of the step (nanoGPT's ``get_lr``): the recipe sets every parameter group's
``lr`` before each optimizer step, so a resumed run needs nothing but the step to continue the
schedule exactly.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, *, lr: float, warmup_steps: int = 0, total_steps: int | None = None, schedule: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (reaches ``lr`` on the
    last warmup step). Then over ``[warmup_steps, total_steps]`` the factor falls from 1 to
    ``min_lr_ratio`` on a half cosine ("cosine") or a line ("linear"), and stays there after
    ``total_steps``; "constant" keeps 1. Raises ValueError for an unknown schedule or a decaying
    schedule without ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if total_steps is None:
        raise ValueError(f"schedule={schedule!r} needs total_steps")
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "cosine":
        factor = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1 - (1 - min_lr_ratio) * progress
    return lr * factor
