"""Decoding image files into ``uint8`` tensors, and converting a tensor's channels.

Files
    Images are decoded with PIL in any mode (grey, palette, RGBA, CMYK, 16-bit; alpha is
    dropped) and converted with ``convert("RGB")`` or ``convert("L")`` (:func:`image_array`),
    in a thread pool with a tqdm progress bar (:func:`decode_files`). With ``size``, the
    shorter side is resized to ``size`` (bilinear, antialiased, as torchvision's
    ``Resize(size)`` on PIL images) and the centre ``size x size`` is cropped (as
    ``CenterCrop(size)``). With ``size=None`` every image must have the same size, else
    :class:`DataError`. An unreadable file raises :class:`DataError` naming it (or, with
    ``skip_bad``, is left out and counted in a warning).

Channels
    :func:`convert_channels` turns 3 -> 1 with the ITU-R 601-2 luma weights (0.299, 0.587,
    0.114) and the same rounding as PIL's ``convert("L")`` (so a folder and a named data set
    give identical grey pixels), and 1 -> 3 by repeating the channel.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dsmae.data.images import DataError

__all__ = [
    "convert_channels",
    "decode_files",
    "image_array",
    "image_error",
    "resize_centre_crop",
    "to_8bit",
]

logger = logging.getLogger(__name__)

# PIL's fixed-point ITU-R 601-2 luma weights (sum 65536): L = (R*299 + G*587 + B*114) / 1000.
_LUMA_FIXED = (19595, 38470, 7471)
_LUMA_CHUNK = 4096  # images per chunk when converting to grey (bounds temporary memory)
_DECODE_CHUNK = 32  # files per thread-pool task


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
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
