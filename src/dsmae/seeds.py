"""Every seed a run derives from its ``train.seed``, in one place.

Each random stream of a run (the draws of a pre-training step, the data order of an
epoch, the crops of a probe step, a process's global RNGs) has its own seed, a function of
the run's seed and the stream's position alone. So a resumed run, or one on another
number of processes, draws the same numbers. Changing a formula here changes every
result that depends on it: they are pinned by ``tests/test_seeds.py``.
"""

from __future__ import annotations

# Streams mixed by :func:`_mixed`: odd, distinct, never changed.
_PRETRAIN_STEP = 7
_PROBE_STEP = 11
_MONITOR = 13


def _mixed(seed: int, stream: int, index: int) -> int:
    """A seed for draw ``index`` of ``stream``, well apart from other seeds and streams."""
    return (seed * 1_000_003 + stream) * 1_000_000_007 % 2**62 + index


def pretrain_step_seed(seed: int, step: int) -> int:
    """The crops, flips, noise mask and noise of pre-training step ``step`` (global batch)."""
    return _mixed(seed, _PRETRAIN_STEP, step)


def probe_step_seed(seed: int, step: int) -> int:
    """The crops and flips of step ``step`` of the linear probe's ``mae`` recipe."""
    return _mixed(seed, _PROBE_STEP, step)


def monitor_seed(seed: int) -> int:
    """The corruption of the fixed batch the loss-gradient monitor reads."""
    return _mixed(seed, _MONITOR, 0)


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The pre-training data order of epoch ``epoch``."""
    return seed * 100_003 + epoch


def finetune_epoch_seed(seed: int, epoch: int) -> int:
    """The fine-tuning data order of epoch ``epoch``."""
    return seed + epoch


def process_seed(seed: int, rank: int) -> int:
    """The global RNGs (``random``, numpy, torch) of process ``rank``: MAE's ``seed + rank``."""
    return seed + rank
