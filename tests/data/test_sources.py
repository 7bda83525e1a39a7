"""Tests of dsmae.data.sources: digits, folders of images, and torchvision data sets.

The torchvision tests run without internet: they write tiny CIFAR-10 / STL-10 archives in
torchvision's own file formats, serve them from a local HTTP server on 127.0.0.1 and point the
data set classes at them, so torchvision's real download, checksum, extraction and parsing code
runs. (``file://`` URLs cannot be used: torchvision's downloader reads ``response.length``,
which urllib's file responses lack.)
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
import torchvision.transforms as T
from PIL import Image
from torchvision_fakes import (
    Serve,
    patch_cifar10,
    patch_stl10,
    write_fake_cifar10,
    write_fake_stl10,
)

from dsmae.data.sources import DATASETS, DataError, ImageTensors, load_images

# --------------------------------------------------------------------------------------------
# helpers


def _save_image(path: Path, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Write a random RGB image (format from the suffix); return its (H, W, 3) pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) -> (3, H, W) tensor."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _pil_grey(hwc: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H, W) via PIL's convert("L") for reference."""
    flat = hwc.reshape(-1, *hwc.shape[-3:])
    grey = [np.asarray(Image.fromarray(x).convert("L")) for x in flat]
    return np.stack(grey).reshape(hwc.shape[:-1])


def _check_layout(data: ImageTensors, channels: int) -> None:
    assert data.images.dtype == torch.uint8
    assert data.images.is_contiguous()
    assert data.images.dim() == 4 and data.images.shape[1] == channels
    assert data.labels.dtype == torch.int64
    assert data.labels.shape == (len(data),)


# --------------------------------------------------------------------------------------------
# digits


def _digits_pairs(data: ImageTensors) -> Counter[tuple[bytes, int]]:
    return Counter(
        (img.numpy().tobytes(), int(lab)) for img, lab in zip(data.images, data.labels, strict=True)
    )


def test_digits_splits_partition_the_real_data() -> None:
    from sklearn.datasets import load_digits

    train = load_images("digits", "train", root="unused", channels=1)
    test = load_images("digits", "test", root="unused", channels=1)
    pretrain = load_images("digits", "pretrain", root="unused", channels=1)
    for part in (train, test, pretrain):
        _check_layout(part, channels=1)
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
    a = load_images("digits", "train", root="unused", channels=1)
    b = load_images("digits", "train", root="unused", channels=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert int(a.images.min()) == 0 and int(a.images.max()) == 255
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(a.images.unique().tolist()) <= allowed
    assert set(a.labels.tolist()) == set(range(10))


def test_digits_three_channels_repeat_grey() -> None:
    grey = load_images("digits", "test", root="unused", channels=1)
    rgb = load_images("digits", "test", root="unused")  # channels=3 is the default
    _check_layout(rgb, channels=3)
    assert torch.equal(rgb.images, grey.images.repeat(1, 3, 1, 1))
    assert torch.equal(rgb.labels, grey.labels)


# --------------------------------------------------------------------------------------------
# folders


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    cat = _save_image(root / "cat" / "a.png", 12, 10, seed=1)
    dog_b = _save_image(root / "dog" / "b.png", 12, 10, seed=2)
    dog_c = _save_image(root / "dog" / "deeper" / "c.PNG", 12, 10, seed=3)  # any case, nested
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"hidden files are skipped")

    for split in ("train", "pretrain"):
        data = load_images(str(root), split, root="unused")
        _check_layout(data, channels=3)
        assert data.classes == ("cat", "dog")
        assert data.labels.tolist() == [0, 1, 1]
        expected = torch.stack([_chw(cat), _chw(dog_b), _chw(dog_c)])
        assert torch.equal(data.images, expected)


def test_folder_without_class_subfolders_is_unlabelled(tmp_path: Path) -> None:
    _save_image(tmp_path / "top.jpg", 8, 8, seed=1)
    _save_image(tmp_path / "sub" / "inner.JPEG", 8, 8, seed=2)
    _save_image(tmp_path / "x.bmp", 8, 8, seed=3)
    data = load_images(str(tmp_path), "pretrain", root="unused")
    _check_layout(data, channels=3)
    assert len(data) == 3
    assert data.classes == ()
    assert data.labels.tolist() == [-1, -1, -1]


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_folder_train_test_layout(tmp_path: Path, held_out: str) -> None:
    for i, cls in enumerate("abc"):
        _save_image(tmp_path / "train" / cls / f"{i}.png", 6, 6, seed=i)
    # the held-out split lacks class "b": labels must still follow the train numbering
    a = _save_image(tmp_path / held_out / "a" / "x.png", 6, 6, seed=10)
    c = _save_image(tmp_path / held_out / "c" / "y.png", 6, 6, seed=11)

    train = load_images(str(tmp_path), "train", root="unused")
    pretrain = load_images(str(tmp_path), "pretrain", root="unused")
    test = load_images(str(tmp_path), "test", root="unused")
    assert train.classes == test.classes == ("a", "b", "c")
    assert train.labels.tolist() == [0, 1, 2]
    assert torch.equal(pretrain.images, train.images)
    assert test.labels.tolist() == [0, 2]
    assert torch.equal(test.images, torch.stack([_chw(a), _chw(c)]))


