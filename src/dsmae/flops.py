"""Model FLOPs, counted by PyTorch's ``FlopCounterMode``: every matmul, attention's
included (on CPU too: the CPU fused-attention kernels get the CUDA kernels' formulas).

What FlopCounterMode counts for a backward pass: the matmuls actually run. A linear layer
whose input needs a gradient costs 2x its forward (grad input, grad weight); the patch
embedding costs 1x (the image needs no gradient); the fused attention backward costs 2.5x
its forward (five batched matmuls, QK^T recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dsmae.models import PretrainModel
from dsmae.runtime import autocast, generator

# the parts of a training step, as the model's stages run them (see :func:`part_steps`)
PARTS = ("student_fwd_bwd", "teacher_fwd", "decoder_fwd_bwd", "regressor_fwd_bwd")


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


def counted_flops(fn: Callable[[], Any]) -> int:
    """The FLOPs of running ``fn()`` (forward and any backward it runs)."""
    counter = flop_counter_mode()
    with counter:
        fn()
    return counter.get_total_flops()


def train_flops_per_image(model: PretrainModel, images: torch.Tensor) -> float:
    """FLOPs of one training forward + backward pass per image (teacher forward included,
    the optimizer and EMA update not).

    Args:
        images: (B, C, H, W) a sample batch on the model's device; gradients it leaves on
            the model are cleared.
    """

    def step() -> None:
        out = model(images, generator=torch.Generator(images.device).manual_seed(0))
        out.loss.backward()

    flops = counted_flops(step)
    model.zero_grad(set_to_none=True)
    return flops / images.shape[0]


def _trained(
    stage: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, leaf: bool, amp: bool
) -> Callable[[], None]:
    """A closure that runs ``stage(x)`` forward and backward (from the sum of its output),
    ``x`` as a fresh leaf that needs a gradient where ``leaf`` (as a head's input in the
    step), as given otherwise (an image)."""

    def run() -> None:
        inputs = x.clone().requires_grad_(True) if leaf else x
        with autocast(x.device, amp):
            out = stage(inputs)
        out.float().sum().backward()

    return run


def part_steps(
    model: PretrainModel, images: torch.Tensor, mask: torch.Tensor, *, amp: bool = False
) -> dict[str, Callable[[], None]]:
    """Each part of a training step (:data:`PARTS`) as a closure that runs the model's stage
    alone, on the shapes of the step: ``encode_student`` forward and backward,
    ``encode_teacher`` (no gradient), ``decode_pixels`` and ``regress_features`` forward
    and backward (their input needs a gradient, as in the step). Parts a model does not
    have are absent.

    Shapes are all that matters for counting and timing, so the student is fed the clean
    images and the heads its tokens of them. Running a part leaves gradients in the
    model; clear them after.

    Args:
        model: a pre-training model in train mode.
        images: (B, C, H, W) on the model's device.
        mask: (B, N) bool corruption mask.
        amp: run under bf16 autocast (as the step does on CUDA).
    """
    positions = model.student_positions(mask)
    with torch.no_grad():
        tokens = model.encode_student(images, positions)
    encode = partial(model.encode_student, positions=positions)
    parts = {"student_fwd_bwd": _trained(encode, images, leaf=False, amp=amp)}
    if model.teacher is not None:

        def teacher_fwd() -> None:
            with autocast(images.device, amp):
                model.encode_teacher(images, positions)

        parts["teacher_fwd"] = teacher_fwd
    if model.decoder is not None:
        decode = partial(model.decode_pixels, positions=positions)
        parts["decoder_fwd_bwd"] = _trained(decode, tokens, leaf=True, amp=amp)
    if model.regressor is not None:
        parts["regressor_fwd_bwd"] = _trained(model.regress_features, tokens, leaf=True, amp=amp)
    return parts


def count_step_flops(
    model: PretrainModel,
    images: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """FLOPs per image of one training step (forward and backward; the optimizer and the
    teacher update do no matmuls), in total and per part (see :func:`part_steps`).

    The whole step (``model(images).loss.backward()``) is counted for the total, and each
    part under its own counter: the parts add up to the total.

    Args:
        model: a pre-training model in train mode; the gradients it is left with are cleared.
        images: (B, C, H, W) on the model's device.
        mask, eps: the step's corruption; what is missing is drawn by the model from a
            generator seeded 0 (both when ``mask`` is None).
        amp: count under bf16 autocast (as the step runs on CUDA).

    Returns:
        ``{"total": ..., "student_fwd_bwd": ..., "teacher_fwd": ..., "decoder_fwd_bwd":
        ..., "regressor_fwd_bwd": ...}`` in FLOPs per image (absent parts 0).
    """
    device, batch = images.device, images.shape[0]
    rng = generator(0, device)
    if mask is None:
        mask, eps = model.sample_corruption(batch, rng, device)

    def whole_step() -> None:
        with autocast(device, amp):
            out = model(images, rng, mask=mask, eps=eps)
        out.loss.backward()

    total = counted_flops(whole_step)
    parts = dict.fromkeys(PARTS, 0)
    for name, run in part_steps(model, images, mask, amp=amp).items():
        parts[name] = counted_flops(run)
    model.zero_grad(set_to_none=True)
    return {"total": total / batch, **{k: v / batch for k, v in parts.items()}}
