"""The checkpoints of a pre-training run: when a save is due, what a checkpoint is called
(:func:`checkpoint_path`, the one name that saving, pruning and resume all use), what it
holds (:meth:`~dsmae.pretrain.state.Run.checkpoint_state`), writing it, and pruning the
old ones.

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
from typing import Any

import torch

from dsmae.checkpoint import save_checkpoint
from dsmae.config import TrainConfig
from dsmae.writes import WriteError, written

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

    def saved(self) -> None:
        """A save was made now: the minutes count from here."""
        self.last_save = time.monotonic()


def write_run_checkpoint(
    path: Path, state: dict[str, Any], run_id: str, last_good: Path | None, keep: int
) -> Path:
    """Write checkpoint ``state`` of run ``run_id`` to ``path`` (a file of another run
    there is moved aside first), then drop this run's periodic checkpoints beyond the
    newest ``keep`` (0: none).

    Raises:
        WriteError: naming ``last_good``, the last good checkpoint, and how to continue.
    """
    try:
        move_aside_if_foreign(path, run_id)
        save_checkpoint(path, state)
    except WriteError as err:
        raise WriteError(
            f"{err}. The last good checkpoint is {last_good or 'none yet'}: free some space "
            "(or fix the folder) and continue with --resume auto."
        ) from None
    prune_checkpoints(path.parent, run_id, keep)
    return path
