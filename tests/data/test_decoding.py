"""Tests of dsmae.data.decoding: image files of any mode decoded, resized and
centre-cropped as torchvision does, and unreadable ones named or skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from image_checks import check_layout, save_image
from PIL import Image

from dsmae.data.decoding import decode_files
from dsmae.data.images import DataError
from dsmae.data.sources import open_source


def test_folder_resize_and_centre_crop_match_torchvision(tmp_path: Path) -> None:
    wide = save_image(tmp_path / "wide.png", 40, 18, seed=1)
    tall = save_image(tmp_path / "tall.png", 15, 33, seed=2)
    small = save_image(tmp_path / "small.png", 5, 7, seed=3)  # upsampled
    data = open_source(str(tmp_path), "train", root="unused", size=12)
    check_layout(data, channels=3)
    assert data.images.shape == (3, 3, 12, 12)

    reference = T.Compose([T.Resize(12), T.CenterCrop(12), T.PILToTensor()])
    for got, pixels in zip(data.images, [small, tall, wide], strict=True):  # sorted by name
        assert torch.equal(got, reference(Image.fromarray(pixels)))


def test_folder_native_size_mismatch(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", 8, 8)
    save_image(tmp_path / "b.png", 9, 8)
    with pytest.raises(DataError, match=r"different sizes.*b\.png.*size"):
        open_source(str(tmp_path), "train", root="unused")
    assert open_source(str(tmp_path), "train", root="unused", size=8).images.shape == (2, 3, 8, 8)


def test_folder_corrupt_file(tmp_path: Path) -> None:
    save_image(tmp_path / "good.png", 4, 4)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        open_source(str(tmp_path), "train", root="unused")


def test_folder_truncated_jpeg_names_the_file_or_is_skipped(tmp_path: Path, caplog) -> None:
    for i in range(3):
        save_image(tmp_path / f"ok{i}.jpg", 6, 6, seed=i)
    whole = (tmp_path / "ok0.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a download cut short
    with pytest.raises(DataError, match=r"cut\.jpg.*--skip-bad-images"):
        open_source(str(tmp_path), "train", root="unused")
    data = open_source(str(tmp_path), "train", root="unused", skip_bad=True)
    assert len(data) == 3 and data.labels.tolist() == [-1, -1, -1]
    assert "skipped 1 unreadable image(s) of 4" in caplog.text and "cut.jpg" in caplog.text


def test_folder_where_no_file_is_readable(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="None of the 1 image files"):
        open_source(str(tmp_path), "train", root="unused", skip_bad=True)


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
    data = open_source(str(tmp_path), "train", root="unused")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert data.images.shape == (7, 3, 5, 5)
    images = dict(zip(names, data.images, strict=True))
    assert torch.equal(images["rgba.png"], torch.from_numpy(rgb).permute(2, 0, 1))
    grey = torch.from_numpy(np.array(base.convert("L")))
    assert torch.equal(images["grey_alpha.png"][0], grey)
    assert torch.equal(images["sixteen.png"][:, 0], torch.tensor([[0, 1, 128, 255, 255]] * 3))
    assert images["cmyk.jpg"].float().std() > 10  # real content, not a blank


def test_images_smaller_than_the_crop_are_resized(tmp_path: Path) -> None:
    save_image(tmp_path / "tiny.png", 3, 4)
    data = open_source(str(tmp_path), "train", root="unused", size=16)
    assert data.images.shape == (1, 3, 16, 16)


def test_a_path_that_is_no_image_file_is_named_for_what_it_is(tmp_path):
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
