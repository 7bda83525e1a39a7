import itertools
import math

import pytest

import dsmae
from dsmae.schedules import lr_at, momentum_at, scaled_lr


def test_momentum_end_points_and_shape():
    assert dsmae.momentum_at(0, 100) == pytest.approx(0.96)
    assert momentum_at(100, 100) == pytest.approx(0.99)
    assert momentum_at(50, 100) == pytest.approx(0.975)  # half-way on a half-cosine
    # by hand at a quarter: 0.99 - 0.03 * (1 + cos(pi/4)) / 2
    assert momentum_at(25, 100) == pytest.approx(0.99 - 0.03 * (1 + math.cos(math.pi / 4)) / 2)
    values = [momentum_at(s, 100) for s in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))  # monotone rising
    assert momentum_at(5, 10, start=0.5, end=1.0) == pytest.approx(0.75)


def test_lr_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1)


def test_scaled_lr():
    assert scaled_lr(1.5e-4, 2048) == pytest.approx(1.2e-3)
