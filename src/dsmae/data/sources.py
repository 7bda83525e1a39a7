"""Load a whole image data set into memory as one ``uint8`` tensor.

:func:`load_images` is the single entry point. ``source`` is one of :data:`DATASETS` or the
path of a folder of images; ``split`` is ``"pretrain"``, ``"train"`` or ``"test"``. The result
is an :class:`ImageTensors`: images ``(N, C, H, W)`` ``uint8`` (contiguous), labels ``(N,)``
``int64`` with ``-1`` for unlabelled images, and the class names.

Named data sets
    ``digits``
        scikit-learn's ``load_digits()``: 1,797 real 8x8 grey images (values 0..16, stored
        as ``round(v * 255 / 16)``). A fixed permutation (``numpy.random.default_rng(0)``)
        puts 75 % (1,348 images) in ``train`` and 25 % (449) in ``test``; ``pretrain`` is the
        train split, so the test images are never seen in pre-training. Nothing is downloaded.
    ``cifar10`` / ``cifar100``
        torchvision's ``CIFAR10`` / ``CIFAR100`` under ``root``; ``pretrain`` is the train
        split. The arrays are taken as they are (no per-image PIL decoding).
    ``stl10``
        torchvision's ``STL10`` under ``root``: ``pretrain`` is ``train+unlabeled`` (the
        100,000 unlabelled images have label -1), ``train`` and ``test`` are the labelled splits.

    torchvision only downloads when ``download=True``. A missing data set, a failed download or
    a corrupted archive raises :class:`DataError` whose message says what to do (``--download``,
    ``--data-root``, or ``--data`` with a folder of images). ``size`` is ignored for these.

Folders
    Images are found recursively (``.jpg .jpeg .png .bmp .gif .tif .tiff .webp``, any case;
    hidden files and folders, whose names start with ``.``, are skipped) and sorted by path.

    * If the folder has a ``train/`` sub-folder, ``train`` and ``pretrain`` read ``train/`` and
      ``test`` reads ``test/`` (or ``val/`` when there is no ``test/``); without either, asking
      for ``test`` raises :class:`DataError`.
    * Otherwise the whole folder is the ``pretrain``/``train`` split and ``test`` raises
      :class:`DataError` explaining the layout.
    * Within a split folder, if every image sits inside a first-level sub-folder, those
      sub-folders are classes: label = index in the sorted class names. The class names are
      the union over ``train/`` and ``test/`` (``val/``) so both splits share one numbering.
      Otherwise all labels are -1 and ``classes`` is ``()``.

    Images are decoded with PIL (``convert("RGB")`` or ``convert("L")``) in a thread pool with
    a tqdm progress bar. With ``size``, the shorter side is resized to ``size`` (bilinear,
    antialiased, as torchvision's ``Resize(size)`` on PIL images) and the centre
    ``size x size`` is cropped (as ``CenterCrop(size)``). With ``size=None`` every image must
    have the same size, else :class:`DataError`. An unreadable file raises :class:`DataError`
    naming it; a folder without images raises :class:`DataError` naming the folder.

Channels
    ``channels`` is 1 or 3 (anything else: ``ValueError``). For tensors from torchvision and
    digits, 3 -> 1 uses the ITU-R 601-2 luma weights (0.299, 0.587, 0.114) with the same
    rounding as PIL's ``convert("L")`` (so a folder and a named data set give identical grey
    pixels), and 1 -> 3 repeats the channel.

WebDataset shards
    A ``source`` that names tar files (:func:`is_shard_source`) is streamed for pre-training
    by :mod:`dsmae.data.shards` and never loaded whole: :func:`load_images` refuses it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

__all__ = [
    "DATASETS",
    "SPLITS",
    "DataError",
    "ImageTensors",
    "decode_files",
    "find_image_files",
    "is_shard_source",
    "load_images",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "stl10")
"""Names accepted as ``source`` besides a folder path."""

SPLITS: tuple[str, ...] = ("pretrain", "train", "test")
"""Values accepted as ``split``."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
"""File suffixes (lower case) read from folders."""

_DIGITS_TRAIN_FRACTION = 0.75
_DIGITS_SEED = 0

_TORCHVISION_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}
# the folder each one extracts to under its root (torchvision's base_folder)
_TORCHVISION_FOLDERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}

