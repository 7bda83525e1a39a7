import torch

from dsmae.config import build_config
from dsmae.data.augment import crop_boxes
from dsmae.data.pipeline import augmented_batch, channel_stats, epoch_order, load_split


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a, b = epoch_order(10, seed=0, epoch=3), epoch_order(10, seed=0, epoch=3)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(10))
    assert not torch.equal(a, epoch_order(10, seed=0, epoch=4))
    assert not torch.equal(a, epoch_order(10, seed=1, epoch=3))


def test_channel_stats_by_hand():
    images = torch.zeros(2, 2, 2, 2, dtype=torch.uint8)
    images[:, 1] = 255
    images[0, 0] = 255  # channel 0: half the pixels at 1
    mean, std = channel_stats(images)
    assert mean[0] == 0.5 and mean[1] == 1.0
    assert abs(std[0] - torch.tensor([1.0] * 4 + [0.0] * 4).std().item()) < 1e-6


def test_digits_pipeline_gives_normalised_batches_at_the_model_size():
    cfg = build_config("quickstart")
    data = load_split(cfg.data, cfg.model, "pretrain")
    assert data.images.shape[1:] == (1, 8, 8)
    mean, std = channel_stats(data.images)
    boxes = crop_boxes(16, cfg.data.crop_scale, generator=torch.Generator().manual_seed(0))
    flips = torch.zeros(16, dtype=torch.bool)
    batch = augmented_batch(data.images[:16], 16, boxes, flips, mean, std)
    assert batch.shape == (16, 1, 16, 16) and batch.dtype == torch.float32


def test_subset_and_downscaling(tmp_path):
    cfg = build_config(
        "quickstart", overrides={"data.subset": 100, "model.img_size": 4, "model.patch_size": 2}
    )
    data = load_split(cfg.data, cfg.model, "pretrain")
    assert data.images.shape == (100, 1, 4, 4) and data.images.dtype == torch.uint8
