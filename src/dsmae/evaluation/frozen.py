"""Frozen-encoder features: of a labelled data set's train and test splits (the input of
the linear probe and k-NN), and of any folder of images (``dsmae features``)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from dsmae.config import Config, DataConfig, ModelConfig
from dsmae.data.pipeline import eval_batch, load_split
from dsmae.data.sources import DataError, ImageTensors, decode_files, find_image_files
from dsmae.export import encoder_from_checkpoint
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


def data_with(
    base: DataConfig,
    source: str | None = None,
    root: str | None = None,
    download: bool | None = None,
    skip_bad_images: bool | None = None,
) -> DataConfig:
    """``base`` with the data options an evaluation command was given (None: keep)."""
    given = {"source": source, "root": root, "download": download,
             "skip_bad_images": skip_bad_images}  # fmt: skip
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def labelled_splits(data: DataConfig, model: ModelConfig, purpose: str) -> dict[str, ImageTensors]:
    """The "train" and "test" splits of ``data``, refused unless every image has a class.

    Args:
        purpose: what needs the labels, for the message (e.g. "a linear probe").

    Raises:
        DataError: a split without class labels (a folder without class sub-folders).
    """
    splits = {split: load_split(data, model, split) for split in ("train", "test")}
    for split, tensors in splits.items():
        if not tensors.classes or bool((tensors.labels < 0).any()):
            raise DataError(
                f"the {split} split of {data.source} has unlabelled images; {purpose} "
                "needs class labels (for a folder: one sub-folder per class)"
            )
    return splits


def result_path(
    checkpoint: str | Path, protocol: str, random_init: bool = False, pool: str = "avg"
) -> Path:
    """Where an evaluation of ``checkpoint`` is written: beside it, as
    ``<stem>.<protocol>[-cls][-random-init].json`` (protocol: linprobe, knn, finetune;
    ``-cls`` for the [CLS] features, so that both poolings can be kept)."""
    path = Path(checkpoint)
    variant = ("-cls" if pool == "cls" else "") + ("-random-init" if random_init else "")
    return path.with_name(f"{path.stem}.{protocol}{variant}.json")


def save_result(checkpoint: str | Path, protocol: str, random_init: bool, result: Any) -> Path:
    """Write a result dataclass to :func:`result_path` (for its ``pool``) as JSON; returns
    the path."""
    out = result_path(checkpoint, protocol, random_init, getattr(result, "pool", "avg"))
    atomic_write_text(out, json.dumps(dataclasses.asdict(result), indent=2) + "\n", "result")
    return out


# Config keys that say how an evaluation runs or when, not what it computes.
_NOT_SETTINGS = ("workers", "after_pretrain", "random_baseline")


def evaluation_settings(section: Any, data: str) -> dict[str, Any]:
    """What an evaluation result depends on: its config section (a ``ProbeConfig`` or
    ``FinetuneConfig``) without the keys that change only how it runs (``workers``) or
    when (``after_pretrain``, ``random_baseline``), and the data it ran on. Saved in every
    result as ``settings``; a cached result is reused only for equal settings."""
    fields = dataclasses.asdict(section)
    return {**{k: v for k, v in fields.items() if k not in _NOT_SETTINGS}, "data": data}


def best_epoch(history: Sequence[float]) -> tuple[float, int]:
    """The best top-1 of a per-epoch history and its 1-based epoch (the first on ties),
    shown beside the last epoch's, labelled as such (SPEC section 6)."""
    best = max(range(len(history)), key=history.__getitem__)
    return history[best], best + 1


@dataclass
class FrozenFeatures:
    """Features (N, D) / (M, D) float32 and labels of the train and test splits."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    data: str  # the data set or folder they came from
    config: Config  # the checkpoint's


def frozen_features(
    checkpoint: str | Path,
    *,
    pool: str,
    purpose: str,
    data: str | None = None,
    data_root: str | None = None,
    download: bool | None = None,
    skip_bad_images: bool | None = None,
    random_init: bool = False,
    device: str = "auto",
    seed: int = 0,
) -> FrozenFeatures:
    """Run the encoder of ``checkpoint`` (or its random init) once over the train and test
    splits of ``data`` (default: the data it was pre-trained on), without augmentation.

    Args:
        pool: "avg" (mean of the patch tokens) or "cls" ([CLS]).
        purpose: what the features are for, in the message when labels are missing.

    Raises:
        DataError: a split without class labels (a folder without class sub-folders).
    """
    encoder, cfg = encoder_from_checkpoint(checkpoint, random_init=random_init, seed=seed)
    data_cfg = data_with(cfg.data, data, data_root, download, skip_bad_images)
    splits = labelled_splits(data_cfg, cfg.model, purpose)
    dev = resolve_device(device)
    feats = {
        split: extract_features(
            encoder,
            tensors.images,
            size=cfg.model.img_size,
            mean=cfg.data.mean,
            std=cfg.data.std,
            pool=pool,
            device=dev,
        )
        for split, tensors in splits.items()
    }
    return FrozenFeatures(
        train=feats["train"],
        train_labels=splits["train"].labels,
        test=feats["test"],
        test_labels=splits["test"].labels,
        classes=splits["train"].classes,
        data=data_cfg.source,
        config=cfg,
    )


def folder_features(
    checkpoint: str | Path,
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
    encoder, cfg = encoder_from_checkpoint(checkpoint, teacher=teacher)
    folder = Path(folder).expanduser()
    paths = _listable(find_image_files(folder), folder, skip_bad_images)
    images, kept = decode_files(
        paths, channels=cfg.model.in_chans, size=cfg.model.img_size, skip_bad=skip_bad_images
    )
    feats = extract_features(
        encoder,
        images,
        size=cfg.model.img_size,
        mean=cfg.data.mean,
        std=cfg.data.std,
        pool=pool or cfg.probe.pool,
        batch_size=batch_size,
        device=resolve_device(device),
    )
    out = Path(out)
    with written("features", out):
        out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, feats.numpy())
    atomic_write_bytes(out, buffer.getvalue(), "features")
    names = out.with_name(out.stem + ".files.txt")
    listing = "".join(f"{paths[i].relative_to(folder).as_posix()}\n" for i in kept)
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
