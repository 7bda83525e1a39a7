"""scikit-learn's digits, the data set that needs nothing downloaded.

``load_digits()`` holds 1,797 real 8x8 grey images (values 0..16, stored as
``round(v * 255 / 16)``). A fixed permutation (``numpy.random.default_rng(0)``) puts 75 %
(1,348 images) in ``train`` and 25 % (449) in ``test``; ``pretrain`` is the train split, so
the test images are never seen in pre-training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from dsmae.data.images import ImageTensors

__all__ = ["open_digits"]

_TRAIN_FRACTION = 0.75
_SEED = 0
_CLASSES = tuple(str(digit) for digit in range(10))
_SHIPPED_TABLE = Path("datasets", "data", "digits.csv.gz")  # inside scikit-learn's package


def digits_table() -> np.ndarray:
    """scikit-learn's digits as one (1797, 65) float64 table: per image, its 64 pixels
    (row by row, values 0..16), then its label, as ``load_digits`` reads them.

    Read straight from the ``digits.csv.gz`` that scikit-learn ships, without importing
    scikit-learn: its import takes about a second, 2% of the quickstart's pre-training.
    Through ``load_digits`` where that file is not where scikit-learn keeps it.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    for folder in (spec and spec.submodule_search_locations) or ():
        shipped = Path(folder) / _SHIPPED_TABLE
        if shipped.is_file():
            return np.loadtxt(shipped, delimiter=",")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.column_stack([bunch.data, bunch.target])


def open_digits(split: str) -> ImageTensors:
    """scikit-learn digits: images (N, 1, 8, 8) uint8, N = 1348 (train/pretrain) or 449 (test)."""
    table = digits_table()
    raw = table[:, :-1].reshape(-1, 8, 8)  # (1797, 8, 8), values 0..16
    pixels = np.rint(raw * 255.0 / 16.0).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    targets = table[:, -1].astype(np.int64)

    n = pixels.shape[0]
    perm = np.random.default_rng(_SEED).permutation(n)
    n_train = round(n * _TRAIN_FRACTION)
    chosen = perm[n_train:] if split == "test" else perm[:n_train]
    idx = np.sort(chosen)
    return ImageTensors(
        images=torch.from_numpy(np.ascontiguousarray(pixels[idx])),
        labels=torch.from_numpy(targets[idx]),
        classes=_CLASSES,
    )
