"""One pre-training step, as ``dsmae pretrain`` and ``dsmae bench`` both run it
(:class:`PretrainStep`): this process's share of the step's global batch gathered (from
the data set in memory, or a stream of shards: :class:`Batches`), its random choices drawn
(:func:`draw_step`), augmented on the device, forward, backward and optimizer
(:func:`train_step`), and the teacher moved where the schedule says.

Every random choice of a step (crop boxes, flips, noise mask, noise) is drawn for the
GLOBAL batch from a generator seeded by ``(seed, step)``, and the data order of an epoch
depends only on ``(seed, epoch)``. So a run resumed from any step, or run on another
number of processes with the same global batch, takes the same steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from dsmae.config import Config
from dsmae.data.augment import crop_boxes, random_flips
from dsmae.data.pipeline import augmented_batch, epoch_order
from dsmae.data.shards import ShardStream
from dsmae.models import PretrainModel
from dsmae.pretrain.schedule import Schedule
from dsmae.runtime import attention_kernel, autocast, generator, use_amp
from dsmae.seeds import pretrain_step_seed


def step_unless_non_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` where ``finite`` (a 0-d bool tensor) is True; else nothing changes.

    A fused Adam(W) takes the decision on the device, through the ``found_inf`` input that
    ``GradScaler`` uses: its kernel leaves weights and moments untouched and the step count
    is restored, with no host synchronisation. Other optimizers read the flag on the host.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    elif finite:  # synchronises with the device
        optimizer.step()


@dataclass
class Corruption:
    """The random choices of one step for a batch: crop boxes (B, 4), flips (B,), the
    noise mask (B, N) and the noise (B, C, H, W) (None for mae)."""

    boxes: torch.Tensor
    flips: torch.Tensor
    mask: torch.Tensor
    eps: torch.Tensor | None

    def __getitem__(self, part: slice) -> Corruption:
        return Corruption(
            self.boxes[part],
            self.flips[part],
            self.mask[part],
            None if self.eps is None else self.eps[part],
        )


def draw_step(model: PretrainModel, cfg: Config, step: int, device: torch.device) -> Corruption:
    """Every random choice of optimizer step ``step`` for the whole global batch, from a
    generator seeded by (seed, step) alone."""
    rng = generator(pretrain_step_seed(cfg.train.seed, step), device)
    b = cfg.train.batch_size
    boxes = crop_boxes(b, cfg.data.crop_scale, generator=rng, device=device)
    flips = random_flips(b, cfg.data.hflip, generator=rng, device=device)
    mask, eps = model.sample_corruption(b, rng, device)
    return Corruption(boxes, flips, mask, eps)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    *,
    micro_batch: int | None = None,
    mask: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    amp: bool = False,
    grad_clip: float = 0.0,
    attention: str = "auto",
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch, in micro-batches of ``micro_batch`` images
    (:func:`_accumulate_gradients`). The teacher is NOT updated here.

    Args:
        model: a pre-training model, possibly wrapped in DistributedDataParallel or compiled.
        images: (B, C, H, W) augmented, normalised, on the model's device.
        mask, eps: the corruption of these images (see ``PretrainModel.sample_corruption``);
            drawn from ``generator`` inside the model when None.
        amp: bf16 autocast of the forward passes.
        grad_clip: clip the gradient norm to this value (0: no clipping).
        attention: the attention kernel of the forward passes (``train.attention``).

    A step whose gradient norm is not finite (a NaN or infinite loss or gradient,
    overflow under bf16) changes nothing: the optimizer does not step
    (:func:`step_unless_non_finite`, decided on the device). Under
    DistributedDataParallel the norm is that of the all-reduced gradient, so every process
    makes the same choice. Nothing here waits for the device.

    Returns:
        the batch's mean ``loss`` (and ``loss_y``/``loss_z`` where the method has them),
        ``grad_norm`` (before clipping) and ``finite`` (bool: whether the optimizer
        stepped), as detached 0-d tensors on the device.
    """
    micro_batch = micro_batch or images.shape[0]
    optimizer.zero_grad(set_to_none=True)
    with attention_kernel(attention):
        totals = _accumulate_gradients(model, images, micro_batch, mask, eps, generator, amp)
    if grad_clip > 0:
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:  # the norm alone: clipping at infinity would multiply every gradient by 1
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        totals["grad_norm"] = torch.nn.utils.get_total_norm(grads)
    totals["finite"] = torch.isfinite(totals["grad_norm"])
    step_unless_non_finite(optimizer, totals["finite"])
    return totals


def _accumulate_gradients(
    model: torch.nn.Module,
    images: torch.Tensor,
    micro_batch: int,
    mask: torch.Tensor | None,
    eps: torch.Tensor | None,
    generator: torch.Generator | None,
    amp: bool,
) -> dict[str, torch.Tensor]:
    """Forward and backward of ``images`` ((B, C, H, W)) in micro-batches of
    ``micro_batch``, adding to the gradients (see :func:`train_step` for the arguments).

    Every micro-batch loss is a mean over the same number of tokens, divided by the number
    of micro-batches, so the accumulated gradient equals the full batch's. Under
    DistributedDataParallel, gradients are all-reduced once, on the last micro-batch.

    Returns:
        the batch's mean ``loss`` (and ``loss_y``/``loss_z``), detached 0-d tensors.
    """
    chunks = range(0, images.shape[0], micro_batch)
    accum = len(chunks)
    totals: dict[str, torch.Tensor] = {}
    for i, start in enumerate(chunks):
        part = slice(start, start + micro_batch)
        sync = contextlib.nullcontext()
        if isinstance(model, DistributedDataParallel) and i < accum - 1:
            sync = model.no_sync()
        with sync:  # no all-reduce until the last micro-batch's backward
            with autocast(images.device, amp):
                part_mask = None if mask is None else mask[part]
                part_eps = None if eps is None else eps[part]
                out = model(images[part], generator=generator, mask=part_mask, eps=part_eps)
            (out.loss / accum).backward()
        for name in ("loss", "loss_y", "loss_z"):
            value = getattr(out, name)
            if value is not None:
                totals[name] = totals.get(name, 0) + value.detach().float() / accum
    return totals


