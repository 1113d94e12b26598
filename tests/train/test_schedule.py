"""Learning-rate schedule: warmup, cosine / linear decay to min_lr_ratio, constant."""
import math

import pytest

from fastpt.train.schedule import lr_at


def test_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0
    assert math.isclose(lr_at(9, **kw), 0.1 + 0.9 * 0.5)  # half way: the cosine's midpoint
    assert math.isclose(lr_at(14, **kw), 0.1) and math.isclose(lr_at(100, **kw), 0.1)
    values = [lr_at(s, **kw) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant():
    assert math.isclose(lr_at(5, lr=2.0, total_steps=10, schedule="linear", min_lr_ratio=0.0), 1.0)
    assert math.isclose(lr_at(10, lr=2.0, total_steps=10, schedule="linear", min_lr_ratio=0.5), 1.0)
    assert lr_at(0, lr=3.0, warmup_steps=2, schedule="constant") == 1.5
    assert lr_at(10**6, lr=3.0, schedule="constant") == 3.0


def test_errors():
    with pytest.raises(ValueError, match="schedule: expected one of"):
        lr_at(0, lr=1.0, schedule="step")
    with pytest.raises(ValueError, match="needs total_steps"):
        lr_at(3, lr=1.0, schedule="cosine")
