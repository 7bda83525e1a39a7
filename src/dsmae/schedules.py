"""Schedules of pre-training: the teacher momentum (SPEC section 3) and the learning rate."""

from __future__ import annotations

import math


def _half_cosine(progress: float) -> float:
    """1 at progress 0, falling along a half-cosine to 0 at progress 1 (clamped outside)."""
    progress = min(max(progress, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, total_steps: int, start: float = 0.96, end: float = 0.99) -> float:
    """Teacher EMA momentum: ``start`` at step 0, rising on a half-cosine to ``end`` at the last.

    ``m(s) = end - (end - start) * (1 + cos(pi * s / S)) / 2``, as BYOL/DINO/SdAE.
    """
    if total_steps <= 0:
        return end
    return end - (end - start) * _half_cosine(step / total_steps)


def lr_at(
    step: float, total_steps: float, warmup_steps: float, peak_lr: float, min_lr: float = 0.0
) -> float:
    """Learning rate: linear warm-up from 0 to ``peak_lr``, then half-cosine decay to ``min_lr``.

    Steps may be fractional (MAE adjusts the rate every iteration as a fraction of an epoch).
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return peak_lr
    return min_lr + (peak_lr - min_lr) * _half_cosine((step - warmup_steps) / decay_steps)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of MAE/Goyal et al.: ``lr = base_lr * batch_size / 256``."""
    return base_lr * batch_size / 256
