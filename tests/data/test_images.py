"""A split in memory: ``ImageTensors`` holds uint8 images and one label each."""

import pytest
import torch

from dsmae.data.images import ImageTensors

LABELS = torch.zeros(3, dtype=torch.int64)


def test_a_split_is_uint8_images_with_a_label_each():
    pixels = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    assert len(ImageTensors(pixels, torch.tensor([0, 1, -1]), ("a", "b"))) == 3
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\) uint8"):
        ImageTensors(pixels[:, 0], LABELS, ())
    with pytest.raises(ValueError, match=r"images must be"):
        ImageTensors(pixels.float(), LABELS, ())
    with pytest.raises(ValueError, match=r"labels must be \(3,\) int64"):
        ImageTensors(pixels, LABELS[:2], ())