# PIL's fixed-point ITU-R 601-2 luma weights (sum 65536): L = (R*299 + G*587 + B*114) / 1000.
_LUMA_FIXED = (19595, 38470, 7471)
# WebDataset shards: a brace range (shard-{000000..000099}), a tar file, a shell pipe
_BRACE_RANGE = re.compile(r"\{[^{}]*\.\.[^{}]*\}")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

_LUMA_CHUNK = 4096  # images per chunk when converting to grey (bounds temporary memory)
_DECODE_CHUNK = 32  # files per thread-pool task


class DataError(Exception):
    """A data set cannot be loaded; the message says what to do (no traceback shown to users)."""


@dataclass(frozen=True)
class ImageTensors:
    """A whole split in memory.

    Attributes:
        images: (N, C, H, W) ``uint8``, contiguous.
        labels: (N,) ``int64``; -1 where an image has no label.
        classes: class names, index = label; ``()`` when unlabelled.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} "
                f"{self.images.dtype}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be ({self.images.shape[0]},) int64, got "
                f"{tuple(self.labels.shape)} {self.labels.dtype}"
            )

    def __len__(self) -> int:
        """Number of images N."""
        return int(self.images.shape[0])


def load_images(
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
        data = _load_digits(split)
    elif source in _TORCHVISION_NAMES:
        data = _load_torchvision(source, split, Path(root).expanduser(), download)
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise _unknown_source(source)
        return _load_folder(folder, split, channels, size, skip_bad)
    return ImageTensors(_convert_channels(data.images, channels), data.labels, data.classes)


def _check_arguments(split: str, channels: int, size: int | None) -> None:
    """Refuse a ``split``, ``channels`` or ``size`` that :func:`load_images` cannot serve.

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


def no_images(folder: Path) -> DataError:
    """The error for a folder without image files."""
    return DataError(
        f"No images found in {folder} (looked recursively for "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))} files)."
    )


def check_available(source: str, *, root: str | Path, download: bool = False) -> None:
    """Fail early, without loading anything, if ``source`` cannot be loaded: a folder
    that does not exist, or a torchvision data set absent from ``root`` and not to be
    downloaded.

    Raises:
        DataError: as :func:`load_images` would, naming what is missing.
    """
    if source == "digits" or (source in _TORCHVISION_NAMES and download):
        return
    if source in _TORCHVISION_NAMES:
        root = Path(root).expanduser()
        if not (root / _TORCHVISION_FOLDERS[source]).is_dir():
            pretty = _TORCHVISION_NAMES[source]
            raise DataError(f"{pretty} was not found under {root}. {_alternatives(root)}")
        return
    if not Path(source).expanduser().is_dir():
        raise _unknown_source(source)


# --------------------------------------------------------------------------------------------
# channel conversion


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) uint8 with C in {1, 3} -> (N, channels, H, W) uint8, contiguous."""
    c = images.shape[1]
    if c == channels:
        return images.contiguous()
    if c == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:
        return _to_grey(images)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def _to_grey(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB -> (N, 1, H, W) uint8 luma, rounded exactly as PIL's ``"L"``."""
    n, _, h, w = images.shape
    out = torch.empty((n, 1, h, w), dtype=torch.uint8)
    wr, wg, wb = _LUMA_FIXED
    for start in range(0, n, _LUMA_CHUNK):
        x = images[start : start + _LUMA_CHUNK].to(torch.int32)
        y = (x[:, 0:1] * wr + x[:, 1:2] * wg + x[:, 2:3] * wb + (1 << 15)) >> 16
        out[start : start + _LUMA_CHUNK] = y.to(torch.uint8)
    return out


# --------------------------------------------------------------------------------------------
# digits