class Batches:
    """Where the uint8 images of each step come from: this process's rows ((b / W, C, H, W),
    its share of the global batch) of the data set in memory, in the epoch's order, or of
    a stream of shards (:mod:`dsmae.data.shards`, whose own resume guarantee is stated
    there)."""

    def __init__(
        self, images: torch.Tensor, cfg: Config, share: slice, stream: ShardStream | None = None
    ) -> None:
        self.images = images  # (N, C, H, W) uint8 (a stream's: a few of it)
        self.seed, self.batch_size = cfg.train.seed, cfg.train.batch_size
        self.share = share
        self.stream = stream

    def epoch(self, epoch: int, start: int, stop: int) -> Generator[torch.Tensor, None, None]:
        """This process's images of the steps ``start`` to ``stop - 1`` of ``epoch``;
        closing this ends a stream's readers."""
        if self.stream is not None:
            return _streamed(self.stream, epoch, start, stop)
        return self._gathered(epoch, start, stop)

    def order(self, epoch: int) -> torch.Tensor:
        """The data set's order in ``epoch`` ((N,) int64), where the images are: moved
        there once an epoch, so with the data set on the GPU the gathers, the augmentation
        and the draws never wait for the device."""
        return epoch_order(len(self.images), self.seed, epoch).to(self.images.device)

    def gather(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """This process's images of step ``step`` of an epoch in ``order``."""
        b = self.batch_size
        return self.images[order[step * b : (step + 1) * b][self.share]]

    def _gathered(self, epoch: int, start: int, stop: int) -> Generator[torch.Tensor, None, None]:
        order = self.order(epoch)
        for step in range(start, stop):
            yield self.gather(order, step)


def _streamed(
    stream: ShardStream, epoch: int, start: int, stop: int
) -> Generator[torch.Tensor, None, None]:
    """The images of the steps ``start`` to ``stop - 1`` of ``epoch`` from the stream;
    closing this ends the epoch's readers."""
    with contextlib.closing(stream.epoch(epoch, start, stop)) as batches:
        for batch in batches:
            yield batch.images


@dataclass
class Taken:
    """One optimizer step just taken: its index, learning rate and teacher momentum, its
    losses (``loss``, ``loss_y``/``loss_z``, ``grad_norm``: 0-d tensors on the device) and
    whether the optimizer stepped (a 0-d bool on the device)."""

    step: int
    lr: float
    momentum: float
    losses: dict[str, torch.Tensor]
    finite: torch.Tensor


@dataclass
class PretrainStep:
    """The pre-training step of a run: ``step(i, uint8)`` takes optimizer step ``i`` on
    this process's images of it.

    Attributes:
        model: the pre-training model (its teacher is moved here).
        forward: the module the step calls: ``model``, DDP-wrapped and/or compiled.
        share: this process's rows of the global batch.
    """

    model: PretrainModel
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: Config
    schedule: Schedule
    device: torch.device
    share: slice

    def __post_init__(self) -> None:
        self.amp = use_amp(self.device, self.cfg.train.amp)
        self.mean = torch.tensor(self.cfg.data.mean, device=self.device)
        self.std = torch.tensor(self.cfg.data.std, device=self.device)

    def inputs(self, step: int, uint8: torch.Tensor) -> tuple[torch.Tensor, Corruption]:
        """The data part: ``uint8`` ((b, C, H, W), any device) moved to the device,
        cropped, flipped, resized and normalised as the step's draws say ((b, C, S, S)
        float32), and its corruption (drawn for the global batch, then sliced)."""
        corruption = draw_step(self.model, self.cfg, step, self.device)[self.share]
        uint8 = uint8.to(self.device, non_blocking=True)
        size = self.cfg.model.img_size
        boxes, flips = corruption.boxes, corruption.flips
        return augmented_batch(uint8, size, boxes, flips, self.mean, self.std), corruption

    def __call__(self, step: int, uint8: torch.Tensor) -> Taken:
        """Set the learning rate of ``step``, take it on ``uint8`` and move the teacher
        where the schedule says. Nothing here waits for the device."""
        t, schedule = self.cfg.train, self.schedule
        lr = schedule.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, corruption = self.inputs(step, uint8)
        how = {"micro_batch": t.micro_batch, "amp": self.amp, "grad_clip": t.grad_clip}
        losses = train_step(self.forward, self.optimizer, images, mask=corruption.mask,
                            eps=corruption.eps, attention=t.attention, **how)  # fmt: skip
        finite = losses.pop("finite")
        momentum = schedule.momentum(step)
        if schedule.teacher_moves(step):
            # per step, a skipped step skips the update too (decided on the device)
            self.model.update_teacher(
                momentum, apply=finite if schedule.teacher_every_step else None
            )
        return Taken(step, lr, momentum, losses, finite)
