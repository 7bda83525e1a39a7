"""What the curves study runs: its variants, its settings, and its tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("gap_curves")


BENCHMARKS = Path(__file__).resolve().parents[1]


VARIANTS: dict[str, dict[str, Any]] = {
    "mae": {"model.method": "mae"},
    "dsmae-ly": {"model.method": "dsmae-ly"},
    "dsmae-lz": {"model.method": "dsmae-lz"},
    "dsmae": {"model.method": "dsmae", "train.ema_every": "epoch"},  # SPEC section 3
    "dsmae-step": {"model.method": "dsmae", "train.ema_every": "step"},
}


# Each setting: its file of config values (benchmarks/settings/, runs.setting_file) and the
# pre-training images; "subset" None: the whole train split.
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {"file": "cifar-cpu", "subset": 1024},
    "smoke": {"file": "smoke", "subset": 64},  # the flow in seconds, for the tests
    "paper": {"file": "paper", "subset": None},
}


@dataclass(frozen=True)
class Study:
    """What one study runs: the setting, the schedule's length, where it reads the
    curves, and the seeds of the spread."""

    out: Path
    data: Path
    setting: str
    epochs: int
    checkpoints: tuple[int, ...]  # epochs read on the seed-0 curve (the last: ``epochs``)
    spread_epoch: int  # the epoch read on every seed
    seeds: int

    def config(self, variant: str, seed: int) -> Any:
        """The pre-training config of ``variant`` at ``seed``."""
        from runs import run_config

        setting = SETTINGS[self.setting]
        return run_config(
            setting["file"],
            {
                **VARIANTS[variant],
                "data.source": str(self.data),
                "data.subset": setting["subset"],
                "train.epochs": self.epochs,
                "train.seed": seed,
                "train.checkpoint_every": self.checkpoint_every,
                "train.checkpoint_minutes": 10,  # resumable from a kill
                "train.keep_checkpoints": 0,
                "monitor.knn_every": 0,
                "monitor.images_every": 0,
                "out": str(self.run_folder(variant, seed)),
            },
        )

    @property
    def checkpoint_every(self) -> int:
        """The epoch period that writes every checkpoint the curves read."""
        from math import gcd

        period = 0
        for epoch in (*self.checkpoints, self.spread_epoch):
            period = gcd(period, epoch)
        return period

    def run_folder(self, variant: str, seed: int) -> Path:
        return self.out / "runs" / f"{variant}-seed{seed}"

    def tasks(self) -> list[Task]:
        """Every task: the full-length pre-trainings first, then those of the other seeds,
        then the evaluations, the random-init baseline first. A worker takes the first
        that is ready (an evaluation waits for its pre-training)."""
        trains = [Task("train", v, 0, self.epochs) for v in VARIANTS]
        trains += [
            Task("train", v, s, self.spread_epoch) for s in range(1, self.seeds) for v in VARIANTS
        ]
        evals = [Task("eval", "random-init", 0, 0)]
        evals += [Task("eval", v, 0, e) for v in VARIANTS for e in self.checkpoints]
        evals += [
            Task("eval", v, s, self.spread_epoch) for s in range(1, self.seeds) for v in VARIANTS
        ]
        return trains + evals


@dataclass(frozen=True)
class Task:
    """A pre-training of ``variant`` at ``seed`` to ``epoch`` ("train"), or the
    evaluation of its checkpoint after ``epoch`` ("eval")."""

    kind: str
    variant: str
    seed: int
    epoch: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.variant}-seed{self.seed}-epoch{self.epoch}"
