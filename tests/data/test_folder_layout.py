"""Tests of dsmae.data.folder_layout: the image files of a folder, and the classes its
split folders name."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_checks import save_image

from dsmae.data.folder_layout import find_image_files, folder_classes, split_folders
from dsmae.data.images import DataError


def test_image_files_are_found_recursively_sorted_and_hidden_ones_skipped(tmp_path: Path) -> None:
    save_image(tmp_path / "b" / "deeper" / "z.PNG", 4, 4)
    save_image(tmp_path / "a.jpg", 4, 4)
    save_image(tmp_path / ".hidden" / "x.png", 4, 4)
    save_image(tmp_path / "b" / ".y.png", 4, 4)
    (tmp_path / "notes.txt").write_text("not an image")
    found = find_image_files(tmp_path)
    assert found == [tmp_path / "a.jpg", tmp_path / "b" / "deeper" / "z.PNG"]


def test_a_folder_without_images_or_no_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"No images found in .*empty \(looked recursively"):
        find_image_files(tmp_path / "empty")
    with pytest.raises(DataError, match="is not a folder"):
        find_image_files(tmp_path / "missing")


def test_a_held_out_folder_without_images_names_no_classes(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        save_image(tmp_path / "train" / name / "a.png", 4, 4)
    (tmp_path / "test").mkdir()
    split, all_splits = split_folders(tmp_path, "train")
    assert split == tmp_path / "train" and all_splits == [split, tmp_path / "test"]
    assert folder_classes(all_splits) == ("cat", "dog")
