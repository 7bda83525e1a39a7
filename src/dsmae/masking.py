"""Which patches to corrupt: the seeded noise mask of SPEC step 2 (and MAE's random mask).

Every function that draws random numbers takes a ``torch.Generator``; with the same
generator state the same mask comes out, and nothing touches the global RNG when a
generator is given.
"""

from __future__ import annotations

import torch


def num_selected(num_patches: int, ratio: float) -> int:
    """How many of ``num_patches`` patches a ratio selects: ``round(ratio * num_patches)``.

    Python's ``round`` (ties to even) is the rule; e.g. 0.9 of 256 patches is 230.
    """
    return round(ratio * num_patches)


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Choose ``round(ratio * N)`` patches per image, uniformly without replacement.

    Each image gets its own independent draw (a random permutation of its N patches,
    whose first K entries are selected).

    Args:
        batch_size: B.
        num_patches: N.
        ratio: fraction of patches to select, in (0, 1].
        generator: source of randomness; its device is where the draw happens.
        device: where the mask is returned (default: the generator's device, else CPU).

    Returns:
        (B, N) bool, True on the selected patches, exactly K = round(ratio * N) per row.
    """
    k = num_selected(num_patches, ratio)
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(batch_size, num_patches, generator=generator, device=draw_device)
    chosen = scores.argsort(dim=1)[:, :k]
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=draw_device)
    mask.scatter_(1, chosen, True)
    return mask.to(device) if device is not None else mask


def split_indices(mask: torch.Tensor, num_true: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the selected and of the other patches, each in ascending patch order.

    Needs no host synchronisation (unlike ``mask.nonzero()``): a stable sort of the
    mask puts the ``num_true`` selected patches first, both halves keeping their order.

    Args:
        mask: (B, N) bool with exactly ``num_true`` True entries per row.
        num_true: K.

    Returns:
        selected (B, K) int64 and others (B, N - K) int64.
    """
    order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
    return order[:, :num_true], order[:, num_true:]
