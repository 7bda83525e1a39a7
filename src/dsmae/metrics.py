"""Run metrics: one JSON object per line (``metrics.jsonl``), TensorBoard scalars and
images, and the same for the experiment trackers of the ``log`` section (:mod:`dsmae.loggers`)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from dsmae.config import Config
from dsmae.loggers import close_trackers, open_trackers
from dsmae.writes import append_only, written

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends metric records to ``<folder>/metrics.jsonl`` and mirrors numbers to TensorBoard.

    Each record has a ``step`` key; its other finite numeric values become TensorBoard
    scalars under ``<prefix>/<key>``. The trackers that ``config.log`` turns on (W&B,
    MLflow: :mod:`dsmae.loggers`) get the same scalars and images, and the config. A failed
    write (a full disk, TensorBoard's writer included) raises
    :class:`~dsmae.writes.WriteError` naming the file.

    Args:
        purge_step: a resumed run's first step: TensorBoard hides what an earlier,
            interrupted process logged from there on, and the trackers continue the runs
            of the folder's ``loggers.json``.
        config: the run's resolved config, for the trackers of its ``log`` section; None:
            no trackers.

    Raises:
        ConfigError: a tracker's package is missing, or its run cannot start.
    """

    def __init__(
        self,
        folder: str | Path,
        prefix: str = "pretrain",
        purge_step: int | None = None,
        config: Config | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self._path = self.folder / "metrics.jsonl"
        with written("metrics", self._path):
            self.folder.mkdir(parents=True, exist_ok=True)
        resumed = purge_step is not None
        self._trackers = [] if config is None else open_trackers(config, self.folder, resumed)
        board = self.folder / "tensorboard"
        try:
            self._jsonl = append_only(self._path, "metrics")
            with written("TensorBoard logs", board):
                self._tb = SummaryWriter(log_dir=str(board), purge_step=purge_step)
        except BaseException:
            close_trackers(self._trackers)
            raise

    def write(self, record: dict[str, Any]) -> None:
        with written("metrics", self._path):
            self._jsonl.write(json.dumps(record) + "\n")
        step = int(record["step"])
        scalars = {
            f"{self.prefix}/{key}": value
            for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and math.isfinite(value)
        }
        with written("TensorBoard logs", self.folder / "tensorboard"):
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
        for tracker in self._trackers:
            tracker.scalars(scalars, step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, C) uint8 image to TensorBoard and the trackers under ``<prefix>/<tag>``."""
        name = f"{self.prefix}/{tag}"
        with written("TensorBoard logs", self.folder / "tensorboard"):
            self._tb.add_image(name, image, step, dataformats="HWC")
        for tracker in self._trackers:
            tracker.image(name, image, step)

    def close(self) -> None:
        """Flush and close the files and end the trackers' runs (a second call does nothing)."""
        if self._jsonl.closed:
            return
        with written("metrics", self._path):
            self._jsonl.close()
        with written("TensorBoard logs", self.folder / "tensorboard"):
            self._tb.close()
        close_trackers(self._trackers)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file; a last line cut short (by a kill or a
    full disk while it was written) is left out with a warning.

    Raises:
        ValueError: a line other than the last is not JSON (the file is damaged).
    """
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not JSON: {line[:80]!r}") from None
            log.warning("%s: its last line is cut short; left out", path)
    return records
