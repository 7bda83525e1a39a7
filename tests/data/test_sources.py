"""Tests of dsmae.data.sources: the one entry point to every kind of source refuses what
none of them serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsmae.data.images import DataError
from dsmae.data.sources import DATASETS, check_available, open_source


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        open_source(str(tmp_path / "no_such_thing"), "train", root=tmp_path)
    message = str(info.value)
    assert all(name in message for name in DATASETS)
    assert "folder" in message


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_bad_channels(channels: int) -> None:
    with pytest.raises(ValueError, match="channels"):
        open_source("digits", "train", root="unused", channels=channels)


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        open_source("digits", "validation", root="unused")


def test_check_available_names_what_is_missing_without_loading(tmp_path: Path) -> None:
    check_available("digits", root=tmp_path)
    check_available("cifar10", root=tmp_path, download=True)  # torchvision will fetch it
    check_available(str(tmp_path), root="unused")
    with pytest.raises(DataError, match=r"CIFAR-100 was not found under .*--download"):
        check_available("cifar100", root=tmp_path)
    with pytest.raises(DataError, match="Unknown data set"):
        check_available(str(tmp_path / "no_such_thing"), root=tmp_path)
