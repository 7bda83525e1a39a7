"""How chosen patches are corrupted: Gaussian noise (SPEC step 3), or zeros for MAE's display."""

from __future__ import annotations

import torch

from dsmae.config.choices import NoiseMode


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Expand a patch mask to pixels.

    Args:
        mask: (B, N) bool over a square grid of N patches (row-major, as ``patchify``).
        patch_size: p.

    Returns:
        (B, 1, H, W) bool with H = W = sqrt(N) * p.
    """
    b, n = mask.shape
    g = round(n**0.5)
    m = mask.reshape(b, 1, g, 1, g, 1).expand(b, 1, g, patch_size, g, patch_size)
    return m.reshape(b, 1, g * patch_size, g * patch_size)


def add_patch_noise(
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    std: float = 1.0,
    mode: NoiseMode = "add",
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Corrupt the selected patches with Gaussian noise; the others stay bit-identical.

    ``mode="add"``: ``x + std * eps``; ``mode="replace"``: ``std * eps`` (pure noise),
    with ``eps ~ N(0, 1)`` drawn per pixel, in the (normalised) space of ``images``.

    Args:
        images: (B, C, H, W).
        mask: (B, N) bool, True on the patches to corrupt.
        patch_size: p, with H = W = sqrt(N) * p.
        std: sigma.
        mode: "add" or "replace".
        eps: (B, C, H, W) standard-normal noise drawn beforehand; drawn here when None.
        generator: source of the noise when ``eps`` is None; its device is where the draw
            happens.

    Returns:
        (B, C, H, W), same dtype and device as ``images``.
    """
    if eps is None:
        draw_device = generator.device if generator is not None else images.device
        eps = torch.randn(images.shape, generator=generator, device=draw_device)
    noise = std * eps.to(device=images.device, dtype=images.dtype)
    if mode == "add":
        corrupted = images + noise
    elif mode == "replace":
        corrupted = noise
    else:
        raise ValueError(f"noise mode must be 'add' or 'replace', not {mode!r}")
    return torch.where(pixel_mask(mask, patch_size), corrupted, images)


def zero_patches(images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images with the selected patches set to 0 (MAE's masked input, for display).

    Args:
        images: (B, C, H, W).
        mask: (B, N) bool, True on the patches to blank.
        patch_size: p.

    Returns:
        (B, C, H, W).
    """
    return images.masked_fill(pixel_mask(mask, patch_size), 0.0)
