"""Writing test images and checking the splits loaded from them, for the tests of
:mod:`dsmae.data`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsmae.data.images import ImageTensors


def save_image(path: Path, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Write a random RGB image (format from the suffix); return its (H, W, 3) pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) -> (3, H, W) tensor."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def pil_grey(hwc: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H, W) via PIL's convert("L") for reference."""
    flat = hwc.reshape(-1, *hwc.shape[-3:])
    grey = [np.asarray(Image.fromarray(x).convert("L")) for x in flat]
    return np.stack(grey).reshape(hwc.shape[:-1])


def check_layout(data: ImageTensors, channels: int) -> None:
    assert data.images.dtype == torch.uint8
    assert data.images.is_contiguous()
    assert data.images.dim() == 4 and data.images.shape[1] == channels
    assert data.labels.dtype == torch.int64
    assert data.labels.shape == (len(data),)
