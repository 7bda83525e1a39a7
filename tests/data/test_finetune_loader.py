"""Tests of dsmae.data.finetune_loader: MAE's fine-tuning transform, built from timm, and
the training batches, seeded per image and shared out between processes."""

import random

import numpy as np
import pytest
import torch
from timm.data import create_transform
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode, Normalize, RandomHorizontalFlip

from dsmae.config import build_config
from dsmae.data.finetune_loader import to_pil, train_loader, train_transform
from dsmae.data.images import ImageTensors

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.15]


def _config(chans: int = 3, **overrides):
    mean, std = (MEAN, STD) if chans == 3 else (MEAN[:1], STD[:1])
    return build_config(overrides={"model.img_size": 16, "model.patch_size": 4,
                                   "model.in_chans": chans, "data.mean": mean,
                                   "data.std": std, "finetune.batch_size": 8,
                                   "finetune.workers": 0, **overrides})  # fmt: skip


def _images(n: int = 20, chans: int = 3) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, chans, 16, 16), generator=g, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n) % 10, tuple(str(i) for i in range(10)))


def test_train_transform_is_timm_built_with_maes_arguments():
    ours = train_transform(_config()).transforms
    # MAE's main_finetune.build_transform with its default arguments
    maes = create_transform(input_size=16, is_training=True, color_jitter=None,
                            auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                            re_prob=0.25, re_mode="pixel", re_count=1,
                            mean=MEAN, std=STD).transforms  # fmt: skip
    assert [type(t) for t in ours] == [type(t) for t in maes]
    crop, flip, randaug, _, normalize, erase = ours
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert crop.size == (16, 16) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, RandomHorizontalFlip) and flip.p == 0.5
    # RandAugment comes after the crop and the flip
    assert isinstance(randaug, RandAugment) and [type(t) for t in ours].index(RandAugment) == 2
    assert [op.name for op in randaug.ops] == list(_RAND_INCREASING_TRANSFORMS)
    assert [op.name for op in randaug.ops] == [op.name for op in maes[2].ops]
    assert randaug.num_layers == 2 and randaug.choice_weights is None
    for op in randaug.ops:
        assert op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5
        assert op.kwargs["fillcolor"] == (128, 102, 76)  # round(255 * mean)
    assert isinstance(normalize, Normalize)
    assert normalize.mean.tolist() == pytest.approx(MEAN)
    assert normalize.std.tolist() == pytest.approx(STD)
    assert isinstance(erase, RandomErasing)
    assert erase.probability == 0.25 and erase.mode == "pixel" and erase.max_count == 1

    off = train_transform(_config(**{"finetune.auto_augment": "none",
                                     "finetune.crop_scale": [0.5, 1.0]})).transforms  # fmt: skip
    assert not any(isinstance(t, RandAugment) for t in off) and off[0].scale == (0.5, 1.0)


@pytest.mark.parametrize("chans", [1, 3])
def test_train_transform_takes_grey_and_colour_images(chans):
    transform = train_transform(_config(chans, **{"finetune.random_erase": 1.0}))
    images = _images(8, chans).images
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for image in images:  # 8 x 2 random ops: the geometric ones fill grey images too
        out = transform(to_pil(image))
        assert out.shape == (chans, 16, 16) and out.dtype == torch.float32
    assert to_pil(images[0]).mode == ("L" if chans == 1 else "RGB")


@pytest.mark.parametrize("chans", [1, 3])
def test_posterize_at_full_magnitude_gives_a_black_image(chans):
    # PosterizeIncreasing at magnitude 10 keeps 0 bits, which recent Pillow refuses
    transform = train_transform(_config(chans))
    (op,) = [op for op in transform.transforms[2].ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    image = to_pil(_images(1, chans).images[0])
    assert not np.asarray(op(image)).any()
    op.magnitude = 5  # keeps 2 bits: timm's own function
    assert np.array_equal(np.asarray(op(image)), np.asarray(image) & 0b11000000)


def _batches(cfg, train, epoch, **kwargs):
    loader, batches = train_loader(train, cfg, **kwargs)
    batches.set_epoch(epoch)
    return list(loader)


def test_training_batches_are_seeded_by_seed_epoch_and_image():
    cfg, train = _config(), _images(20)
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    first = _batches(cfg, train, epoch=0)
    # the main process's RNGs (mixup draws from them) are left as they were
    assert random.getstate() == state[0]
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])
    assert len(first) == 2  # 20 // 8, the partial batch dropped
    x, y = first[0]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    order = torch.randperm(20, generator=torch.Generator().manual_seed(cfg.train.seed))
    assert torch.equal(y, train.labels[order[:8]])

    again = _batches(cfg, train, epoch=0)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = _batches(cfg, train, epoch=1)
    assert not torch.equal(first[0][0], other[0][0])
    reseeded = _batches(_config(**{"train.seed": 1}), train, epoch=0)
    assert not torch.equal(first[0][0], reseeded[0][0])

    # each process takes its half of every global batch, augmented as in one process
    halves = [_batches(cfg, train, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(first, *halves):
        assert x0.shape[0] == 4 and torch.equal(torch.cat([x0, x1]), x)
        assert torch.equal(torch.cat([y0, y1]), y)


def test_training_batches_do_not_depend_on_the_number_of_workers():
    train = _images(20, chans=1)
    in_process = _batches(_config(1), train, epoch=3)
    in_workers = _batches(_config(1, **{"finetune.workers": 2}), train, epoch=3)
    for (x1, y1), (x2, y2) in zip(in_process, in_workers, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
