"""Model FLOPs, counted by PyTorch's ``FlopCounterMode``: every matmul, attention's
included (on CPU too: the CPU fused-attention kernels get the CUDA kernels' formulas)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dsmae.models import DSMAE


def _sdpa_cpu_flop(query, key, value, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flop(
    grad_out, query, key, value, *args: Any, out_shape=None, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_flop_formulas() -> dict[Any, Any]:
    """Formulas for ops FlopCounterMode does not know: the CPU fused attention kernels
    (``F.scaled_dot_product_attention`` on CPU), counted as the CUDA kernels are."""
    aten = torch.ops.aten
    extra: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flop
    return extra


def flop_counter_mode() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts attention on CPU."""
    return FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())


def train_flops_per_image(model: DSMAE, images: torch.Tensor) -> float:
    """FLOPs of one training forward + backward pass per image (teacher forward included,
    the optimizer and EMA update not).

    Args:
        images: (B, C, H, W) a sample batch on the model's device; gradients it leaves on
            the model are cleared.
    """
    counter = flop_counter_mode()
    with counter:
        out = model(images, generator=torch.Generator(images.device).manual_seed(0))
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]
