"""From a data source to normalised training batches.

Small data sets are decoded once into one uint8 tensor (:class:`ImageTensors`); each
step gathers a batch of it, moves it to the training device and augments it there
(:mod:`dsmae.data.augment`), so no worker processes re-read files every epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from dsmae.config import DataConfig, ModelConfig
from dsmae.data.augment import crop_flip_resize, normalize, resize, to_unit_float
from dsmae.data.images import ImageTensors
from dsmae.data.sources import open_source
from dsmae.runtime import generator
from dsmae.seeds import epoch_order_seed

log = logging.getLogger(__name__)


def load_split(data: DataConfig, model: ModelConfig, split: str) -> ImageTensors:
    """The images of ``split`` ("pretrain", "train" or "test") at most ``img_size`` wide.

    Larger images are resized once (antialiased) to ``img_size`` so that every later
    random crop only ever up-samples. ``data.subset`` keeps a fixed random sample of the
    pre-training images.
    """
    tensors = open_source(
        data.source,
        split,
        root=data.root,
        download=data.download,
        channels=model.in_chans,
        size=model.img_size,
        skip_bad=data.skip_bad_images,
    )
    if split == "pretrain" and data.subset is not None and data.subset < len(tensors):
        # a fixed random sample (folders are read in class order, so not the first N)
        keep = torch.randperm(len(tensors), generator=torch.Generator().manual_seed(0))
        keep = keep[: data.subset].sort().values
        tensors = ImageTensors(tensors.images[keep], tensors.labels[keep], tensors.classes)
    if tensors.images.shape[-1] > model.img_size or tensors.images.shape[-2] > model.img_size:
        small = resize(to_unit_float(tensors.images), model.img_size)
        images = small.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        tensors = ImageTensors(images, tensors.labels, tensors.classes)
    log.info(
        "%s split of %s: %d images of %s",
        split,
        data.source,
        len(tensors),
        tuple(tensors.images.shape[1:]),
    )
    return tensors


def channel_stats(
    images: torch.Tensor, max_images: int = 10_000
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation in [0, 1] units.

    Args:
        images: (N, C, H, W) uint8; the first ``max_images`` are measured.

    Returns:
        mean and std, each a list of C floats.
    """
    x = to_unit_float(images[:max_images]).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(dim=1).tolist(), x.std(dim=1).clamp(min=1e-3).tolist()


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run, or one with another number of processes, sees the same order. (N,) int64."""
    return torch.randperm(num_items, generator=generator(epoch_order_seed(seed, epoch)))


def augmented_batch(
    images: torch.Tensor,
    size: int,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> cropped to ``boxes`` ((B, 4), see ``crop_boxes``), mirrored
    where ``flips`` ((B,) bool), resized to ``size`` and normalised: (B, C, size, size)."""
    return normalize(crop_flip_resize(to_unit_float(images), boxes, flips, size), mean, std)


def eval_batch(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> resized to ``size`` and normalised, no augmentation."""
    return normalize(resize(to_unit_float(images), size), mean, std)
