"""The validation split a grid chooses by, and the three figures it reads a cell by."""

import pytest
import torch

from dsmae.config import ConfigError, build_config
from dsmae.data.images import ImageTensors
from dsmae.evaluation.frozen import encoded
from dsmae.evaluation.knn import knn_accuracy
from dsmae.evaluation.linprobe import train_linear_probe
from dsmae.evaluation.validation import (
    carve_validation,
    grid_splits,
    score_encoder,
    stratified_indices,
)
from dsmae.models.vit import create_encoder


def test_stratified_indices_take_a_share_of_every_class():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 1 + [3] * 2)
    picked = stratified_indices(labels, 0.1, seed=0)
    counts = torch.bincount(labels[picked], minlength=4).tolist()
    assert counts == [1, 2, 0, 1]  # round(0.1 n), at least one of two, never a whole class
    assert torch.equal(picked, picked.sort().values)
    assert torch.equal(picked, stratified_indices(labels, 0.1, seed=0))  # seeded
    assert not torch.equal(picked, stratified_indices(labels, 0.1, seed=1))
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="fraction"):
            stratified_indices(labels, bad, seed=0)


def test_carving_splits_the_train_split_in_two():
    images = torch.arange(40, dtype=torch.uint8).reshape(40, 1, 1, 1)
    train = ImageTensors(images, torch.arange(40) % 4, ("a", "b", "c", "d"))
    rest, val = carve_validation(train, 0.3, seed=3)
    assert (len(rest), len(val)) == (28, 12)
    assert torch.bincount(val.labels).tolist() == [3, 3, 3, 3]
    seen = sorted(rest.images.flatten().tolist() + val.images.flatten().tolist())
    assert seen == list(range(40)) and rest.classes == val.classes == train.classes


def test_grid_splits_of_digits_are_recorded():
    cfg = build_config("quickstart")
    splits = grid_splits(cfg.data, cfg.model, 0.1, split_seed=0)
    assert splits.record["num_val"] == len(splits.val) == 135  # 10% of each digit of 1,348
    assert len(splits.bank) == 1348 - 135 and len(splits.test) == 449
    assert set(splits.record) >= {"data", "val_fraction", "split_seed", "val_indices_sha256"}
    again = grid_splits(cfg.data, cfg.model, 0.1, split_seed=0)
    assert again.record == splits.record and torch.equal(again.val.images, splits.val.images)
    other = grid_splits(cfg.data, cfg.model, 0.1, split_seed=1)
    assert other.record["val_indices_sha256"] != splits.record["val_indices_sha256"]
    capped = grid_splits(cfg.data, cfg.model, 0.1, split_seed=0, bank=300)
    assert abs(len(capped.bank) - 300) <= 10 and torch.equal(capped.val.images, splits.val.images)
    assert torch.bincount(capped.bank.labels).min() >= 25  # stratified, every class in
    with pytest.raises(ConfigError, match="--bank must be >= 1"):
        grid_splits(cfg.data, cfg.model, 0.1, split_seed=0, bank=0)


def test_score_encoder_reads_validation_and_test_against_the_same_bank():
    cfg = build_config("quickstart", overrides={"probe.epochs": 3, "data.mean": [0.3],
                                                "data.std": [0.3]})  # fmt: skip
    splits = grid_splits(cfg.data, cfg.model, 0.1, split_seed=0, bank=400)
    torch.manual_seed(0)
    encoder = create_encoder(cfg.model)
    figures = score_encoder(encoder, cfg, splits, torch.device("cpu"))
    feats = {
        name: encoded(encoder, part.images, cfg, "avg", torch.device("cpu"))
        for name, part in (("bank", splits.bank), ("val", splits.val), ("test", splits.test))
    }
    bank_labels = splits.bank.labels
    for name, part in (("val", splits.val), ("test", splits.test)):
        want = knn_accuracy(feats["bank"], bank_labels, feats[name], part.labels, 10, k=20,
                            temperature=0.07)  # fmt: skip
        assert figures[f"{name}_knn"] == want
    probe, _ = train_linear_probe(feats["bank"], bank_labels, feats["test"], splits.test.labels,
                                  10, cfg.probe, seed=0)  # fmt: skip
    assert figures["test_linprobe"] == probe
