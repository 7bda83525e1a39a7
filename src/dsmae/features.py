"""Features of any images, for notebooks and scripts (:func:`extract_features`) and for
the ``dsmae features`` command (:func:`folder_features`, a thin wrapper around it).

Every image is made what the encoder saw in pre-training: decoded to its channels
(grey or RGB, whatever the file's mode), its shorter side resized to the encoder's size
(bilinear, antialiased) and centre-cropped, then normalised with the mean and std the
encoder was trained with.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from dsmae.checkpoint import Checkpoint
from dsmae.config import Config, ConfigError, check_pool_argument
from dsmae.data.decoding import decode_files, image_array
from dsmae.data.folder_layout import find_image_files
from dsmae.data.images import DataError
from dsmae.evaluation import frozen
from dsmae.export import load_encoder
from dsmae.runtime import resolve_device
from dsmae.writes import atomic_write_bytes, check_output_file, written

log = logging.getLogger(__name__)

# what extract_features takes: whose features, and of which images
Source: TypeAlias = str | Path | Checkpoint | VisionTransformer
Images: TypeAlias = torch.Tensor | str | Path | Image.Image | Sequence[Image.Image | str | Path]


@dataclass(frozen=True)
class Preprocessing:
    """The input an encoder was trained on: (channels, size, size) images, normalised
    with ``mean`` and ``std`` (per channel, in [0, 1] units); and the features it gives
    as its own: ``pool`` ("avg" or "cls"), and whether its forward fixes them
    (``pool_fixed``: an export's or a timm model's) or it is a checkpoint's setting."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pool: str = "avg"
    pool_fixed: bool = False

    @classmethod
    def of_config(cls, cfg: Config) -> Preprocessing:
        """The input of the encoder of a checkpoint with config ``cfg``."""
        m, d = cfg.model, cfg.data
        return cls(m.in_chans, m.img_size, tuple(d.mean), tuple(d.std), cfg.probe.pool)

    @classmethod
    def of_timm_model(cls, model: torch.nn.Module) -> Preprocessing:
        """The input recorded in a timm model's ``pretrained_cfg`` (what
        ``timm.data.resolve_data_config`` reads): set by ``dsmae.load_encoder`` and by
        ``timm.create_model`` of an export.

        Raises:
            ConfigError: the model records none, or a size that is not square.
        """
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if not {"input_size", "mean", "std"} <= cfg.keys():
            raise ConfigError(
                "this encoder does not record the input it was trained on (timm's "
                "pretrained_cfg: input_size, mean, std); pass its checkpoint or export folder, "
                "or an encoder from dsmae.load_encoder or timm.create_model"
            )
        channels, height, width = cfg["input_size"]
        if height != width:
            raise ConfigError(f"the encoder's input is {height} x {width}: not square")
        pool = "cls" if getattr(model, "global_pool", "avg") == "token" else "avg"
        return cls(channels, height, tuple(cfg["mean"]), tuple(cfg["std"]), pool, True)


