"""A folder of image files as a data source: one split of it decoded whole into memory.

Which files are the split's and what their labels are follows the folder's layout
(:mod:`dsmae.data.folder_layout`: ``train/`` and ``test/`` or ``val/`` sub-folders, one
sub-folder per class); the files are decoded, resized and centre-cropped as
:mod:`dsmae.data.decoding` says. A folder without images raises :class:`DataError` naming
the folder; an unreadable file raises :class:`DataError` naming it, unless ``skip_bad``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dsmae.data.decoding import decode_files
from dsmae.data.folder_layout import find_image_files, folder_class, folder_classes, split_folders
from dsmae.data.images import ImageTensors

__all__ = ["open_image_folder"]

logger = logging.getLogger(__name__)


def open_image_folder(
    folder: Path, split: str, channels: int, size: int | None, skip_bad: bool = False
) -> ImageTensors:
    """Decode one split of a folder: images (N, channels, H, W) uint8, labels (N,) int64.

    With ``skip_bad``, unreadable files are left out, counted and named in a warning."""
    split_dir, all_splits = split_folders(folder, split)
    paths = find_image_files(split_dir)

    class_of = [folder_class(p, split_dir) for p in paths]
    if None in class_of:
        classes: tuple[str, ...] = ()
        labels = torch.full((len(paths),), -1, dtype=torch.int64)
    else:
        classes = folder_classes(all_splits)
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[c] for c in class_of if c is not None], dtype=torch.int64)
    logger.info(
        "%s (%s split): %d images, %s",
        split_dir,
        split,
        len(paths),
        f"{len(classes)} classes" if classes else "unlabelled",
    )

    images, kept = decode_files(paths, channels=channels, size=size, skip_bad=skip_bad)
    return ImageTensors(images, labels[kept] if len(kept) < len(paths) else labels, classes)
