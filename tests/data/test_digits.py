"""Tests of dsmae.data.digits: scikit-learn's real digits, split 75/25."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from image_checks import check_layout

from dsmae.data.images import ImageTensors
from dsmae.data.sources import open_source


def _digits_pairs(data: ImageTensors) -> Counter[tuple[bytes, int]]:
    return Counter(
        (img.numpy().tobytes(), int(lab)) for img, lab in zip(data.images, data.labels, strict=True)
    )


def test_digits_splits_partition_the_real_data() -> None:
    from sklearn.datasets import load_digits

    train = open_source("digits", "train", root="unused", channels=1)
    test = open_source("digits", "test", root="unused", channels=1)
    pretrain = open_source("digits", "pretrain", root="unused", channels=1)
    for part in (train, test, pretrain):
        check_layout(part, channels=1)
        assert part.images.shape[2:] == (8, 8)
        assert part.classes == tuple(str(d) for d in range(10))

    bunch = load_digits()
    n = len(bunch.images)
    assert len(train) + len(test) == n
    assert len(train) == round(0.75 * n)
    # Every (image, label) of the original data is in exactly one split: disjoint and complete.
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)[:, None]
    all_pairs = Counter((x.tobytes(), int(y)) for x, y in zip(expected, bunch.target, strict=True))
    assert _digits_pairs(train) + _digits_pairs(test) == all_pairs
    # pretrain is the train split, never the test images
    assert torch.equal(pretrain.images, train.images)
    assert torch.equal(pretrain.labels, train.labels)


def test_digits_values_and_determinism() -> None:
    a = open_source("digits", "train", root="unused", channels=1)
    b = open_source("digits", "train", root="unused", channels=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert int(a.images.min()) == 0 and int(a.images.max()) == 255
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(a.images.unique().tolist()) <= allowed
    assert set(a.labels.tolist()) == set(range(10))


def test_digits_three_channels_repeat_grey() -> None:
    grey = open_source("digits", "test", root="unused", channels=1)
    rgb = open_source("digits", "test", root="unused")  # channels=3 is the default
    check_layout(rgb, channels=3)
    assert torch.equal(rgb.images, grey.images.repeat(1, 3, 1, 1))
    assert torch.equal(rgb.labels, grey.labels)


def test_the_shipped_table_is_what_load_digits_reads(monkeypatch):
    from sklearn.datasets import load_digits

    from dsmae.data import digits

    bunch = load_digits()
    table = digits.digits_table()
    assert table.shape == (1797, 65) and table.dtype == np.float64
    np.testing.assert_array_equal(table[:, :-1].reshape(-1, 8, 8), bunch.images)
    np.testing.assert_array_equal(table[:, -1].astype(np.int64), bunch.target)
    assert tuple(str(c) for c in bunch.target_names) == digits._CLASSES
    # where the file is not where scikit-learn keeps it: load_digits itself
    monkeypatch.setattr(digits, "_SHIPPED_TABLE", digits.Path("nowhere.csv.gz"))
    np.testing.assert_array_equal(digits.digits_table(), table)