def _load_digits(split: str) -> ImageTensors:
    """scikit-learn digits: images (N, 1, 8, 8) uint8, N = 1348 (train/pretrain) or 449 (test)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    pixels = np.rint(raw * 255.0 / 16.0).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    targets = np.asarray(bunch.target, dtype=np.int64)

    n = pixels.shape[0]
    perm = np.random.default_rng(_DIGITS_SEED).permutation(n)
    n_train = round(n * _DIGITS_TRAIN_FRACTION)
    chosen = perm[n_train:] if split == "test" else perm[:n_train]
    idx = np.sort(chosen)
    return ImageTensors(
        images=torch.from_numpy(np.ascontiguousarray(pixels[idx])),
        labels=torch.from_numpy(targets[idx]),
        classes=tuple(str(c) for c in bunch.target_names),
    )


# --------------------------------------------------------------------------------------------
# torchvision data sets


def _alternatives(root: Path) -> str:
    return (
        f"Add --download to fetch it with torchvision (needs internet), set --data-root to "
        f"where it is (now {root}), or point --data at a folder of images."
    )


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> ImageTensors:
    """CIFAR-10/100: (N, 3, 32, 32); STL-10: (N, 3, 96, 96); uint8, labels int64."""
    import torchvision.datasets as tvd

    pretty = _TORCHVISION_NAMES[name]
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
        raise DataError(f"{pretty} was not found under {root}. {_alternatives(root)}") from err
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


# --------------------------------------------------------------------------------------------
# folders


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive, following links once), sorted.

    Only regular files count (after resolving links): a FIFO, socket or device named like
    an image would block or fail its reader, so each is named in a warning and skipped,
    as are links to nothing.
    """
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
    return sorted(found)


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
        classes = [folder_class(p, d) for p in find_images(d)]
        if classes and None not in classes:
            names.update(c for c in classes if c is not None)
    return tuple(sorted(names))


def resize_centre_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side -> ``size`` (bilinear, antialiased), then the centre ``size x size``.

    Same arithmetic as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grey (16-bit ``I;16*``, 32-bit ``I``, float ``F``) -> 8-bit ``L``,
    scaled to the full range (PIL's own ``convert`` would clip everything above 255).

    16-bit images use 0..65535; ``I`` uses 0..65535 when any value exceeds 255 (else it
    is already 8-bit); ``F`` uses 0..1 when no value exceeds 1, else 0..255.
    """
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    peak = arr.max(initial=0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        top = 65535.0
    elif img.mode == "F" and peak <= 1:
        top = 1.0
    else:
        top = 255.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def image_array(img: Image.Image, mode: str, size: int | None) -> np.ndarray:
    """A PIL image in any mode (grey, palette, RGBA, CMYK, 16-bit; alpha is dropped) as
    image folders, shards and ``extract_features`` hold it: converted to ``mode`` ("L" or
    "RGB"), its shorter side resized to ``size`` and the centre cropped (``size`` None:
    as it is). Returns a writable (C, H, W) uint8 array."""
    img = to_8bit(img).convert(mode)
    if size is not None:
        img = resize_centre_crop(img, size)
    arr = np.array(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode(path: Path, mode: str, size: int | None) -> np.ndarray:
    """One file -> (C, H, W) uint8 array (:func:`image_array`)."""
    if not path.is_file():  # a FIFO or device would block or fail its reader
        raise DataError(f"Cannot read image {path}: {_not_a_file(path)}")
    try:
        with Image.open(path) as raw:
            return image_array(raw, mode, size)
    except Exception as err:  # PIL raises many types for bad files
        why = image_error(err)
        raise DataError(f"Cannot read image {path}: {why}. Remove or replace this file.") from None


def _not_a_file(path: Path) -> str:
    """Why ``path`` (not a regular file) cannot be read as an image, in words."""
    if path.is_symlink() and not path.exists():
        return f"it is a link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "it is a folder, not an image file"
    return "it is not a regular file (a FIFO, socket or device). Remove it."


_OBJECT_TEXT = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # Python's default repr


def image_error(err: Exception) -> str:
    """Why PIL could not read an image, in words: never a Python object's text (PIL names
    in-memory files ``<_io.BytesIO object at 0x...>``)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file that can be read (an unknown format, or damaged)"
    text = _OBJECT_TEXT.sub("the image", str(err)).strip()
    return text or type(err).__name__


def _decode_chunk(
    paths: Sequence[Path], mode: str, size: int | None, skip_bad: bool
) -> list[np.ndarray | DataError]:
    """Decode each path; with ``skip_bad``, an unreadable file gives its DataError."""
    out: list[np.ndarray | DataError] = []
    for path in paths:
        try:
            out.append(_decode(path, mode, size))
        except DataError as err:
            if not skip_bad:
                raise
            out.append(err)
    return out


