"""Model FLOPs, counted by PyTorch's ``FlopCounterMode`` (every matmul, attention's included)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dsmae.models import DSMAE


def train_flops_per_image(model: DSMAE, images: torch.Tensor) -> float:
    """FLOPs of one training forward + backward pass per image (teacher forward included,
    the optimizer and EMA update not).

    Args:
        images: (B, C, H, W) a sample batch on the model's device; gradients it leaves on
            the model are cleared.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(images, generator=torch.Generator(images.device).manual_seed(0))
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]
