"""torchvision's data sets: CIFAR-10, CIFAR-100 and STL-10, read from (or downloaded to)
a data root.

``cifar10`` / ``cifar100``
    torchvision's ``CIFAR10`` / ``CIFAR100`` under ``root``; ``pretrain`` is the train split.
    The arrays are taken as they are (no per-image PIL decoding).
``stl10``
    torchvision's ``STL10`` under ``root``: ``pretrain`` is ``train+unlabeled`` (the 100,000
    unlabelled images have label -1), ``train`` and ``test`` are the labelled splits.

torchvision only downloads when ``download=True``. A missing data set, a failed download or a
corrupted archive raises :class:`DataError` whose message says what to do (``--download``,
``--data-root``, or ``--data`` with a folder of images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dsmae.data.images import DataError, ImageTensors

__all__ = ["TORCHVISION_SETS", "check_present", "open_torchvision_set"]

_PRETTY_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}
# the folder each one extracts to under its root (torchvision's base_folder)
_FOLDERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}

TORCHVISION_SETS: tuple[str, ...] = tuple(_PRETTY_NAMES)
"""The names of torchvision's data sets accepted as ``source``."""


def check_present(name: str, root: Path) -> None:
    """Fail early, without loading anything, if the data set ``name`` is not under ``root``.

    Raises:
        DataError: as :func:`open_torchvision_set` would without ``download``.
    """
    if not (root / _FOLDERS[name]).is_dir():
        raise _not_found(name, root)


def _not_found(name: str, root: Path) -> DataError:
    """The error for the data set ``name`` missing from ``root``."""
    return DataError(f"{_PRETTY_NAMES[name]} was not found under {root}. {_alternatives(root)}")


def _alternatives(root: Path) -> str:
    return (
        f"Add --download to fetch it with torchvision (needs internet), set --data-root to "
        f"where it is (now {root}), or point --data at a folder of images."
    )


def open_torchvision_set(name: str, split: str, root: Path, download: bool) -> ImageTensors:
    """CIFAR-10/100: (N, 3, 32, 32); STL-10: (N, 3, 96, 96); uint8, labels int64."""
    import torchvision.datasets as tvd

    pretty = _PRETTY_NAMES[name]
    try:
        if name == "stl10":
            stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
            ds = tvd.STL10(str(root), split=stl_split, download=download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data))  # (N, 3, 96, 96)
            labels = torch.from_numpy(np.asarray(ds.labels).astype(np.int64))
            classes = getattr(ds, "classes", None)
            if classes is None:  # class_names.txt missing: fall back to numbers
                classes = [str(i) for i in range(int(labels.max().item()) + 1)]
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(str(root), train=split != "test", download=download)
            # .data is (N, 32, 32, 3), a transposed view of the (N, 3, 32, 32) file layout
            images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
            labels = torch.as_tensor(ds.targets, dtype=torch.int64)
            classes = ds.classes
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted", bad checksum
        if download:
            raise DataError(
                f"{pretty} could not be downloaded intact to {root} ({err}). Delete the "
                f"partial files there and retry, set --data-root to where {pretty} already "
                "is, or point --data at a folder of images."
            ) from err
        raise _not_found(name, root) from err
    except OSError as err:  # urllib.error.URLError is an OSError
        if download:
            raise DataError(
                f"Downloading {pretty} to {root} failed ({err}). Check the internet "
                f"connection, set --data-root to where {pretty} already is, or point --data "
                "at a folder of images."
            ) from err
        raise DataError(
            f"{pretty} could not be read from {root} ({err}). {_alternatives(root)}"
        ) from err
    return ImageTensors(images, labels, tuple(str(c) for c in classes))
