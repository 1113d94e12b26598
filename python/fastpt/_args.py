"""argparse value types shared by the commands: a bad value is argparse's own error naming the option and
what it expects (``fastpt eval: error: argument --epochs: expected an integer >= 1, got 0``), status 2."""
from __future__ import annotations

import argparse
import math


def arg_type(convert, ok, expected: str):
    """An argparse type: ``convert(text)`` if ``ok`` of it, else an error saying ``expected`` (argparse
    names the option)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


positive_int = arg_type(int, lambda v: v >= 1, "an integer >= 1")
seed = arg_type(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")  # as train.seed
positive_float = arg_type(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
