"""Tests of dsmae.data.torchvision_sets: CIFAR-10 and STL-10 downloaded, read and refused.

The torchvision tests run without internet: they write tiny CIFAR-10 / STL-10 archives in
torchvision's own file formats, serve them from a local HTTP server on 127.0.0.1 and point the
data set classes at them, so torchvision's real download, checksum, extraction and parsing code
runs. (``file://`` URLs cannot be used: torchvision's downloader reads ``response.length``,
which urllib's file responses lack.)
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from image_checks import check_layout, pil_grey
from torchvision_fakes import (
    Serve,
    patch_cifar10,
    patch_stl10,
    write_fake_cifar10,
    write_fake_stl10,
)

from dsmae.data.images import DataError, ImageTensors
from dsmae.data.sources import open_source

_FAKES = {"cifar10": (write_fake_cifar10, patch_cifar10), "stl10": (write_fake_stl10, patch_stl10)}


def _downloaded(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> tuple[dict, Path, ImageTensors]:
    """The train split of ``name``, downloaded by torchvision from a fake of it served on
    127.0.0.1, checked for layout; with the fake's contents and the data root."""
    write_fake, patch = _FAKES[name]
    fake = write_fake(tmp_path / "server")
    patch(monkeypatch, fake, serve)
    root = tmp_path / "data"
    train = open_source(name, "train", root=root, download=True)
    check_layout(train, channels=3)
    return fake, root, train


def test_cifar10_download_and_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> None:
    fake, root, train = _downloaded("cifar10", tmp_path, monkeypatch, serve)
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()  # downloaded, extracted
    rows, labels = fake["train"]
    assert torch.equal(train.images, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == labels
    assert train.classes == tuple(fake["classes"])

    # already there: no download needed
    pretrain = open_source("cifar10", "pretrain", root=root)
    assert torch.equal(pretrain.images, train.images)
    test = open_source("cifar10", "test", root=root)
    test_rows, test_labels = fake["test"]
    assert torch.equal(test.images, torch.from_numpy(test_rows.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == test_labels

    grey = open_source("cifar10", "test", root=root, channels=1)
    check_layout(grey, channels=1)
    hwc = test_rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert torch.equal(grey.images[:, 0], torch.from_numpy(pil_grey(hwc)))


def test_stl10_download_and_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> None:
    fake, root, train = _downloaded("stl10", tmp_path, monkeypatch, serve)
    assert (root / "stl10_binary" / "unlabeled_X.bin").is_file()
    train_x, train_y = fake["train"]
    assert torch.equal(train.images, torch.from_numpy(train_x))  # column-major undone
    assert train.labels.tolist() == train_y.tolist()
    assert train.classes == tuple(fake["classes"])

    pretrain = open_source("stl10", "pretrain", root=root)
    unlabeled = fake["unlabeled"]
    assert torch.equal(pretrain.images, torch.from_numpy(np.concatenate([train_x, unlabeled])))
    assert pretrain.labels.tolist() == train_y.tolist() + [-1] * len(unlabeled)

    test = open_source("stl10", "test", root=root, channels=1)
    test_x, test_y = fake["test"]
    check_layout(test, channels=1)
    assert torch.equal(test.images[:, 0], torch.from_numpy(pil_grey(test_x.transpose(0, 2, 3, 1))))
    assert test.labels.tolist() == test_y.tolist()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_missing_without_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="not found") as info:
        open_source(name, "train", root=tmp_path)
    message = str(info.value)
    assert "--download" in message and str(tmp_path) in message


def _closed_port() -> int:
    """A local port with nothing listening on it (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    url = f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz"
    monkeypatch.setattr(tvd.CIFAR10, "url", url)
    with pytest.raises(DataError, match=r"Downloading CIFAR-10 .* failed"):
        open_source("cifar10", "train", root=tmp_path / "data", download=True)


def test_download_corrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    fake = write_fake_cifar10(tmp_path / "server")
    patch_cifar10(monkeypatch, fake, serve)
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(DataError, match="could not be downloaded intact"):
        open_source("cifar10", "train", root=tmp_path / "data", download=True)
