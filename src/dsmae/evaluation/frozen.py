"""Frozen-encoder features of a labelled data set's train and test splits (the input of
the linear probe and k-NN). Features of any images: :mod:`dsmae.features`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from dsmae.config import Config
from dsmae.data.pipeline import eval_batch
from dsmae.evaluation.results import LabelledSplits
from dsmae.runtime import progress


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
