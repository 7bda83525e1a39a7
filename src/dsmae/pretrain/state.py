"""The state of one pre-training run in this process: its config, data, model, step,
where it stands, and the objects that watch and save it."""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsmae import distributed
from dsmae.config import Config
from dsmae.data.shards import ShardStream
from dsmae.models import PretrainModel
from dsmae.pretrain.divergence import StepHealth
from dsmae.pretrain.monitor import Monitor
from dsmae.pretrain.resume import ResumePoint
from dsmae.pretrain.run_folder import FolderLock
from dsmae.pretrain.saving import Checkpointer, write_run_checkpoint
from dsmae.pretrain.schedule import Schedule
from dsmae.pretrain.step import Batches, PretrainStep, Taken


def images_per_epoch(cfg: Config, images: torch.Tensor, stream: ShardStream | None) -> int:
    """The images of one epoch: the data set's (``images``), or ``data.samples_per_epoch``
    of a stream."""
    per_epoch = cfg.data.samples_per_epoch
    return len(images) if stream is None or per_epoch is None else per_epoch


@dataclass
class PretrainResult:
    """Where a pre-training run left its outputs, and its last logged metrics."""

    out: Path
    checkpoint: Path
    config: Config
    last_metrics: dict[str, Any]
    seconds: float
    stop_requested: str | None = None  # a stop signal that came while the run was ending


@dataclass
class Run:
    """A pre-training run, from where it starts (``start``) to where it stands (``step``)."""

    cfg: Config
    proc: distributed.Process
    device: torch.device
    images: torch.Tensor  # (N, C, H, W) uint8, the pre-training split (a stream: a few of it)
    batches: Batches  # this process's images of each step
    model: PretrainModel
    optimizer: torch.optim.Optimizer
    take_step: PretrainStep
    flops_per_image: float
    compiled: bool
    run_id: str  # this run's, recorded in its checkpoints ("" on ranks that write nothing)
    start: dataclasses.InitVar[ResumePoint]  # sets resumed, step and last_checkpoint
    stream: ShardStream | None = None  # where the images come from, for a source of shards
    lock: FolderLock | None = None  # the output folder's lock (rank 0)
    monitor: Monitor | None = None  # made early where a time budget timed it (rank 0)
    last: dict[str, Any] = dataclasses.field(default_factory=dict)  # last metrics line
    resumed: bool = dataclasses.field(init=False)
    step: int = dataclasses.field(init=False)  # the steps taken
    last_checkpoint: Path | None = dataclasses.field(init=False)  # newest written or resumed
    health: StepHealth = dataclasses.field(init=False)
    checkpointer: Checkpointer = dataclasses.field(init=False)

    def __post_init__(self, start: ResumePoint) -> None:
        self.resumed = start.state is not None
        self.step = start.step
        self.last_checkpoint = start.path
        self.health = StepHealth(self.device)
        self.checkpointer = Checkpointer(self.cfg.train)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def epoch_images(self) -> int:
        return images_per_epoch(self.cfg, self.images, self.stream)

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_images // self.cfg.train.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    def set_epochs(self, epochs: int) -> None:
        """Make this a run of ``epochs`` epochs (a time budget's): the config, and the
        schedules and saves that follow from it."""
        train = dataclasses.replace(self.cfg.train, epochs=epochs)
        self.cfg = dataclasses.replace(self.cfg, train=train)
        schedule = Schedule(train, self.steps_per_epoch)
        self.take_step = dataclasses.replace(self.take_step, cfg=self.cfg, schedule=schedule)
        self.checkpointer.train = train

    def save(self, path: Path) -> Path:
        """Write this run's checkpoint to ``path`` (rank 0 only; the others just note the
        save) and drop periodic ones beyond ``train.keep_checkpoints``
        (:func:`~dsmae.pretrain.saving.write_run_checkpoint`).

        Raises:
            WriteError: naming the last good checkpoint and how to continue.
        """
        self.checkpointer.saved()
        if not self.proc.is_main:
            return path
        keep = self.cfg.train.keep_checkpoints
        write_run_checkpoint(path, self.checkpoint_state(), self.run_id, self.last_checkpoint, keep)
        self.last_checkpoint = path
        return path

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds: the config, the model (student, teacher, heads), the
        optimizer, the step and epoch, the run id, and a stream's layout."""
        state = {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "run_id": self.run_id,
        }
        if self.stream is not None:
            state["stream"] = self.stream.layout
        return state

    def steps(self, first: int, stop: int) -> Generator[Taken, None, None]:
        """Take the steps ``first`` to ``stop - 1`` one by one, each when the next is asked
        for (its epoch's batches opened at the epoch's first step), counting the skipped
        ones in :attr:`health`. Closing this closes the batches (a stream's readers)."""
        batches: Generator[torch.Tensor, None, None] | None = None
        try:
            for step in range(first, stop):
                epoch, in_epoch = divmod(step, self.steps_per_epoch)
                if batches is None or in_epoch == 0:
                    _close(batches)
                    batches = self.batches.epoch(epoch, in_epoch, self.steps_per_epoch)
                taken = self.take_step(step, next(batches))
                self.health.record(taken.finite)
                yield taken
        finally:
            _close(batches)


def _close(batches: Generator[torch.Tensor, None, None] | None) -> None:
    """Close an epoch's batches (None: none yet)."""
    if batches is not None:
        batches.close()
