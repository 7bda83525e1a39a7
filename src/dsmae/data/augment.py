"""Batched, seeded image augmentation that runs wherever the batch is (CPU or GPU).

SPEC section 5: RandomResizedCrop(scale 0.2-1.0, ratio 3/4-4/3) and a horizontal flip,
done for a whole uint8 batch at once with one ``grid_sample`` (bilinear) instead of a
Python loop over images. Crop boxes are continuous (sub-pixel); a box drawn wider or
taller than the image is clipped to it (torchvision instead re-draws up to ten times).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel. images: (B, C, H, W) in [0, 1]."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * s + m


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, C, H, W) -> (B, C, size, size), bilinear, antialiased; no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


def crop_boxes(
    batch_size: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random crop boxes in units of the image side.

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``, width and
    height clipped to 1, position uniform among the positions that fit.

    Returns:
        (B, 4): x0, y0, w, h, each in [0, 1] with x0 + w <= 1 and y0 + h <= 1.
    """
    u = torch.rand(batch_size, 4, generator=generator, device=device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    return torch.stack([(1 - w) * u[:, 2], (1 - h) * u[:, 3], w, h], dim=1)


def crop_flip_resize(
    images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """Crop each image to its box, mirror it where ``flip``, and resample to ``size``.

    Args:
        images: (B, C, H, W) float.
        boxes: (B, 4) x0, y0, w, h in units of the image side (see :func:`crop_boxes`).
        flip: (B,) bool.
        size: output side.

    Returns:
        (B, C, size, size). The full box without flip at the input size is the identity.
    """
    x0, y0, w, h = boxes.to(images.dtype).unbind(dim=1)
    sign = 1.0 - 2.0 * flip.to(images.dtype)
    theta = torch.zeros(images.shape[0], 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * x0 + w - 1  # box centre in [-1, 1] coordinates
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_flips(
    batch_size: int,
    enabled: bool = True,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which images of a batch to mirror: each with probability 1/2 where ``enabled``
    (one uniform draw per image), none otherwise (nothing drawn). (B,) bool."""
    if not enabled:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return torch.rand(batch_size, generator=generator, device=device) < 0.5