def check_batch_size(batch_size: Any) -> None:
    """Refuse a ``batch_size`` that is not a positive integer.

    Raises:
        ConfigError: naming it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"batch_size must be a positive integer, got {batch_size!r}", "batch_size"
        )


def _pooling(pool: str | None, seen: Preprocessing) -> str:
    """The pooling asked for, else the source's own; one that differs from the pooling
    an export or a timm model fixes is taken, with a warning."""
    if pool is None:
        return seen.pool
    if seen.pool_fixed and pool != seen.pool:
        log.warning(
            "pool=%r differs from the encoder's own %r (what its forward, timm's local-dir: "
            "and encoder.onnx give): these features will not match theirs",
            pool,
            seen.pool,
        )
    return pool


def extract_features(
    source: Source,
    images: Images,
    pool: str | None = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    *,
    teacher: bool = False,
) -> torch.Tensor:
    """Frozen-encoder features of ``images``, each made what the encoder saw in
    pre-training (see the module docstring).

    Args:
        source: a ``dsmae pretrain`` checkpoint (a file or a :class:`Checkpoint`), an
            export folder, or an encoder: a timm ``VisionTransformer`` that records its
            input in ``pretrained_cfg`` (those of ``dsmae.load_encoder`` do; it is put
            back in its mode and on its device afterwards).
        images: a tensor, (N, C, H, W) or (C, H, W), uint8 in 0..255 or float in [0, 1]
            (resized to the encoder's size as the evaluations do); PIL images or image
            files (one, or a list); or a folder (every image under it, recursively, in
            sorted order: ``dsmae.data.folder_layout.find_image_files``).
        pool: "avg" (the mean of the patch tokens, what DSMAE trains) or "cls" ([CLS]),
            both after the final norm. None: the source's own: an export's or a timm
            model's pooling (what its forward returns, and its ``encoder.onnx``), a
            checkpoint's ``probe.pool``; another pooling than an export's or a model's
            own is taken with a warning.
        batch_size: images per forward pass, a positive integer.
        device: "auto" (CUDA when available), "cpu", "cuda[:N]" or "mps".
        teacher: a checkpoint's EMA teacher instead of its student.

    Returns:
        (N, D) float32 on the CPU, one row per image, in order.

    Raises:
        ConfigError: a bad ``pool``, ``batch_size``, ``device`` or source.
        DataError: no images, images that cannot be read, or do not fit the encoder.
        CheckpointError, FileNotFoundError: see :func:`dsmae.load_encoder`.
    """
    if pool is not None:
        check_pool_argument(pool)
    check_batch_size(batch_size)
    target = resolve_device(str(device))
    encoder, seen = open_encoder(source, teacher=teacher)
    pool = _pooling(pool, seen)
    pixels = image_tensor(images, seen)
    with _kept_as_it_was(encoder):
        return frozen.extract_features(
            encoder, pixels, size=seen.size, mean=seen.mean, std=seen.std, pool=pool,
            batch_size=batch_size, device=target,
        )  # fmt: skip


def open_encoder(
    source: Source, *, teacher: bool = False
) -> tuple[VisionTransformer, Preprocessing]:
    """The encoder of ``source`` (see :func:`extract_features`) and its input.

    Raises:
        ConfigError: ``teacher`` for a source that is no checkpoint, a source of another
            type, or an encoder that does not record its input.
        CheckpointError, FileNotFoundError: see :func:`dsmae.load_encoder`.
    """
    if isinstance(source, (str, Path)) and not Path(source).expanduser().is_dir():
        source = Checkpoint.read(Path(source).expanduser())
    if isinstance(source, Checkpoint):
        return source.encoder(teacher=teacher), Preprocessing.of_config(source.config)
    if teacher:
        raise ConfigError(
            "teacher=True needs a checkpoint: an export folder or an encoder holds one set "
            "of weights"
        )
    if isinstance(source, (str, Path)):
        source = load_encoder(Path(source).expanduser())
    if not isinstance(source, torch.nn.Module):
        raise ConfigError(
            "source must be a checkpoint, an export folder or an encoder, not "
            f"{type(source).__name__}"
        )
    return source, Preprocessing.of_timm_model(source)


@contextlib.contextmanager
def _kept_as_it_was(encoder: torch.nn.Module) -> Iterator[None]:
    """Put ``encoder`` back in its train/eval mode and on its device after the body."""
    training = encoder.training
    device = next(encoder.parameters()).device
    try:
        yield
    finally:
        encoder.train(training).to(device)


def image_tensor(images: Images, seen: Preprocessing) -> torch.Tensor:
    """``images`` (see :func:`extract_features`) as one (N, C, H, W) uint8 tensor with
    the encoder's channels; files, folders and PIL images resized (shorter side) and
    centre-cropped to its size.

    Raises:
        DataError: an unreadable file, no image, a mixed list, a tensor of the wrong
            shape, type or range.
    """
    if isinstance(images, torch.Tensor):
        return _checked_tensor(images, seen.channels)
    if isinstance(images, Image.Image):
        images = [images]
    elif isinstance(images, (str, Path)):
        path = Path(images).expanduser()
        images = find_image_files(path) if path.is_dir() else [path]
    items = list(images)
    if items and all(isinstance(item, Image.Image) for item in items):
        return torch.stack([_pil_pixels(item, seen) for item in items])
    if items and all(isinstance(item, (str, Path)) for item in items):
        paths = [Path(item).expanduser() for item in items]
        return decode_files(paths, channels=seen.channels, size=seen.size, offer_skip=False)[0]
    raise DataError(
        "images must be a tensor, a folder, or a non-empty list of PIL images or of image "
        f"files (not a mix); got {_described(items)}"
    )


def _checked_tensor(images: torch.Tensor, channels: int) -> torch.Tensor:
    """A (N, C, H, W) or (C, H, W) image tensor as (N, C, H, W) uint8.

    Raises:
        DataError: another shape, C not ``channels``, a float outside [0, 1] (normalised
            already?) or another dtype.
    """
    batch = images.unsqueeze(0) if images.ndim == 3 else images
    if batch.ndim != 4 or batch.shape[1] != channels:
        raise DataError(
            f"an image tensor must be (N, {channels}, H, W) or ({channels}, H, W) for this "
            f"encoder, not {tuple(images.shape)}"
        )
    if batch.numel() == 0:
        raise DataError(f"the image tensor {tuple(images.shape)} holds no pixels: no images")
    if batch.dtype == torch.uint8:
        return batch
    if not batch.is_floating_point():
        raise DataError(f"an image tensor must be uint8 or float, not {batch.dtype}")
    if bool(batch.isnan().any()):
        raise DataError("a float image tensor holds NaN: pixels must be numbers in [0, 1]")
    if batch.min() < 0 or batch.max() > 1:
        raise DataError(
            "a float image tensor must hold pixels in [0, 1], not normalised ones: "
            "extract_features normalises them as in pre-training"
        )
    return batch.mul(255).round_().to(torch.uint8)  # as images are held in pre-training


def _pil_pixels(image: Image.Image, seen: Preprocessing) -> torch.Tensor:
    """A PIL image (any mode) as a file of it is decoded: (C, size, size) uint8."""
    mode = "L" if seen.channels == 1 else "RGB"
    return torch.from_numpy(image_array(image, mode, seen.size))


def _described(items: list[Any]) -> str:
    """What a list holds, for a message: its length and the types of its items."""
    kinds = sorted({type(item).__name__ for item in items})
    return f"{len(items)} item(s) of type {', '.join(kinds)}" if items else "an empty list"


# ------------------------------------------------------------------ dsmae features


def folder_features(
    checkpoint: Checkpoint,
    folder: str | Path,
    out: str | Path,
    *,
    pool: str | None = None,
    teacher: bool = False,
    skip_bad_images: bool = False,
    device: str = "auto",
    batch_size: int = 256,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Embeddings of every image under ``folder`` (recursive, any layout), for a user's
    own downstream work: :func:`extract_features` of the checkpoint's student
    (``teacher``: the EMA teacher), ``pool`` "avg" or "cls" (default: the checkpoint's
    ``probe.pool``), of the images that can be read (``skip_bad_images``: the others are
    left out with a warning; else one is an error).

    Writes:
        ``out`` (a ``.npy`` file): (N, D) float32, one row per image, and beside it
        ``<out stem>.files.txt``: the N image paths relative to ``folder``, one per line,
        in the same order. Neither may exist already (unless ``overwrite``) or be one of
        the inputs; this is checked before any work.

    Returns:
        the two paths.

    Raises:
        ConfigError: ``out`` or its list is an input, or exists (without ``overwrite``).
        WriteError: their folder cannot be written.
    """
    check_batch_size(batch_size)
    folder = Path(folder).expanduser()
    found = find_image_files(folder)
    out = Path(out)
    inputs = [checkpoint.path, *found]
    for path in (out, names_file(out)):
        check_output_file(path, "--out", "features", inputs=inputs, overwrite=overwrite)
    paths = _listable(found, folder, skip_bad_images)
    seen = Preprocessing.of_config(checkpoint.config)
    images, kept = decode_files(
        paths, channels=seen.channels, size=seen.size, skip_bad=skip_bad_images
    )
    pool = pool or checkpoint.config.probe.pool
    feats = extract_features(checkpoint, images, pool, batch_size, device, teacher=teacher)
    listing = "".join(f"{paths[i].relative_to(folder).as_posix()}\n" for i in kept)
    return _write_features(feats, listing, Path(out))


def _write_features(feats: torch.Tensor, listing: str, out: Path) -> tuple[Path, Path]:
    """Write (N, D) ``feats`` to the ``.npy`` file ``out`` and ``listing`` (their image
    files, one a line) to ``<out stem>.files.txt`` beside it: both or neither, each
    atomically. A file name that is no valid UTF-8 is listed as its bytes on disk (what
    Python's ``os.fsencode`` gives back for the name ``os.listdir`` read), so reading the
    list with ``errors="surrogateescape"`` gives the very names back."""
    names = names_file(out)
    buffer = io.BytesIO()
    np.save(buffer, feats.numpy())
    listed = listing.encode("utf-8", "surrogateescape")  # encoded before anything is written
    with written("features", out):
        out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue(), "features")
    try:
        atomic_write_bytes(names, listed, "features")
    except BaseException:
        out.unlink(missing_ok=True)  # neither, rather than features without their names
        raise
    return out, names


def names_file(out: Path) -> Path:
    """The list of image files beside the features file ``out``: ``<stem>.files.txt``."""
    return out.with_name(out.stem + ".files.txt")


def _listable(paths: list[Path], folder: Path, skip: bool) -> list[Path]:
    """``paths`` whose names can be written one per line: a name with a line break in it
    would split its line of ``.files.txt`` and misalign every row after it, so it is
    refused, or with ``skip`` left out with a warning naming it.

    Raises:
        DataError: such a name, without ``skip``.
    """
    broken = [p for p in paths if "\n" in str(p) or "\r" in str(p)]
    if not broken:
        return paths
    named = ", ".join(repr(str(p.relative_to(folder))) for p in broken[:3])
    if not skip:
        raise DataError(
            f"{len(broken)} image file name(s) in {folder} hold a line break ({named}), which "
            "cannot be listed one per line in .files.txt: rename them, or pass "
            "--skip-bad-images to leave them out"
        )
    log.warning("left out %d image(s) whose names hold a line break: %s", len(broken), named)
    return [p for p in paths if p not in broken]
