"""Every data source behind one entry point: :func:`open_source` loads a whole split of one
into memory as one ``uint8`` tensor.

``source`` is one of :data:`DATASETS` or the path of a folder of images; ``split`` is
``"pretrain"``, ``"train"`` or ``"test"``. The result is an :class:`ImageTensors`: images
``(N, C, H, W)`` ``uint8`` (contiguous), labels ``(N,)`` ``int64`` with ``-1`` for unlabelled
images, and the class names. Each kind of source lives in its own module:

- ``digits``: :mod:`dsmae.data.digits` (scikit-learn's, nothing downloaded);
- ``cifar10``, ``cifar100``, ``stl10``: :mod:`dsmae.data.torchvision_sets` (``size`` is
  ignored for these);
- a folder of images: :mod:`dsmae.data.image_folders` (its layout:
  :mod:`dsmae.data.folder_layout`; decoding: :mod:`dsmae.data.decoding`);
- WebDataset shards: a ``source`` that names tar files (:func:`is_shard_source`) is streamed
  for pre-training by :mod:`dsmae.data.shards` and never loaded whole: :func:`open_source`
  refuses it.

Channels
    ``channels`` is 1 or 3 (anything else: ``ValueError``). Tensors from torchvision and
    digits are converted as :func:`dsmae.data.decoding.convert_channels` says, so a folder and
    a named data set give identical grey pixels.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dsmae.data.decoding import convert_channels
from dsmae.data.digits import open_digits
from dsmae.data.image_folders import open_image_folder
from dsmae.data.images import DataError, ImageTensors
from dsmae.data.torchvision_sets import TORCHVISION_SETS, check_present, open_torchvision_set

__all__ = ["DATASETS", "SPLITS", "check_available", "is_shard_source", "open_source"]

DATASETS: tuple[str, ...] = ("digits", *TORCHVISION_SETS)
"""Names accepted as ``source`` besides a folder path."""

SPLITS: tuple[str, ...] = ("pretrain", "train", "test")
"""Values accepted as ``split``."""

# WebDataset shards: a brace range (shard-{000000..000099}), a tar file, a shell pipe
_BRACE_RANGE = re.compile(r"\{[^{}]*\.\.[^{}]*\}")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def open_source(
    source: str,
    split: str,
    *,
    root: str | Path,
    download: bool = False,
    channels: int = 3,
    size: int | None = None,
    skip_bad: bool = False,
) -> ImageTensors:
    """Load one split of a data set into memory.

    Args:
        source: one of :data:`DATASETS`, or a path to a folder of images.
        split: ``"pretrain"``, ``"train"`` or ``"test"``.
        root: where torchvision data sets live / are downloaded to (unused for digits/folders).
        download: let torchvision download a missing data set (needs internet).
        channels: 1 or 3; images are converted to this many channels.
        size: folders only: resize the shorter side to ``size`` (bilinear, antialiased) and
            centre-crop ``size x size``. ``None`` keeps the native size, which must then be
            the same for all images of the folder. Ignored for named data sets.
        skip_bad: folders only: leave out files that cannot be decoded (counted in a
            warning) instead of raising.

    Returns:
        :class:`ImageTensors` with images (N, channels, H, W) ``uint8`` and labels (N,)
        ``int64``.

    Raises:
        DataError: the data set cannot be loaded (message says what to do).
        ValueError: bad ``split``, ``channels`` or ``size``.
    """
    _check_arguments(split, channels, size)
    if is_shard_source(source):
        raise _stream_only(source, split)
    if source == "digits":
        data = open_digits(split)
    elif source in TORCHVISION_SETS:
        data = open_torchvision_set(source, split, Path(root).expanduser(), download)
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise _unknown_source(source)
        return open_image_folder(folder, split, channels, size, skip_bad)
    return ImageTensors(convert_channels(data.images, channels), data.labels, data.classes)


def _check_arguments(split: str, channels: int, size: int | None) -> None:
    """Refuse a ``split``, ``channels`` or ``size`` that :func:`open_source` cannot serve.

    Raises:
        ValueError: naming the argument and what it may be.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive int or None; got {size!r}")


def is_shard_source(source: str) -> bool:
    """Whether ``source`` names WebDataset shards, to be streamed, rather than a named data
    set or a folder: a brace range (``shards/train-{000000..000099}.tar``), a ``.tar``
    (``.tar.gz``, ``.tgz``) path or URL (``https://host/train-000000.tar?sig=...``), several
    of them joined by ``::``, or a ``pipe:`` command (``pipe:aws s3 cp s3://b/x.tar -``), as
    WebDataset reads them. An existing folder is a folder, whatever its name."""
    if source in DATASETS or os.path.isdir(os.path.expanduser(source)):
        return False
    if source.startswith("pipe:") or _BRACE_RANGE.search(source):
        return True
    parts = source.split("::")
    return all(part.split("?")[0].lower().endswith(_TAR_SUFFIXES) for part in parts)


def _stream_only(source: str, split: str) -> DataError:
    """The error for loading a ``split`` of WebDataset shards into memory."""
    return DataError(
        f"{source!r} names WebDataset shards, which are streamed for pre-training only and "
        f"never loaded whole. The {split} split (linear probe, k-NN, fine-tuning, the k-NN "
        "monitor) needs a named data set or an image folder: pass it with --data."
    )


def _unknown_source(source: str) -> DataError:
    """The error for a ``source`` that is neither a named data set nor a folder."""
    return DataError(
        f"Unknown data set {source!r}: it is neither one of {', '.join(DATASETS)} nor an "
        "existing folder. Pass one of these names or the path to a folder of images."
    )


def check_available(source: str, *, root: str | Path, download: bool = False) -> None:
    """Fail early, without loading anything, if ``source`` cannot be loaded: a folder
    that does not exist, or a torchvision data set absent from ``root`` and not to be
    downloaded.

    Raises:
        DataError: as :func:`open_source` would, naming what is missing.
    """
    if source == "digits" or (source in TORCHVISION_SETS and download):
        return
    if source in TORCHVISION_SETS:
        check_present(source, Path(root).expanduser())
        return
    if not Path(source).expanduser().is_dir():
        raise _unknown_source(source)
