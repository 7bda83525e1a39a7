"""Fixtures of the model tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def _tokens_seen(model: torch.nn.Module, images: torch.Tensor) -> int:
    """How many tokens the student encoder's first block gets in a training forward."""
    seen = []
    handle = model.encoder.blocks[0].register_forward_pre_hook(
        lambda _, args: seen.append(args[0].shape[1])
    )
    model(images, generator=torch.Generator().manual_seed(0))
    handle.remove()
    return seen[0]


@pytest.fixture
def tokens_seen() -> Callable[[torch.nn.Module, torch.Tensor], int]:
    """``tokens_seen(model, images)``: how many tokens (B, T, D: T) the student encoder's
    first block gets in a training forward of ``images`` (noise drawn with seed 0)."""
    return _tokens_seen
