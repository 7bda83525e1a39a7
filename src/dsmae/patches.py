"""Images <-> patch sequences, in the token order of timm's ``PatchEmbed``.

Patches are numbered row-major over the ``(H/p, W/p)`` grid, the order in which a
timm ``PatchEmbed`` flattens its convolution output, so patch ``i`` of
:func:`patchify` is token ``1 + i`` of the encoder (token 0 is ``[CLS]``). Inside a
patch, pixels are ordered ``(row, column, channel)`` as in MAE.
"""

from __future__ import annotations

import torch


def grid_size(img_size: int, patch_size: int) -> int:
    """Number of patches along one side; raises if ``patch_size`` does not divide ``img_size``."""
    if img_size % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide image size {img_size}")
    return img_size // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split images into flattened patches.

    Args:
        images: (B, C, H, W), H and W divisible by ``patch_size``.
        patch_size: p.

    Returns:
        (B, N, p*p*C) with N = (H/p) * (W/p).
    """
    b, c, h, w = images.shape
    gh, gw = grid_size(h, patch_size), grid_size(w, patch_size)
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images.

    Args:
        patches: (B, N, p*p*C) with N a perfect square.
        patch_size: p.
        channels: C.

    Returns:
        (B, C, H, W) with H = W = sqrt(N) * p.
    """
    b, n, _ = patches.shape
    g = round(n**0.5)
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    x = patches.reshape(b, g, g, patch_size, patch_size, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, g * patch_size, g * patch_size)


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pick tokens by index, per image.

    Args:
        tokens: (B, N, D).
        indices: (B, K) int64 in [0, N).

    Returns:
        (B, K, D) with ``out[b, k] = tokens[b, indices[b, k]]``.
    """
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(tokens: torch.Tensor, indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inverse of :func:`gather_tokens`: (B, K, D) tokens put at ``indices`` of zeros (B, N, D)."""
    b, _, d = tokens.shape
    out = tokens.new_zeros(b, num_tokens, d)
    return out.scatter(1, indices.unsqueeze(-1).expand(-1, -1, d), tokens)
