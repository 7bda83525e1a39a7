"""What every grid's cells share: a finished pre-training recognised (or refused as made
with other settings), and the wall time it took."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dsmae.config import Config, ConfigError, fill_data_stats

if TYPE_CHECKING:
    from dsmae.checkpoint import Checkpoint


def finished_checkpoint(path: Path, cfg: Config) -> Checkpoint | None:
    """The checkpoint at ``path`` (read) if it is the end of the run ``cfg`` describes;
    None where there is none yet or the run has not ended.

    Raises:
        ConfigError: it was pre-trained with other settings (listed), so its results do
            not belong in this grid.
    """
    from dsmae.checkpoint import Checkpoint
    from dsmae.pretrain.resume import settings_differences

    if not path.is_file():
        return None
    checkpoint = Checkpoint.read(path)
    saved = checkpoint.config
    asked = fill_data_stats(cfg, saved.data.mean, saved.data.std)
    diffs = settings_differences(saved, asked)
    if diffs:
        raise ConfigError(
            f"{path.parent} holds a cell pre-trained with other settings ("
            + "; ".join(diffs)
            + "): give the grid another --results folder, or delete that folder to run the "
            "cell again"
        )
    return checkpoint if checkpoint.state["epoch"] == cfg.train.epochs else None


def pretraining_seconds(metrics: Path, step: int, batch: int) -> float:
    """Wall seconds of pre-training up to ``step``, from a run's ``metrics.jsonl``: each
    line gives the rate since the one before, so the seconds are summed over the lines
    (the line past ``step`` pro rata), and a resumed run counts only the steps it kept.
    Monitors and saves are not in it."""
    seconds, previous = 0.0, 0
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "img_per_s" in record:
            steps = min(record["step"], step) - previous
            seconds += max(steps, 0) * batch / record["img_per_s"]
        previous = max(previous, record["step"])
        if previous >= step:
            break
    return seconds
