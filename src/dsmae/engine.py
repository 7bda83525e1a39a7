"""The pre-training engine (SPEC section 5): AdamW, warm-up + cosine learning rate, the
teacher's momentum schedule, gradient accumulation, bf16 autocast on GPU, metrics and
checkpoints.

``pretrain(cfg)`` is the whole job; :func:`train_step` is one optimizer step and is
what tests and benchmarks call directly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay

from dsmae.checkpoint import save_checkpoint
from dsmae.config import Config, ConfigError, TrainConfig
from dsmae.data.pipeline import (
    augmented_batch,
    channel_stats,
    epoch_batches,
    eval_batch,
    load_split,
)
from dsmae.metrics import MetricsLog
from dsmae.models import DSMAE
from dsmae.runtime import autocast, generator, progress, resolve_device, use_amp
from dsmae.schedules import lr_at, momentum_at
from dsmae.visualize import save_denoise_figure

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """Where a pre-training run left its outputs, and its last logged metrics."""

    out: Path
    checkpoint: Path
    config: Config
    last_metrics: dict[str, Any]
    seconds: float


def build_optimizer(model: DSMAE, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: not on norms, biases, the position
    embedding, the [CLS] token or the mask token. Fused kernels on CUDA."""
    no_decay = {f"encoder.{name}" for name in model.encoder.no_weight_decay()}
    no_decay.add("decoder.mask_token")
    groups = param_groups_weight_decay(model, train.weight_decay, no_weight_decay_list=no_decay)
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=tuple(train.betas), fused=device.type == "cuda"
    )


def train_step(
    model: DSMAE,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    *,
    accum_steps: int = 1,
    generator: torch.Generator | None = None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch, split into ``accum_steps`` equal micro-batches.

    Every micro-batch loss is a mean over the same number of tokens, so the accumulated
    gradient equals the full batch's. The teacher is NOT updated here.

    Args:
        images: (B, C, H, W) augmented, normalised, on the model's device.

    Returns:
        the batch's mean ``loss`` (and ``loss_y``/``loss_z`` where the method has them),
        as detached 0-d tensors on the device (reading them synchronises).
    """
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    for chunk in images.chunk(accum_steps):
        with autocast(images.device, amp):
            out = model(chunk, generator=generator)
        (out.loss / accum_steps).backward()
        for name in ("loss", "loss_y", "loss_z"):
            value = getattr(out, name)
            if value is not None:
                totals[name] = totals.get(name, 0) + value.detach().float() / accum_steps
    optimizer.step()
    return totals


def resolve_data_stats(cfg: Config, images: torch.Tensor) -> Config:
    """Fill ``data.mean``/``data.std`` from the pre-training images where they are None."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return cfg
    mean, std = channel_stats(images)
    data = dataclasses.replace(
        cfg.data,
        mean=cfg.data.mean if cfg.data.mean is not None else mean,
        std=cfg.data.std if cfg.data.std is not None else std,
    )
    return dataclasses.replace(cfg, data=data)


def pretrain(cfg: Config) -> PretrainResult:
    """Pre-train ``cfg.model`` on ``cfg.data``; writes into ``cfg.out``: ``config.yaml``,
    ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-epochNNNN.pt`` every
    ``train.checkpoint_every`` epochs, and ``last.pt`` at the end."""
    started = time.perf_counter()
    t = cfg.train
    out = Path(cfg.out)
    device = resolve_device(t.device)
    amp = use_amp(device, t.amp)

    images = load_split(cfg.data, cfg.model, "pretrain").images
    steps_per_epoch = len(images) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is larger than the {len(images)} pre-training images"
        )
    cfg = resolve_data_stats(cfg, images)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())

    torch.manual_seed(t.seed)  # weight initialisation
    model = DSMAE(cfg.model).to(device).train()
    optimizer = build_optimizer(model, t, device)
    order_rng = generator(t.seed, "cpu")  # data order
    rng = generator(t.seed + 1, device)  # augmentation, mask and noise
    if device.type == "cuda":
        images = images.pin_memory()

    total_steps = steps_per_epoch * t.epochs
    warmup_steps = steps_per_epoch * t.warmup_epochs
    log.info(
        "pre-training %s (%s, %.1fM parameters in the encoder) on %d images, %s, %d steps of %d",
        cfg.model.method,
        cfg.model.arch,
        sum(p.numel() for p in model.encoder.parameters()) / 1e6,
        len(images),
        device,
        total_steps,
        t.batch_size,
    )
    step = 0
    last: dict[str, Any] = {}
    timer = (time.perf_counter(), 0)  # (time, step) of the last metrics line
    with MetricsLog(out) as metrics, progress(total_steps * t.batch_size, "pretrain") as bar:
        for epoch in range(t.epochs):
            for idx in epoch_batches(len(images), t.batch_size, order_rng):
                lr = lr_at(step, total_steps, warmup_steps, t.lr, t.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = augmented_batch(
                    images[idx].to(device, non_blocking=True),
                    cfg.model.img_size,
                    cfg.data,
                    cfg.data.mean,
                    cfg.data.std,
                    rng,
                )
                losses = train_step(
                    model, optimizer, batch, accum_steps=t.accum_steps, generator=rng, amp=amp
                )
                momentum = momentum_at(step, total_steps, t.momentum_start, t.momentum_end)
                if t.ema_every == "step":
                    model.update_teacher(momentum)
                step += 1
                bar.update(t.batch_size)
                if step % t.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    rate = (step - timer[1]) * t.batch_size / (now - timer[0])
                    timer = (now, step)
                    last = {"step": step, "epoch": epoch, "lr": lr, "momentum": momentum}
                    last.update({k: v.item() for k, v in losses.items()})
                    last["img_per_s"] = rate
                    metrics.write(last)
                    bar.set_postfix(epoch=epoch, loss=f"{last['loss']:.4f}")
                    log.debug("%s", last)
            if t.ema_every == "epoch":
                model.update_teacher(momentum_at(epoch, t.epochs, t.momentum_start, t.momentum_end))
            if (
                t.checkpoint_every
                and (epoch + 1) % t.checkpoint_every == 0
                and epoch + 1 < t.epochs
            ):
                _save(
                    out / f"checkpoint-epoch{epoch + 1:04d}.pt", model, optimizer, cfg, step, epoch
                )
        checkpoint = _save(out / "last.pt", model, optimizer, cfg, step, t.epochs - 1)
    shown = eval_batch(images[:8].to(device), cfg.model.img_size, cfg.data.mean, cfg.data.std)
    save_denoise_figure(
        model, shown, out / "denoise.png", cfg.data.mean, cfg.data.std, generator(t.seed, device)
    )
    seconds = time.perf_counter() - started
    log.info(
        "pre-training done in %.0f s; last loss %.4f; %s", seconds, last.get("loss", 0), checkpoint
    )
    return PretrainResult(out, checkpoint, cfg, last, seconds)


def _save(
    path: Path, model: DSMAE, optimizer: torch.optim.Optimizer, cfg: Config, step: int, epoch: int
) -> Path:
    return save_checkpoint(
        path,
        {
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
        },
    )
