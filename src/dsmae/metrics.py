"""Run metrics: one JSON object per line (``metrics.jsonl``) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter


class MetricsLog:
    """Appends metric records to ``<folder>/metrics.jsonl`` and mirrors numbers to TensorBoard.

    Each record has a ``step`` key; its other numeric values become TensorBoard scalars
    under ``<prefix>/<key>``.
    """

    def __init__(self, folder: str | Path, prefix: str = "pretrain") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self._jsonl = open(self.folder / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._tb = SummaryWriter(log_dir=str(self.folder / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(f"{self.prefix}/{key}", value, step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, C) uint8 image to TensorBoard under ``<prefix>/<tag>``."""
        self._tb.add_image(f"{self.prefix}/{tag}", image, step, dataformats="HWC")

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
