"""``Schedule``: the learning rate, the teacher's momentum and when the teacher moves, per
step, against hand computations."""

import math

import pytest

from dsmae.config import TrainConfig
from dsmae.pretrain.schedule import Schedule


def _schedule(**train) -> Schedule:
    options = {"epochs": 4, "warmup_epochs": 1, "lr": 0.1, "min_lr": 0.0, "momentum_start": 0.9,
               "momentum_end": 1.0, **train}  # fmt: skip
    return Schedule(TrainConfig(**options), steps_per_epoch=5)


def test_the_learning_rate_warms_up_over_an_epoch_then_falls_on_a_cosine():
    s = _schedule()
    assert s.total_steps == 20
    assert [s.lr(i) for i in range(5)] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08])
    assert s.lr(5) == pytest.approx(0.1)  # the peak, where the cosine starts
    # half-way through the 15 decay steps: 0.1 * (1 + cos(pi / 2)) / 2
    assert s.lr(5 + 7.5) == pytest.approx(0.05)
    assert s.lr(20) == pytest.approx(0.0)


def test_per_epoch_the_teacher_moves_after_each_epochs_last_step_by_its_epochs_momentum():
    s = _schedule(ema_every="epoch")
    assert [i for i in range(20) if s.teacher_moves(i)] == [4, 9, 14, 19]
    # epoch e of 4: 1 - 0.1 * (1 + cos(pi * e / 4)) / 2
    expected = [1 - 0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert [s.momentum(i) for i in (4, 9, 14, 19)] == pytest.approx(expected)
    assert s.momentum(0) == s.momentum(4)  # the same all through an epoch


def test_per_step_the_teacher_moves_every_step_by_the_steps_momentum():
    s = _schedule(ema_every="step")
    assert all(s.teacher_moves(i) for i in range(20))
    assert s.momentum(0) == pytest.approx(0.9)
    assert s.momentum(10) == pytest.approx(0.95)  # half-way: (1 + cos(pi / 2)) / 2 = 0.5
