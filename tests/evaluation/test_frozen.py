"""Frozen-encoder features of labelled splits (linear probe, k-NN). Of image folders:
tests/test_features.py."""

import pytest
import torch

from dsmae.checkpoint import Checkpoint
from dsmae.data.images import ImageTensors
from dsmae.evaluation.frozen import extract_features, frozen_features
from dsmae.evaluation.results import LabelledSplits


@pytest.fixture(scope="module")
def checkpoint(digits_run) -> Checkpoint:
    return Checkpoint.read(digits_run / "last.pt")


def test_features_are_frozen_encoder_outputs(checkpoint):
    encoder, cfg = checkpoint.encoder(), checkpoint.config
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    size = cfg.model.img_size
    token = extract_features(
        encoder, images, size=size, mean=cfg.data.mean, std=cfg.data.std, pool="cls"
    )
    avg = extract_features(
        encoder, images, size=size, mean=cfg.data.mean, std=cfg.data.std, pool="avg", batch_size=2
    )
    assert token.shape == avg.shape == (5, 32) and not torch.allclose(token, avg)


def _split(n: int, seed: int) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n) % 3, ("a", "b", "c"))


def test_frozen_features_of_both_splits_with_their_labels(checkpoint):
    splits = LabelledSplits(_split(7, 0), _split(4, 1), "mine")
    cfg, device = checkpoint.config, torch.device("cpu")
    feats = frozen_features(checkpoint.encoder(), splits, cfg, "cls", device)
    assert feats.train.shape == (7, 32) and feats.test.shape == (4, 32)
    assert feats.train.dtype == torch.float32 and feats.classes == ("a", "b", "c")
    assert torch.equal(feats.train_labels, splits.train.labels)
    assert torch.equal(feats.test_labels, splits.test.labels)
    m, d = cfg.model, cfg.data
    one = extract_features(checkpoint.encoder(), splits.test.images, size=m.img_size,
                           mean=d.mean, std=d.std, pool="cls")  # fmt: skip
    torch.testing.assert_close(feats.test, one)
