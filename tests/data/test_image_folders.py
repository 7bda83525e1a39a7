"""Tests of dsmae.data.image_folders: one split of a folder of images, labelled by its
class sub-folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from image_checks import check_layout, chw, pil_grey, save_image

from dsmae.data.images import DataError
from dsmae.data.sources import open_source


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    cat = save_image(root / "cat" / "a.png", 12, 10, seed=1)
    dog_b = save_image(root / "dog" / "b.png", 12, 10, seed=2)
    dog_c = save_image(root / "dog" / "deeper" / "c.PNG", 12, 10, seed=3)  # any case, nested
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"hidden files are skipped")

    for split in ("train", "pretrain"):
        data = open_source(str(root), split, root="unused")
        check_layout(data, channels=3)
        assert data.classes == ("cat", "dog")
        assert data.labels.tolist() == [0, 1, 1]
        expected = torch.stack([chw(cat), chw(dog_b), chw(dog_c)])
        assert torch.equal(data.images, expected)


def test_folder_without_class_subfolders_is_unlabelled(tmp_path: Path) -> None:
    save_image(tmp_path / "top.jpg", 8, 8, seed=1)
    save_image(tmp_path / "sub" / "inner.JPEG", 8, 8, seed=2)
    save_image(tmp_path / "x.bmp", 8, 8, seed=3)
    data = open_source(str(tmp_path), "pretrain", root="unused")
    check_layout(data, channels=3)
    assert len(data) == 3
    assert data.classes == ()
    assert data.labels.tolist() == [-1, -1, -1]


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_folder_train_test_layout(tmp_path: Path, held_out: str) -> None:
    for i, cls in enumerate("abc"):
        save_image(tmp_path / "train" / cls / f"{i}.png", 6, 6, seed=i)
    # the held-out split lacks class "b": labels must still follow the train numbering
    a = save_image(tmp_path / held_out / "a" / "x.png", 6, 6, seed=10)
    c = save_image(tmp_path / held_out / "c" / "y.png", 6, 6, seed=11)

    train = open_source(str(tmp_path), "train", root="unused")
    pretrain = open_source(str(tmp_path), "pretrain", root="unused")
    test = open_source(str(tmp_path), "test", root="unused")
    assert train.classes == test.classes == ("a", "b", "c")
    assert train.labels.tolist() == [0, 1, 2]
    assert torch.equal(pretrain.images, train.images)
    assert test.labels.tolist() == [0, 2]
    assert torch.equal(test.images, torch.stack([chw(a), chw(c)]))


def test_folder_test_split_missing(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    save_image(flat / "a.png", 4, 4)
    with pytest.raises(DataError, match=r"train/.*test/"):
        open_source(str(flat), "test", root="unused")

    only_train = tmp_path / "only_train"
    save_image(only_train / "train" / "a.png", 4, 4)
    assert len(open_source(str(only_train), "train", root="unused")) == 1
    with pytest.raises(DataError, match="test/"):
        open_source(str(only_train), "test", root="unused")


def test_folder_grey(tmp_path: Path) -> None:
    pixels = save_image(tmp_path / "a.png", 9, 7)
    data = open_source(str(tmp_path), "train", root="unused", channels=1)
    check_layout(data, channels=1)
    assert torch.equal(data.images[0, 0], torch.from_numpy(pil_grey(pixels)))


def test_folder_without_images(tmp_path: Path) -> None:
    empty = tmp_path / "nothing_here"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="nothing_here"):
        open_source(str(empty), "train", root="unused")


def test_skipping_keeps_labels_aligned(tmp_path: Path) -> None:
    save_image(tmp_path / "cat" / "a.png", 4, 4, seed=1)
    (tmp_path / "cat" / "b.png").write_bytes(b"broken")
    dog = save_image(tmp_path / "dog" / "c.png", 4, 4, seed=2)
    data = open_source(str(tmp_path), "train", root="unused", skip_bad=True)
    assert data.labels.tolist() == [0, 1] and data.classes == ("cat", "dog")
    assert torch.equal(data.images[1], torch.from_numpy(dog).permute(2, 0, 1))
