"""The paper's Fig. 2 layout: noisy / denoised / original, two triplets per row.

With the normalised-pixel target the model predicts each patch up to its mean and
scale. Those are estimated WITHOUT looking at the clean patch: for added noise from
the noisy patch itself (its mean, and its variance minus the known noise variance);
for replaced or masked patches (no information left in them) from the clean patches
of the same image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsmae.data.augment import denormalize
from dsmae.losses import PATCH_NORM_EPS
from dsmae.models import DSMAE
from dsmae.patches import patchify, unpatchify


def estimate_patch_stats(
    student_patches: torch.Tensor, mask: torch.Tensor, noise_std: float, noise_added: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each corrupted patch's clean pixels, estimated.

    Args:
        student_patches: (B, N, P) patches of the student's input.
        mask: (B, N) bool, True on corrupted patches.
        noise_std: sigma of the added noise.
        noise_added: the corrupted patches are clean + noise (else they carry no signal).

    Returns:
        mean and std, each (B, N, 1).
    """
    mean = student_patches.mean(dim=-1, keepdim=True)
    var = student_patches.var(dim=-1, keepdim=True, unbiased=False)
    if noise_added:
        p = student_patches.shape[-1]
        var = (var - noise_std**2 * (p - 1) / p).clamp(min=0)
    else:
        clean = (~mask).unsqueeze(-1).to(student_patches.dtype)
        count = clean.sum(dim=1, keepdim=True).clamp(min=1)
        mean = ((mean * clean).sum(dim=1, keepdim=True) / count).expand_as(mean)
        var = ((var * clean).sum(dim=1, keepdim=True) / count).expand_as(var)
    return mean, torch.sqrt(var + PATCH_NORM_EPS)


@torch.no_grad()
def denoise(
    model: DSMAE, images: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Corrupt ``images`` as in pre-training and reconstruct them.

    Args:
        images: (B, C, H, W) normalised.

    Returns:
        the student's input and the reconstruction (clean patches kept, corrupted ones
        predicted), each (B, C, H, W) normalised; None for a model without a decoder.
    """
    was_training = model.training
    model.eval()
    out = model(images, generator=generator)
    model.train(was_training)
    if out.pred is None:
        return None
    p, c = model.patch_size, images.shape[1]
    pred = out.pred.float()
    if model.config.norm_pix_loss:
        noise_added = model.method != "mae" and model.config.noise_mode == "add"
        mean, std = estimate_patch_stats(
            patchify(out.noisy, p), out.mask, model.config.noise_std, noise_added
        )
        pred = pred * std + mean
    patches = torch.where(out.mask.unsqueeze(-1), pred, patchify(images, p))
    return out.noisy, unpatchify(patches, p, c)


def to_uint8_images(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Normalised (B, C, H, W) -> (B, H, W, C) uint8 for display."""
    x = denormalize(images.float().cpu(), mean, std).clamp(0, 1)
    return (x.mul(255).round().byte().permute(0, 2, 3, 1)).numpy()


def triplet_grid(
    columns: Sequence[np.ndarray], per_row: int = 2, scale: int = 1, gap: int = 2
) -> Image.Image:
    """Lay out images as rows of ``per_row`` groups; each group shows one image of every
    column side by side (e.g. noisy / denoised / original).

    Args:
        columns: each (B, H, W, C) uint8, all the same shape.
        per_row: groups per row.
        scale: integer up-scaling (nearest neighbour), for small images.
        gap: white pixels between images (doubled between groups).
    """
    b, h, w, c = columns[0].shape
    h, w = h * scale, w * scale
    rows = (b + per_row - 1) // per_row
    group_w = len(columns) * w + (len(columns) - 1) * gap
    width = per_row * group_w + (per_row + 1) * 2 * gap
    height = rows * h + (rows + 1) * 2 * gap
    canvas = np.full((height, width, c), 255, dtype=np.uint8)
    for i in range(b):
        top = 2 * gap + (i // per_row) * (h + 2 * gap)
        left = 2 * gap + (i % per_row) * (group_w + 2 * gap)
        for j, col in enumerate(columns):
            img = col[i].repeat(scale, axis=0).repeat(scale, axis=1)
            x = left + j * (w + gap)
            canvas[top : top + h, x : x + w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_denoise_figure(
    model: DSMAE,
    images: torch.Tensor,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
) -> Path | None:
    """Write the Fig. 2 grid (noisy / denoised / original) of ``images`` (normalised,
    (B, C, H, W)) to ``path`` as PNG; returns None for a model without a decoder."""
    result = denoise(model, images, generator)
    if result is None:
        return None
    noisy, restored = result
    columns = [to_uint8_images(x, mean, std) for x in (noisy, restored, images)]
    scale = max(1, 96 // images.shape[-1])
    path = Path(path)
    triplet_grid(columns, per_row=2, scale=scale).save(path)
    return path
