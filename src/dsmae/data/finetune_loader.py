"""The training batches of fine-tuning: MAE's per-image transform, seeded per image, in a
``DataLoader`` whose batch sampler hands each process its share of every global batch.

Per image, on the CPU, timm's ``create_transform`` with MAE's arguments
(:func:`train_transform`): random resized crop (``finetune.crop_scale``, bicubic) and
horizontal flip, RandAugment ``finetune.auto_augment`` (default ``rand-m9-mstd0.5-inc1``,
after the crop; its 0-bit posterize kept working on recent Pillow, :func:`_posterize`), to
tensor, normalise, random erasing (``finetune.random_erase``, per-pixel noise). They run in a
``DataLoader`` with ``finetune.workers`` processes; each image's augmentation is seeded from
(``train.seed``, epoch, image index) (:class:`AugmentedImages`), so it does not depend on the
number of workers or processes. Each epoch visits the training images in the order
``torch.randperm(N, generator(seed + epoch))``, in global batches of
``finetune.batch_size`` (the last partial batch dropped), of which each process takes its
share (:class:`ProcessBatchSampler`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from dsmae import distributed
from dsmae.config import Config
from dsmae.data.images import ImageTensors
from dsmae.preemption import leave_stopping_to
from dsmae.runtime import generator
from dsmae.seeds import finetune_epoch_seed

__all__ = [
    "AugmentedImages",
    "ProcessBatchSampler",
    "Transform",
    "to_pil",
    "train_loader",
    "train_transform",
]

Transform = Callable[[Image.Image], torch.Tensor]


def train_transform(cfg: Config) -> Transform:
    """MAE's training transform (``main_finetune.build_transform``), from timm.

    A PIL image (mode "L" for ``model.in_chans == 1``, "RGB" for 3) -> random resized crop
    to ``img_size`` (``finetune.crop_scale``, bicubic) and horizontal flip -> RandAugment
    ``finetune.auto_augment`` -> (C, img_size, img_size) float tensor, normalised with
    ``data.mean``/``data.std`` -> random erasing (``finetune.random_erase``, "pixel" mode).
    """
    f, d = cfg.finetune, cfg.data
    if d.mean is None or d.std is None:
        raise ValueError("data.mean and data.std must be set (the checkpoint's config has them)")
    # RandAugment fills the corners of its geometric ops with timm's ``img_mean`` hparam,
    # round(255 * mean) per channel: a 1-tuple for grey images, which PIL takes as the fill
    # of an "L" image (checked for every op of the rand-*-inc1 policy), so nothing to adapt.
    transform = create_transform(
        input_size=cfg.model.img_size,
        is_training=True,
        color_jitter=None,
        auto_augment=None if f.auto_augment == "none" else f.auto_augment,
        interpolation="bicubic",
        re_prob=f.random_erase,
        re_mode="pixel",
        re_count=1,
        mean=tuple(d.mean),
        std=tuple(d.std),
        scale=tuple(f.crop_scale),
    )
    for op in transform.transforms:
        if isinstance(op, RandAugment):
            for augment in op.ops:
                if augment.aug_fn is timm_posterize:
                    augment.aug_fn = _posterize
    return transform


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives the all-black image it gave in MAE's days.

    ``PosterizeIncreasing`` keeps ``4 - int(4 * m / 10)`` bits: 0 when the magnitude ``m``,
    drawn from N(9, 0.5) with ``mstd0.5``, reaches its cap of 10 (about 2% of the draws).
    Older Pillow masked every value to 0 then; recent Pillow (13.0 here) raises a
    ValueError for ``ImageOps.posterize(image, 0)``, which timm 1.0 does not guard against.
    """
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return timm_posterize(image, bits_to_keep, **kwargs)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (C, H, W) uint8 image -> PIL: mode "L" for C = 1, "RGB" for C = 3."""
    array = image.numpy()
    return Image.fromarray(
        array[0] if len(array) == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
    )


@contextmanager
def _seeded_rngs(*key: int) -> Iterator[None]:
    """Seed ``random``, ``numpy.random`` and torch's CPU generator (what timm's transforms
    draw from) from ``key``. Outside a DataLoader worker their states are restored after,
    so that the main process's draws (mixup) do not depend on the images."""
    words = np.random.SeedSequence([k % 2**64 for k in key]).generate_state(4)  # uint32
    main = get_worker_info() is None
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if main else None
    random.seed(int.from_bytes(words.tobytes(), "little"))
    np.random.seed(words)
    torch.default_generator.manual_seed(int(words[0]) | int(words[1]) << 32)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class AugmentedImages(Dataset[tuple[torch.Tensor, int]]):
    """Labelled uint8 images through a per-image PIL transform, seeded per image.

    Items are addressed by ``(epoch, index)`` keys (what :class:`ProcessBatchSampler` yields):
    image ``index`` goes through ``transform`` with the global RNGs seeded from
    (``seed``, ``epoch``, ``index``), so an epoch's images are the same whichever process
    or DataLoader worker makes them.

    Args:
        images: (N, C, H, W) uint8, C = 1 or 3.
        labels: (N,) int64.
        transform: PIL image -> (C, S, S) float tensor.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Transform, seed: int
    ) -> None:
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        with _seeded_rngs(self.seed, epoch, index):
            image = self.transform(to_pil(self.images[index]))
        return image, int(self.labels[index])


class ProcessBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of each global batch of one epoch, as ``(epoch, index)`` keys.

    The epoch's global order is ``torch.randperm(num_images, generator(seed + epoch))``;
    global batch ``i`` is ``order[i * B : (i + 1) * B]`` (the last partial batch dropped),
    of which process ``rank`` of ``world_size`` takes ``[rank * B // W, (rank + 1) * B // W)``.
    Call :meth:`set_epoch` before iterating over each epoch.
    """

    def __init__(
        self, num_images: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.mine = distributed.local_share(batch_size, distributed.Process(rank, world_size))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_images // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, size = self.epoch, self.batch_size
        order = torch.randperm(
            self.num_images, generator=generator(finetune_epoch_seed(self.seed, epoch))
        )
        for i in range(len(self)):
            yield [(epoch, index) for index in order[i * size : (i + 1) * size][self.mine].tolist()]


def train_loader(
    train: ImageTensors,
    cfg: Config,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> tuple[DataLoader[tuple[torch.Tensor, int]], ProcessBatchSampler]:
    """The augmented training batches of this process, and their sampler (``set_epoch``).

    Each batch is (x, y): x (B / world_size, C, S, S) float32, normalised, from
    :func:`train_transform`; y (B / world_size,) int64 labels. ``finetune.workers``
    processes make them (persistent across epochs; none: this process).
    """
    f, seed = cfg.finetune, cfg.train.seed
    batches = ProcessBatchSampler(len(train), f.batch_size, seed, rank, world_size)
    dataset = AugmentedImages(train.images, train.labels, train_transform(cfg), seed)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=f.workers,
        pin_memory=pin_memory,
        persistent_workers=f.workers > 0,
        worker_init_fn=leave_stopping_to(os.getpid()),
        # fixes the workers' own seeds; the images are seeded per (seed, epoch, index)
        generator=generator(seed),
    )
    return loader, batches
