"""How an image folder is laid out: its image files, its split folders and its classes.

Files
    Images are found recursively (``.jpg .jpeg .png .bmp .gif .tif .tiff .webp``, any case;
    hidden files and folders, whose names start with ``.``, are skipped) and sorted by path
    (:func:`find_image_files`).

Splits
    If the folder has a ``train/`` sub-folder, ``train`` and ``pretrain`` read ``train/`` and
    ``test`` reads ``test/`` (or ``val/`` when there is no ``test/``); without either, asking
    for ``test`` raises :class:`DataError`. Otherwise the whole folder is the
    ``pretrain``/``train`` split and ``test`` raises :class:`DataError` explaining the layout
    (:func:`split_folders`).

Classes
    Within a split folder, if every image sits inside a first-level sub-folder, those
    sub-folders are classes: label = index in the sorted class names. The class names are the
    union over ``train/`` and ``test/`` (``val/``) so both splits share one numbering
    (:func:`folder_classes`). Otherwise all labels are -1 and there are no classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from dsmae.data.images import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "find_image_files",
    "folder_class",
    "folder_classes",
    "split_folders",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
"""File suffixes (lower case) read from folders."""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, following links once, hidden ones
    skipped), sorted.

    Only regular files count (after resolving links): a FIFO, socket or device named like
    an image would block or fail its reader, so each is named in a warning and skipped,
    as are links to nothing.

    Raises:
        DataError: not a folder, or no image in it.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    found: list[Path] = []
    odd: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if _is_image(name):
                path = Path(dirpath, name)
                (found if path.is_file() else odd).append(path)  # is_file follows links
    if odd:
        logger.warning(
            "skipped %d path(s) named like images that are not regular files (FIFOs, "
            "sockets, devices or broken links): %s",
            len(odd),
            ", ".join(repr(str(p)) for p in odd[:5]) + (" ..." if len(odd) > 5 else ""),
        )
    if not found:
        raise _no_images(folder)
    return sorted(found)


def _no_images(folder: Path) -> DataError:
    """The error for a folder without image files."""
    return DataError(
        f"No images found in {folder} (looked recursively for "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))} files)."
    )


def folder_class(path: Path, folder: Path) -> str | None:
    """Name of the first-level sub-folder of ``folder`` holding ``path``; None if at top."""
    parts = path.relative_to(folder).parts
    return parts[0] if len(parts) > 1 else None


def split_folders(folder: Path, split: str) -> tuple[Path, list[Path]]:
    """The folder to read for ``split`` and the folders of all splits (for class names)."""
    train = folder / "train"
    held_out = next((folder / n for n in ("test", "val") if (folder / n).is_dir()), None)
    if train.is_dir():
        all_splits = [train] if held_out is None else [train, held_out]
        if split != "test":
            return train, all_splits
        if held_out is None:
            raise DataError(
                f"{folder} has a train/ folder but no test/ or val/ folder, so it has no test "
                "split. Add a test/ (or val/) folder next to train/."
            )
        return held_out, all_splits
    if split == "test":
        raise DataError(
            f"{folder} has no test split. A folder with a test split must contain train/ and "
            "test/ (or val/) sub-folders, each holding images (optionally in one sub-folder "
            "per class); a folder without them is used whole for pre-training and training."
        )
    return folder, [folder]


def folder_classes(split_dirs: Sequence[Path]) -> tuple[str, ...]:
    """Sorted union of class folder names over the class-structured split folders."""
    names: set[str] = set()
    for d in split_dirs:
        try:
            classes = [folder_class(p, d) for p in find_image_files(d)]
        except DataError:  # a split folder without images names no classes
            continue
        if None not in classes:
            names.update(c for c in classes if c is not None)
    return tuple(sorted(names))
