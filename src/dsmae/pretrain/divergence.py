"""Watching a pre-training run for divergence: the steps skipped for a non-finite loss or
gradient are counted on the device every step, and read (one synchronisation) only where
metrics are logged, an epoch ends or a checkpoint is due: the run warns about new skipped
steps and stops before saving once ``train.max_bad_steps`` come in a row."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """Pre-training stopped: too many consecutive steps with a non-finite loss or gradient."""


class StepHealth:
    """Counts the steps skipped for a non-finite gradient, on the device.

    :meth:`record` runs every step without waiting for the device; :meth:`check` reads
    the counters (one synchronisation) when metrics are logged, warns about new skipped
    steps and stops a run that has diverged.
    """

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = zero.clone()  # steps skipped in this process's run
        self.in_a_row = zero.clone()  # the current run of consecutive skipped steps
        self.longest = zero.clone()  # the longest such run since the last check
        self.reported = 0  # ``skipped`` at the last check
        self.checked_step = 0  # the step of the last check

    def record(self, finite: torch.Tensor) -> None:
        """One step's outcome: ``finite``, the 0-d bool of
        :func:`~dsmae.pretrain.step.train_step`."""
        bad = (~finite).long()
        self.skipped += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        torch.maximum(self.longest, self.in_a_row, out=self.longest)

    def check(
        self, step: int, losses: dict[str, torch.Tensor], limit: int, last_good: Path | None
    ) -> int:
        """Warn about the steps skipped since the last check (up to ``step``, 1-based) and
        return how many were skipped in all.

        Raises:
            DivergedError: ``limit`` (> 0) consecutive steps were skipped. Nothing is
                saved, so the last good checkpoint stays as it was.
        """
        skipped, longest = int(self.skipped), int(self.longest)  # synchronises
        self.longest.copy_(self.in_a_row)
        new, first = skipped - self.reported, self.checked_step + 1
        self.reported, self.checked_step = skipped, step
        if not new and not (limit and longest >= limit):
            return skipped
        values = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        if new:
            where = f"step {step}" if first == step else f"{new} of steps {first}-{step}"
            log.warning("%s skipped: non-finite gradient (step %d: %s)", where, step, values)
        if limit and longest >= limit:
            raise DivergedError(
                f"stopped at step {step}: {longest} steps in a row had a non-finite loss or "
                f"gradient ({values}). The last good checkpoint is {last_good or 'none yet'}. "
                "Try a lower train.base_lr, train.grad_clip (e.g. 1.0), or more "
                "train.warmup_epochs, then resume from it with --resume (and --force, as the "
                "settings changed)."
            )
        return skipped
