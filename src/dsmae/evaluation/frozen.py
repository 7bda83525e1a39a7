"""Frozen-encoder features: of a labelled data set's train and test splits (the input of
the linear probe and k-NN), and of any folder of images (``dsmae features``)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from dsmae.checkpoint import Checkpoint
from dsmae.config import Config
from dsmae.data.pipeline import eval_batch
from dsmae.data.sources import DataError, decode_files, find_image_files
from dsmae.evaluation.results import LabelledSplits
from dsmae.runtime import progress, resolve_device
from dsmae.writes import atomic_write_bytes, atomic_write_text, written

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    encoder: VisionTransformer,
    images: torch.Tensor,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    pool: str = "avg",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Frozen-encoder features of every image.

    Args:
        images: (N, C, H, W) uint8.
        pool: "avg" (mean of the patch tokens) or "cls" ([CLS]), after the final norm.

    Returns:
        (N, D) float32 on the CPU.
    """
    encoder.eval().to(device)
    feats = []
    with progress(len(images), "features") as bar:
        for start in range(0, len(images), batch_size):
            x = eval_batch(images[start : start + batch_size].to(device), size, mean, std)
            feats.append(pooled_features(encoder, x, pool))
            bar.update(len(x))
    return torch.cat(feats).float().cpu()


def pooled_features(encoder: VisionTransformer, images: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, C, H, W) normalised images -> (B, D): the mean of the patch tokens ("avg", what
    every DSMAE loss trains, SPEC section 6) or the [CLS] token ("cls"), after the final
    norm."""
    tokens = encoder.forward_features(images)
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, encoder.num_prefix_tokens :].mean(dim=1)
    raise ValueError(f"pool must be 'avg' or 'cls', not {pool!r}")


@dataclass
class FrozenFeatures:
    """Features (N, D) / (M, D) float32 and labels of the train and test splits."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]


def encoded(
    encoder: VisionTransformer,
    images: torch.Tensor,
    cfg: Config,
    pool: str,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """:func:`extract_features` of (N, C, H, W) uint8 ``images`` as ``cfg`` (a
    checkpoint's) sees them: resized to ``model.img_size``, normalised with ``data``'s
    mean and std. Returns (N, D) float32 on the CPU."""
    m, d = cfg.model, cfg.data
    return extract_features(
        encoder, images, size=m.img_size, mean=d.mean, std=d.std, pool=pool,
        batch_size=batch_size, device=device,
    )  # fmt: skip


def frozen_features(
    encoder: VisionTransformer, splits: LabelledSplits, cfg: Config, pool: str, device: torch.device
) -> FrozenFeatures:
    """Run ``encoder`` (frozen) once over the train and test splits, without augmentation
    (:func:`encoded`), ``pool`` giving the features: "avg" (mean of the patch tokens) or
    "cls" ([CLS])."""
    train, test = splits.train, splits.test
    feats = [encoded(encoder, split.images, cfg, pool, device) for split in (train, test)]
    return FrozenFeatures(feats[0], train.labels, feats[1], test.labels, train.classes)


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
) -> tuple[Path, Path]:
    """Embeddings of every image under ``folder`` (recursive, any layout), for a user's
    own downstream work.

    Each image is resized (shorter side) and centre-cropped to the checkpoint's image
    size, normalised as in pre-training and encoded by the frozen student (``teacher``:
    the EMA teacher). ``pool``: "avg" or "cls" (default: the checkpoint's ``probe.pool``).

    Writes:
        ``out`` (a ``.npy`` file): (N, D) float32, one row per image, and beside it
        ``<out stem>.files.txt``: the N image paths relative to ``folder``, one per line,
        in the same order.

    Returns:
        the two paths.
    """
    encoder, cfg = checkpoint.encoder(teacher=teacher), checkpoint.config
    folder = Path(folder).expanduser()
    paths = _listable(find_image_files(folder), folder, skip_bad_images)
    images, kept = decode_files(
        paths, channels=cfg.model.in_chans, size=cfg.model.img_size, skip_bad=skip_bad_images
    )
    feats = encoded(
        encoder, images, cfg, pool or cfg.probe.pool, resolve_device(device), batch_size
    )
    listing = "".join(f"{paths[i].relative_to(folder).as_posix()}\n" for i in kept)
    return _write_features(feats, listing, Path(out))


def _write_features(feats: torch.Tensor, listing: str, out: Path) -> tuple[Path, Path]:
    """Write (N, D) ``feats`` to the ``.npy`` file ``out`` and ``listing`` (their image
    files, one a line) to ``<out stem>.files.txt`` beside it, each atomically."""
    with written("features", out):
        out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, feats.numpy())
    atomic_write_bytes(out, buffer.getvalue(), "features")
    names = out.with_name(out.stem + ".files.txt")
    atomic_write_text(names, listing, "features")
    return out, names


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