def test_folder_test_split_missing(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _save_image(flat / "a.png", 4, 4)
    with pytest.raises(DataError, match=r"train/.*test/"):
        load_images(str(flat), "test", root="unused")

    only_train = tmp_path / "only_train"
    _save_image(only_train / "train" / "a.png", 4, 4)
    assert len(load_images(str(only_train), "train", root="unused")) == 1
    with pytest.raises(DataError, match="test/"):
        load_images(str(only_train), "test", root="unused")


def test_folder_resize_and_centre_crop_match_torchvision(tmp_path: Path) -> None:
    wide = _save_image(tmp_path / "wide.png", 40, 18, seed=1)
    tall = _save_image(tmp_path / "tall.png", 15, 33, seed=2)
    small = _save_image(tmp_path / "small.png", 5, 7, seed=3)  # upsampled
    data = load_images(str(tmp_path), "train", root="unused", size=12)
    _check_layout(data, channels=3)
    assert data.images.shape == (3, 3, 12, 12)

    reference = T.Compose([T.Resize(12), T.CenterCrop(12), T.PILToTensor()])
    for got, pixels in zip(data.images, [small, tall, wide], strict=True):  # sorted by name
        assert torch.equal(got, reference(Image.fromarray(pixels)))


def test_folder_grey(tmp_path: Path) -> None:
    pixels = _save_image(tmp_path / "a.png", 9, 7)
    data = load_images(str(tmp_path), "train", root="unused", channels=1)
    _check_layout(data, channels=1)
    assert torch.equal(data.images[0, 0], torch.from_numpy(_pil_grey(pixels)))


def test_folder_native_size_mismatch(tmp_path: Path) -> None:
    _save_image(tmp_path / "a.png", 8, 8)
    _save_image(tmp_path / "b.png", 9, 8)
    with pytest.raises(DataError, match=r"different sizes.*b\.png.*size"):
        load_images(str(tmp_path), "train", root="unused")
    assert load_images(str(tmp_path), "train", root="unused", size=8).images.shape == (2, 3, 8, 8)


def test_folder_without_images(tmp_path: Path) -> None:
    empty = tmp_path / "nothing_here"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="nothing_here"):
        load_images(str(empty), "train", root="unused")


def test_folder_corrupt_file(tmp_path: Path) -> None:
    _save_image(tmp_path / "good.png", 4, 4)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        load_images(str(tmp_path), "train", root="unused")


