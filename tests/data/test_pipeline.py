import torch

from dsmae.config import build_config
from dsmae.data.pipeline import augmented_batch, channel_stats, epoch_batches, load_split


def test_epoch_batches_drop_the_last_partial_batch_and_cover_without_repeats():
    batches = list(epoch_batches(10, 3, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 3, 3]
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == 9


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
    batch = augmented_batch(data.images[:16], 16, cfg.data, mean, std, torch.Generator())
    assert batch.shape == (16, 1, 16, 16) and batch.dtype == torch.float32


def test_subset_and_downscaling(tmp_path):
    cfg = build_config(
        "quickstart", overrides={"data.subset": 100, "model.img_size": 4, "model.patch_size": 2}
    )
    data = load_split(cfg.data, cfg.model, "pretrain")
    assert data.images.shape == (100, 1, 4, 4) and data.images.dtype == torch.uint8
