"""Writing an image folder as WebDataset shards (``dsmae shards FOLDER OUT --shard-size N``),
for :mod:`dsmae.data.shards` to stream. Only the standard library writes them: the tar
files need no webdataset package."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsmae.config import ConfigError
from dsmae.data.folder_layout import find_image_files, folder_class, folder_classes, split_folders
from dsmae.data.images import DataError
from dsmae.writes import atomic_write_bytes, written

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{:06d}.tar"
KEY_DIGITS = 9  # sample keys 000000000, 000000001, ...


@dataclass(frozen=True)
class WrittenShards:
    """What :func:`write_shards` wrote."""

    pattern: str  # the shards, as --data takes them: OUT/shard-{000000..000041}.tar
    shards: int
    images: int
    classes: tuple[str, ...]  # the names of the labels 0, 1, ...; () when unlabelled


def write_shards(
    folder: str | Path, out: str | Path, shard_size: int, *, seed: int = 0, overwrite: bool = False
) -> WrittenShards:
    """Write the images that ``--data FOLDER`` pre-trains on (its ``train/`` split, where it
    has one) as WebDataset shards ``OUT/shard-000000.tar``, ... of ``shard_size`` images each
    (the last one may hold fewer).

    A sample is one image file, its bytes as they are (``KEY.jpg``, ``KEY.png``, ...), with,
    when the images sit in class sub-folders, its label ``KEY.cls`` (the index of its class
    in the sorted class names, as ``--data FOLDER`` numbers them); keys are ``000000000``,
    ``000000001``, ... in the order written. That order is a random permutation seeded by
    ``seed``: a stream's shuffle buffer only mixes neighbouring samples, so shards written
    class by class would give batches of few classes. The same folder and seed give the
    same bytes (no time stamps, no owners), each shard written atomically.

    Raises:
        ConfigError: ``shard_size`` < 1, ``out`` is a file, or it holds shards already
            (unless ``overwrite``).
        DataError: ``folder`` is not a folder, holds no image, or a file cannot be read.
        WriteError: a shard could not be written (nothing half-written is left).
    """
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    split, all_splits = split_folders(folder, "pretrain")
    paths = find_image_files(split)
    labels, classes = _labels(paths, split, all_splits)
    _check_out(out, overwrite)
    order = np.random.default_rng(seed).permutation(len(paths))
    count = -(-len(paths) // shard_size)
    with tqdm(total=len(paths), unit="img", desc=f"writing {out}", disable=None) as bar:
        for s in range(count):
            picked = order[s * shard_size : (s + 1) * shard_size].tolist()
            first = s * shard_size
            entries = [(first + j, paths[i], labels[i]) for j, i in enumerate(picked)]
            atomic_write_bytes(out / SHARD_NAME.format(s), _tar(entries), "shard")
            bar.update(len(picked))
    _remove_beyond(out, count)
    last = f"{{{0:06d}..{count - 1:06d}}}" if count > 1 else f"{0:06d}"
    pattern = os.path.join(str(out), f"shard-{last}.tar")
    log.info("%s: %d images in %d shards", pattern, len(paths), count)
    return WrittenShards(pattern, count, len(paths), classes)


def _labels(
    paths: Sequence[Path], split: Path, all_splits: Sequence[Path]
) -> tuple[list[int | None], tuple[str, ...]]:
    """The label of each image (None for all when some image sits outside a class
    sub-folder of ``split``) and the class names, as image folders number them."""
    class_of = [folder_class(p, split) for p in paths]
    if None in class_of:
        return [None] * len(paths), ()
    classes = folder_classes(all_splits)
    index = {c: i for i, c in enumerate(classes)}
    return [index[c] for c in class_of if c is not None], classes


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or that holds shards already unless ``overwrite``;
    create it.

    Raises:
        ConfigError: naming OUT.
        WriteError: it cannot be created.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {out} is a file; give a folder to write the shards into")
    held = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if held and not overwrite:
        raise ConfigError(
            f"{out} holds {len(held)} shard(s) already ({held[0].name}, ...): pick another "
            "OUT, or pass --overwrite to replace them"
        )
    with written("shards", out):
        out.mkdir(parents=True, exist_ok=True)


def _tar(entries: Sequence[tuple[int, Path, int | None]]) -> bytes:
    """One shard: for each (index, image file, label) the file's bytes as ``KEY.EXT`` and
    the label as ``KEY.cls``, with fixed metadata so that the bytes are reproducible.

    Raises:
        DataError: an image file cannot be read.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for index, path, label in entries:
            key = f"{index:0{KEY_DIGITS}d}"
            try:
                data = path.read_bytes()
            except OSError as err:
                raise DataError(f"Cannot read image {path}: {err.strerror}") from None
            _add(tar, f"{key}{path.suffix.lower()}", data)
            if label is not None:
                _add(tar, f"{key}.cls", str(label).encode())
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add the file ``name`` holding ``data``: mode 0644, time 0, owner root, no names."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _remove_beyond(out: Path, count: int) -> None:
    """Remove the shards of an earlier write numbered ``count`` or more (``--overwrite``)."""
    keep = {SHARD_NAME.format(s) for s in range(count)}
    for old in out.glob("shard-*.tar"):
        if old.name not in keep:
            with written("shards", old):
                old.unlink()