def test_folder_truncated_jpeg_names_the_file_or_is_skipped(tmp_path: Path, caplog) -> None:
    for i in range(3):
        _save_image(tmp_path / f"ok{i}.jpg", 6, 6, seed=i)
    whole = (tmp_path / "ok0.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a download cut short
    with pytest.raises(DataError, match=r"cut\.jpg.*--skip-bad-images"):
        load_images(str(tmp_path), "train", root="unused")
    data = load_images(str(tmp_path), "train", root="unused", skip_bad=True)
    assert len(data) == 3 and data.labels.tolist() == [-1, -1, -1]
    assert "skipped 1 unreadable image(s) of 4" in caplog.text and "cut.jpg" in caplog.text


def test_skipping_keeps_labels_aligned(tmp_path: Path) -> None:
    _save_image(tmp_path / "cat" / "a.png", 4, 4, seed=1)
    (tmp_path / "cat" / "b.png").write_bytes(b"broken")
    dog = _save_image(tmp_path / "dog" / "c.png", 4, 4, seed=2)
    data = load_images(str(tmp_path), "train", root="unused", skip_bad=True)
    assert data.labels.tolist() == [0, 1] and data.classes == ("cat", "dog")
    assert torch.equal(data.images[1], torch.from_numpy(dog).permute(2, 0, 1))


def test_folder_where_no_file_is_readable(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="None of the 1 image files"):
        load_images(str(tmp_path), "train", root="unused", skip_bad=True)


def test_every_image_mode_is_converted(tmp_path: Path) -> None:
    """Grey, grey+alpha, RGBA, palette, 1-bit, CMYK and 16-bit files all load as RGB."""
    rgb = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    base.convert("L").save(tmp_path / "grey.png")
    base.convert("LA").save(tmp_path / "grey_alpha.png")
    base.convert("RGBA").save(tmp_path / "rgba.png")
    base.convert("P").save(tmp_path / "palette.png")
    base.convert("1").save(tmp_path / "bilevel.png")
    base.convert("CMYK").save(tmp_path / "cmyk.jpg")
    wide = np.array([[0, 257, 32896, 65535, 65535]] * 5, dtype=np.uint16)  # 0, 1, 128, 255
    Image.fromarray(wide).save(tmp_path / "sixteen.png")
    data = load_images(str(tmp_path), "train", root="unused")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert data.images.shape == (7, 3, 5, 5)
    images = dict(zip(names, data.images, strict=True))
    assert torch.equal(images["rgba.png"], torch.from_numpy(rgb).permute(2, 0, 1))
    grey = torch.from_numpy(np.array(base.convert("L")))
    assert torch.equal(images["grey_alpha.png"][0], grey)
    assert torch.equal(images["sixteen.png"][:, 0], torch.tensor([[0, 1, 128, 255, 255]] * 3))
    assert images["cmyk.jpg"].float().std() > 10  # real content, not a blank


def test_images_smaller_than_the_crop_are_resized(tmp_path: Path) -> None:
    _save_image(tmp_path / "tiny.png", 3, 4)
    data = load_images(str(tmp_path), "train", root="unused", size=16)
    assert data.images.shape == (1, 3, 16, 16)


# --------------------------------------------------------------------------------------------
# argument checks


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_images(str(tmp_path / "no_such_thing"), "train", root=tmp_path)
    message = str(info.value)
    assert all(name in message for name in DATASETS)
    assert "folder" in message


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_bad_channels(channels: int) -> None:
    with pytest.raises(ValueError, match="channels"):
        load_images("digits", "train", root="unused", channels=channels)


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_images("digits", "validation", root="unused")


# --------------------------------------------------------------------------------------------
# torchvision data sets (no internet: file:// archives in torchvision's formats)


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
    train = load_images(name, "train", root=root, download=True)
    _check_layout(train, channels=3)
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
    pretrain = load_images("cifar10", "pretrain", root=root)
    assert torch.equal(pretrain.images, train.images)
    test = load_images("cifar10", "test", root=root)
    test_rows, test_labels = fake["test"]
    assert torch.equal(test.images, torch.from_numpy(test_rows.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == test_labels

    grey = load_images("cifar10", "test", root=root, channels=1)
    _check_layout(grey, channels=1)
    hwc = test_rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert torch.equal(grey.images[:, 0], torch.from_numpy(_pil_grey(hwc)))


def test_stl10_download_and_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> None:
    fake, root, train = _downloaded("stl10", tmp_path, monkeypatch, serve)
    assert (root / "stl10_binary" / "unlabeled_X.bin").is_file()
    train_x, train_y = fake["train"]
    assert torch.equal(train.images, torch.from_numpy(train_x))  # column-major undone
    assert train.labels.tolist() == train_y.tolist()
    assert train.classes == tuple(fake["classes"])

    pretrain = load_images("stl10", "pretrain", root=root)
    unlabeled = fake["unlabeled"]
    assert torch.equal(pretrain.images, torch.from_numpy(np.concatenate([train_x, unlabeled])))
    assert pretrain.labels.tolist() == train_y.tolist() + [-1] * len(unlabeled)

    test = load_images("stl10", "test", root=root, channels=1)
    test_x, test_y = fake["test"]
    _check_layout(test, channels=1)
    assert torch.equal(test.images[:, 0], torch.from_numpy(_pil_grey(test_x.transpose(0, 2, 3, 1))))
    assert test.labels.tolist() == test_y.tolist()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_missing_without_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_images(name, "train", root=tmp_path)
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
        load_images("cifar10", "train", root=tmp_path / "data", download=True)


def test_download_corrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    fake = write_fake_cifar10(tmp_path / "server")
    patch_cifar10(monkeypatch, fake, serve)
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(DataError, match="could not be downloaded intact"):
        load_images("cifar10", "train", root=tmp_path / "data", download=True)


def test_a_path_that_is_no_image_file_is_named_for_what_it_is(tmp_path):
    from dsmae.data.sources import decode_files

    (tmp_path / "folder.png").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "garbage.png").write_bytes(b"\x00" * 64)
    said = {
        "missing.png": "Cannot read image {}: no such file",
        "folder.png": "Cannot read image {}: it is a folder, not an image file",
        "link.png": f"Cannot read image {{}}: it is a link to {tmp_path / 'gone.png'}, which "
        "does not exist",
        "garbage.png": "Cannot read image {}: not an image file that can be read (an unknown "
        "format, or damaged)",
    }
    for name, message in said.items():
        with pytest.raises(DataError) as refused:
            decode_files([tmp_path / name], channels=1, size=8, offer_skip=False)
        text = str(refused.value)
        assert message.format(tmp_path / name) in text, text
        assert "Remove it." not in text and "object at 0x" not in text
