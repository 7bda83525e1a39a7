"""Run metrics: one JSON object per line (``metrics.jsonl``) and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from dsmae.writes import written

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends metric records to ``<folder>/metrics.jsonl`` and mirrors numbers to TensorBoard.

    Each record has a ``step`` key; its other numeric values become TensorBoard scalars
    under ``<prefix>/<key>``. A failed write (a full disk, TensorBoard's writer included)
    raises :class:`~dsmae.writes.WriteError` naming the file.

    Args:
        purge_step: a resumed run's first step: TensorBoard hides what an earlier,
            interrupted process logged from there on.
    """

    def __init__(
        self, folder: str | Path, prefix: str = "pretrain", purge_step: int | None = None
    ) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self._path = self.folder / "metrics.jsonl"
        with written("metrics", self._path):
            self.folder.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self._path, "a", buffering=1)  # noqa: SIM115
        board = self.folder / "tensorboard"
        with written("TensorBoard logs", board):
            self._tb = SummaryWriter(log_dir=str(board), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        with written("metrics", self._path):
            self._jsonl.write(json.dumps(record) + "\n")
        step = int(record["step"])
        with written("TensorBoard logs", self.folder / "tensorboard"):
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{self.prefix}/{key}", value, step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, C) uint8 image to TensorBoard under ``<prefix>/<tag>``."""
        with written("TensorBoard logs", self.folder / "tensorboard"):
            self._tb.add_image(f"{self.prefix}/{tag}", image, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close both (a second call does nothing)."""
        if self._jsonl.closed:
            return
        with written("metrics", self._path):
            self._jsonl.close()
        with written("TensorBoard logs", self.folder / "tensorboard"):
            self._tb.close()

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
