"""The checkpoints of a pre-training run: when a save is due, what a checkpoint is called
(:func:`checkpoint_path`, the one name that saving, pruning and resume all use), what it
holds, pruning the old ones, and the save that ends a run stopped by a signal.

A run saves ``checkpoint-NNNNNNNN.pt`` (its step, 8 digits) every
``train.checkpoint_every`` epochs and every ``train.checkpoint_minutes``, keeps the newest
``train.keep_checkpoints`` of them, and writes ``last.pt`` at its end. A file of another
run at the path about to be written is moved aside, never replaced.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsmae import distributed
from dsmae.checkpoint import save_checkpoint
from dsmae.config import TrainConfig
from dsmae.preemption import Preempted, StopSignals
from dsmae.writes import WriteError, written

if TYPE_CHECKING:
    from dsmae.metrics import MetricsLog
    from dsmae.pretrain.state import Run

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt")


def checkpoint_path(out: Path, step: int) -> Path:
    """The periodic checkpoint of ``out`` after ``step`` steps: ``checkpoint-NNNNNNNN.pt``."""
    return out / f"checkpoint-{step:08d}.pt"


def checkpoint_step(path: Path) -> int | None:
    """The step in a periodic checkpoint's name (:func:`checkpoint_path`); None for any
    other file (``last.pt``, a file moved aside)."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoints_in(out: Path) -> list[tuple[int, Path]]:
    """The periodic checkpoints of ``out`` as (step, path), oldest first."""
    found = [(checkpoint_step(p), p) for p in out.glob("checkpoint-*.pt")]
    return sorted((step, p) for step, p in found if step is not None)


def checkpoint_run_id(path: Path) -> str | None:
    """The run id stored in a checkpoint, read without loading its tensors (memory-mapped);
    None when it has none or cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable file belongs to nobody; resume reports it
        return None
    return state.get("run_id") if isinstance(state, dict) else None


def move_aside_if_foreign(path: Path, run_id: str) -> Path | None:
    """Before this run (``run_id``) writes ``path``: where a file of another run (or of
    none known) is there, rename it to ``<stem>.run-<its id>.pt`` (a name that resume and
    pruning never take for a checkpoint of theirs), so that it is never replaced. Returns
    where it went; None when there was nothing to move.

    Raises:
        WriteError: it could not be renamed (then nothing is written over it).
    """
    if not path.exists():
        return None
    owner = checkpoint_run_id(path)
    if owner == run_id:
        return None
    label = owner or "unknown"
    aside = path.with_name(f"{path.stem}.run-{label}{path.suffix}")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.stem}.run-{label}-{number}{path.suffix}")
    with written("checkpoint", path):
        path.rename(aside)
    log.warning("%s belongs to another run (%s): moved aside to %s", path, label, aside.name)
    return aside


def prune_checkpoints(out: Path, run_id: str, keep: int) -> list[Path]:
    """Delete this run's periodic checkpoints beyond the newest ``keep`` (0: keep all);
    other runs' are never touched. Returns the deleted paths."""
    if not keep:
        return []
    mine = [p for _, p in checkpoints_in(out) if checkpoint_run_id(p) == run_id]
    doomed = mine[: max(len(mine) - keep, 0)]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


class Checkpointer:
    """Decides when a periodic save is due (``train.checkpoint_every`` epochs,
    ``train.checkpoint_minutes``) and writes the run's checkpoints (rank 0)."""

    def __init__(self, train: TrainConfig) -> None:
        self.train = train
        self.last_save = time.monotonic()

    def _minutes_passed(self) -> bool:
        minutes = self.train.checkpoint_minutes
        return bool(minutes) and time.monotonic() - self.last_save > 60 * minutes

    def due_mid_epoch(self) -> bool:
        """Within an epoch: ``train.checkpoint_minutes`` have passed since the last save."""
        return self._minutes_passed()

    def due_after_epoch(self, done: int) -> bool:
        """After epoch ``done`` (1-based) but the last, whose save is ``last.pt``."""
        every = self.train.checkpoint_every
        due = (bool(every) and done % every == 0) or self._minutes_passed()
        return due and done < self.train.epochs

    def save(self, run: Run, path: Path) -> Path:
        """Write ``run``'s checkpoint to ``path`` (rank 0 only) and drop periodic ones
        beyond ``train.keep_checkpoints``.

        Raises:
            WriteError: naming the last good checkpoint and how to continue.
        """
        self.last_save = time.monotonic()
        if not run.proc.is_main:
            return path
        try:
            move_aside_if_foreign(path, run.run_id)
            save_checkpoint(path, checkpoint_state(run))
        except WriteError as err:
            raise WriteError(
                f"{err}. The last good checkpoint is {run.last_checkpoint or 'none yet'}: free "
                "some space (or fix the folder) and continue with --resume auto."
            ) from None
        run.last_checkpoint = path
        prune_checkpoints(run.out, run.run_id, self.train.keep_checkpoints)
        return path


def checkpoint_state(run: Run) -> dict[str, Any]:
    """What a checkpoint holds: the config, the model (student, teacher, heads), the
    optimizer, the step and epoch, the run id, and a stream's layout."""
    state = {
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "step": run.step,
        "epoch": run.step // run.steps_per_epoch,
        "run_id": run.run_id,
    }
    if run.stream is not None:
        state["stream"] = run.stream.layout
    return state


def stop_requested(run: Run, signals: StopSignals) -> str | None:
    """The signal to stop on after this step, if any. Under torchrun the processes agree
    (one all-reduce every ``train.log_every`` steps), so they all stop at the same step."""
    if not run.proc.distributed:
        return signals.received
    if run.step % run.cfg.train.log_every:
        return None
    if distributed.any_process(signals.received is not None, run.proc, run.device):
        return signals.received or "a signal to another process"
    return None


def stop(run: Run, signal_name: str, metrics: MetricsLog | None) -> None:
    """Save a checkpoint at this step boundary and raise :class:`Preempted`."""
    path = run.checkpointer.save(run, checkpoint_path(run.out, run.step))
    if metrics is not None:
        metrics.close()
    distributed.barrier(run.proc)
    error = Preempted(signal_name, run.step, str(path))
    log.warning("%s", error)
    raise error
