"""A validation split for choosing settings, and the three figures a grid cell is read by.

Choices made on test figures flatter the chosen setting. So a grid
(:mod:`dsmae.experiments.grid`) carves a **validation split** once from the labelled
train split (seeded, stratified per class; :func:`carve_validation`) and chooses only by
the k-NN top-1 on it, the rest of the train split as the memory bank. The test split is
read only to report what was chosen: k-NN and the fast linear probe, trained on the same
bank (:func:`score_encoder`).

The validation images may be among the pre-training images (pre-training reads no
labels); they are never among the labelled images of the bank.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from dsmae.config import Config, ConfigError, DataConfig, ModelConfig
from dsmae.data.images import ImageTensors
from dsmae.evaluation.frozen import encoded
from dsmae.evaluation.knn import knn_accuracy
from dsmae.evaluation.linprobe import train_linear_probe
from dsmae.evaluation.results import labelled_splits
from dsmae.runtime import generator

__all__ = ["GridSplits", "carve_validation", "grid_splits", "score_encoder", "stratified_indices"]


def stratified_indices(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded sample of ``round(fraction * n_c)`` indices of every class ``c`` (at least
    one of a class with two or more images, never all of one), drawn with a generator
    seeded with ``seed``.

    Args:
        labels: (N,) int64 class labels, >= 0.
        fraction: in (0, 1).

    Returns:
        (V,) int64 indices into ``labels``, ascending.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = generator(seed)
    chosen = []
    for c in torch.unique(labels).tolist():  # ascending: the same draws on every machine
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        take = min(max(round(fraction * n), 1 if n > 1 else 0), n - 1)
        chosen.append(members[torch.randperm(n, generator=rng)[:take]])
    return torch.cat(chosen).sort().values


def _subset(split: ImageTensors, index: torch.Tensor) -> ImageTensors:
    return ImageTensors(split.images[index], split.labels[index], split.classes)


def carve_validation(
    train: ImageTensors, fraction: float, seed: int
) -> tuple[ImageTensors, ImageTensors]:
    """Split a labelled train split into (rest, validation) by
    :func:`stratified_indices`: the validation split holds ``fraction`` of each class."""
    val = stratified_indices(train.labels, fraction, seed)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val] = False
    return _subset(train, torch.nonzero(keep).flatten()), _subset(train, val)


@dataclass
class GridSplits:
    """The labelled images a grid reads: the ``bank`` (train split less the validation
    images, at most ``bank`` of them), ``val`` and ``test``, and ``record``, what they are
    (saved with every result)."""

    bank: ImageTensors
    val: ImageTensors
    test: ImageTensors
    record: dict[str, Any]


def grid_splits(
    data: DataConfig,
    model: ModelConfig,
    val_fraction: float,
    split_seed: int,
    bank: int | None = None,
) -> GridSplits:
    """The bank, validation and test splits of ``data`` (:func:`carve_validation` of its
    train split), the bank cut to a stratified sample of ``bank`` images where given.

    Raises:
        DataError: a split without class labels.
        ConfigError: ``bank`` below 1, or a validation split that leaves no bank.
    """
    splits = labelled_splits(data, model, "a grid's validation split")
    rest, val = carve_validation(splits.train, val_fraction, split_seed)
    if len(val) == 0 or len(rest) == 0:
        raise ConfigError(
            f"a validation fraction of {val_fraction} of {len(splits.train)} train images "
            "leaves an empty split",
            "--val-fraction",
        )
    if bank is not None:
        if bank < 1:
            raise ConfigError(f"--bank must be >= 1, got {bank}", "--bank")
        if bank < len(rest):
            rest = _subset(rest, stratified_indices(rest.labels, bank / len(rest), split_seed))
    digest = hashlib.sha256(
        stratified_indices(splits.train.labels, val_fraction, split_seed).numpy().tobytes()
    ).hexdigest()[:12]
    record = {
        "data": data.source,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "num_val": len(val),
        "num_bank": len(rest),
        "num_test": len(splits.test),
        "num_train_split": len(splits.train),
        "val_indices_sha256": digest,  # the validation images, as indices of the train split
    }
    return GridSplits(rest, val, splits.test, record)


def score_encoder(
    encoder: VisionTransformer, cfg: Config, splits: GridSplits, device: torch.device
) -> dict[str, float]:
    """The figures a grid reads an encoder by, its features pooled by ``cfg.probe.pool``:

    - ``val_knn``: k-NN top-1 (%) of the validation images against the bank, the only
      figure a grid chooses by;
    - ``test_knn``: the same vote for the test images;
    - ``test_linprobe``: the fast linear probe (``cfg.probe``; last epoch) trained on the
      bank, tested on the test images.

    The vote takes ``monitor.knn_k`` neighbours (at most the bank) at
    ``monitor.knn_temperature``; the probe is seeded with ``train.seed``.
    """
    pool, mon = cfg.probe.pool, cfg.monitor
    bank, val, test = (
        encoded(encoder, s.images, cfg, pool, device)
        for s in (splits.bank, splits.val, splits.test)
    )
    classes = len(splits.bank.classes)
    vote = {"k": min(mon.knn_k, len(bank)), "temperature": mon.knn_temperature}
    labels = splits.bank.labels
    top1, _ = train_linear_probe(
        bank, labels, test, splits.test.labels, classes, cfg.probe, cfg.train.seed
    )
    return {
        "val_knn": knn_accuracy(bank, labels, val, splits.val.labels, classes, **vote),
        "test_knn": knn_accuracy(bank, labels, test, splits.test.labels, classes, **vote),
        "test_linprobe": top1,
    }
