"""What each pre-training step does beyond its gradient, decided in one place: its
learning rate (linear warm-up, then a half-cosine to ``train.min_lr``), the teacher's
momentum (0.96 -> 0.99 on a half-cosine, SPEC section 3) and whether the teacher moves
after it (every step, or after each epoch's last: ``train.ema_every``). The training
loop, the time budget's timing and ``dsmae bench`` all ask one :class:`Schedule`."""

from __future__ import annotations

from dataclasses import dataclass

from dsmae.config import TrainConfig
from dsmae.schedules import lr_at, momentum_at


@dataclass(frozen=True)
class Schedule:
    """The schedules of a run of ``train.epochs`` epochs of ``steps_per_epoch`` steps.
    Steps count from 0."""

    train: TrainConfig
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.train.epochs

    @property
    def teacher_every_step(self) -> bool:
        return self.train.ema_every == "step"

    def lr(self, step: int) -> float:
        """The learning rate of ``step``: warm-up over ``train.warmup_epochs``, then cosine."""
        t = self.train
        warmup_steps = self.steps_per_epoch * t.warmup_epochs
        return lr_at(step, self.total_steps, warmup_steps, t.lr, t.min_lr)

    def momentum(self, step: int) -> float:
        """The teacher's momentum after ``step``: that of the step among all steps (per
        step), or of its epoch among all epochs (per epoch)."""
        t = self.train
        if self.teacher_every_step:
            return momentum_at(step, self.total_steps, t.momentum_start, t.momentum_end)
        epoch = step // self.steps_per_epoch
        return momentum_at(epoch, t.epochs, t.momentum_start, t.momentum_end)

    def teacher_moves(self, step: int) -> bool:
        """Whether the teacher moves after ``step``: every step, or at the end of an epoch."""
        return self.teacher_every_step or (step + 1) % self.steps_per_epoch == 0