def _decode_all(
    paths: Sequence[Path], mode: str, size: int | None, desc: str, skip_bad: bool = False
) -> Generator[np.ndarray | DataError, None, None]:
    """Decode ``paths`` in a thread pool, yielding (C, H, W) arrays in order (or, with
    ``skip_bad``, the DataError of an unreadable file in its place).

    Files go to the threads in chunks, which keeps the per-file overhead low for tiny images;
    PIL releases the GIL while decoding, which makes the threads pay off for larger ones.
    """
    chunks = [paths[i : i + _DECODE_CHUNK] for i in range(0, len(paths), _DECODE_CHUNK)]
    workers = min(16, (os.cpu_count() or 1) + 2, len(chunks))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dsmae-decode")
    try:
        n = len(chunks)
        results = pool.map(_decode_chunk, chunks, [mode] * n, [size] * n, [skip_bad] * n)
        with tqdm(total=len(paths), unit="img", desc=desc, disable=None) as bar:
            for arrays in results:
                yield from arrays
                bar.update(len(arrays))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _load_folder(
    folder: Path, split: str, channels: int, size: int | None, skip_bad: bool = False
) -> ImageTensors:
    """Decode one split of a folder: images (N, channels, H, W) uint8, labels (N,) int64.

    With ``skip_bad``, unreadable files are left out, counted and named in a warning."""
    split_dir, all_splits = split_folders(folder, split)
    paths = find_images(split_dir)
    if not paths:
        raise no_images(split_dir)

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


def decode_files(
    paths: Sequence[Path],
    *,
    channels: int = 3,
    size: int | None = None,
    skip_bad: bool = False,
    offer_skip: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """Decode image files (any mode; see the module docstring) into one tensor.

    Args:
        paths: the files, at least one.
        channels: 1 or 3.
        size: resize the shorter side to ``size`` and centre-crop ``size x size``; None:
            native size, which must be the same for all.
        skip_bad: leave out unreadable files (counted in a warning) instead of raising.
        offer_skip: the error about an unreadable file suggests ``--skip-bad-images``
            (for the commands that have it).

    Returns:
        images (M, channels, H, W) uint8 and the indices into ``paths`` of the M files
        decoded (all of them unless ``skip_bad``).

    Raises:
        DataError: an unreadable file (naming it), images of different sizes, or no
            readable file at all.
    """
    where = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else "."
    mode = "L" if channels == 1 else "RGB"
    decoded = _decode_all(paths, mode, size, f"decoding {where}", skip_bad)
    with closing(decoded), _suggesting_skip(offer_skip and not skip_bad):
        out, good, bad = _stack(decoded, paths, where)
    if bad:
        logger.warning(
            "skipped %d unreadable image(s) of %d in %s; the first: %s",
            len(bad),
            len(paths),
            where,
            bad[0],
        )
    if out is None:
        raise DataError(f"None of the {len(paths)} image files in {where} could be read.")
    return torch.from_numpy(out[: len(good)] if bad else out), good


def _stack(
    decoded: Iterable[np.ndarray | DataError], paths: Sequence[Path], where: str
) -> tuple[np.ndarray | None, list[int], list[DataError]]:
    """The decoded images ((C, H, W) arrays in the order of ``paths``, or the DataError of
    a file skipped) in one (len(paths), C, H, W) uint8 array whose first rows they fill
    (None when there is none), the indices into ``paths`` of those rows, and the errors.

    Raises:
        DataError: images of different sizes.
    """
    out: np.ndarray | None = None
    good: list[int] = []
    bad: list[DataError] = []
    for i, arr in enumerate(decoded):
        if isinstance(arr, DataError):
            bad.append(arr)
            continue
        if out is None:
            out = np.empty((len(paths), *arr.shape), dtype=np.uint8)
            first = paths[i]
        elif arr.shape != out.shape[1:]:
            raise DataError(
                f"Images in {where} have different sizes: {first} is "
                f"{out.shape[3]}x{out.shape[2]} but {paths[i]} is "
                f"{arr.shape[2]}x{arr.shape[1]} (width x height). Pass a size to resize "
                "and centre-crop them all to one size."
            )
        out[len(good)] = arr
        good.append(i)
    return out, good, bad


@contextmanager
def _suggesting_skip(suggest: bool) -> Generator[None, None, None]:
    """Add the ``--skip-bad-images`` hint to an unreadable-file error raised inside."""
    try:
        yield
    except DataError as err:
        if not suggest or not str(err).startswith("Cannot read image"):
            raise
        hint = ", or pass --skip-bad-images to skip unreadable files."
        raise DataError(str(err).rstrip(".") + hint) from None


def find_image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, hidden ones skipped), sorted.

    Raises:
        DataError: not a folder, or no image in it.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    paths = find_images(folder)
    if not paths:
        raise no_images(folder)
    return paths
