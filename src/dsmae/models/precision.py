"""Keeping a bf16 step in bf16: two switches of the pre-training step under autocast.

Under bf16 autocast the matmuls run in bf16, but the residual stream of every transformer
stays fp32: the tokens become fp32 where the fp32 position embedding is added, each block
adds its bf16 branches to them in fp32, and LayerNorm, on autocast's fp32 list, reads and
writes fp32. Every block then moves twice the bytes it needs to, which costs most where
the matmuls are small (ViT-Tiny's width 192). Two switches, each off by default:

- ``train.bf16_residual`` (:func:`keep_residual_in_autocast_dtype`): each transformer
  block's input is cast to the autocast dtype, so the residual stream is bf16 from the
  position embedding on, in the encoders, the decoder and the regressor;
- ``train.fast_norm`` (:func:`fast_norms`): timm's fast norm, every LayerNorm reading and
  writing the autocast dtype (the kernel still accumulates its statistics in fp32).

Both do nothing without autocast (fp32 steps, evaluation, the monitors) and change no
weight and no state-dict key. A switch goes on by default only once a GPU has measured it
faster with results unchanged (``benchmarks/gpu_check.py``, its speed stage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from timm.layers import is_fast_norm, set_fast_norm
from timm.models.vision_transformer import Block
from torch import nn


@contextlib.contextmanager
def fast_norms(enabled: bool) -> Iterator[None]:
    """Inside, the timm LayerNorms built use timm's fast norm when ``enabled`` (under
    autocast: input, weight and bias cast to the autocast dtype, normalised with autocast
    off); timm's process-wide default is restored on leaving."""
    before = is_fast_norm()
    set_fast_norm(enabled)
    try:
        yield
    finally:
        set_fast_norm(before)


def keep_residual_in_autocast_dtype(model: nn.Module) -> int:
    """Cast the input of every timm ``Block`` of ``model`` to the autocast dtype while
    autocast is on (a forward pre-hook), so that the residual stream stays in it.

    Returns:
        the number of blocks hooked.
    """
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.register_forward_pre_hook(_to_autocast_dtype)
    return len(blocks)


def _to_autocast_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A forward pre-hook: the (B, T, D) tokens ``args[0]`` in the autocast dtype of their
    device where autocast is on there; unchanged (None) otherwise."""
    tokens = args[0]
    device = tokens.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return (tokens.to(torch.get_autocast_dtype(device)), *args[1:])
