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


@dataclass
class _Run:
    """The state of one pre-training run."""

    cfg: Config
    out: Path
    device: torch.device
    amp: bool
    images: torch.Tensor  # (N, C, H, W) uint8, the pre-training split
    model: DSMAE
    optimizer: torch.optim.Optimizer
    order_rng: torch.Generator  # data order (CPU)
    rng: torch.Generator  # augmentation, mask and noise (on the device)
    steps_per_epoch: int
    step: int = 0
    last: dict[str, Any] = dataclasses.field(default_factory=dict)  # last metrics line

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs


def _setup(cfg: Config) -> _Run:
    """Load the data, fill in its statistics, save the resolved config, build the model."""
    t = cfg.train
    device = resolve_device(t.device)
    images = load_split(cfg.data, cfg.model, "pretrain").images
    steps_per_epoch = len(images) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is larger than the {len(images)} pre-training images"
        )
    cfg = resolve_data_stats(cfg, images)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())

    torch.manual_seed(t.seed)  # weight initialisation
    model = DSMAE(cfg.model).to(device).train()
    return _Run(
        cfg=cfg,
        out=out,
        device=device,
        amp=use_amp(device, t.amp),
        images=images.pin_memory() if device.type == "cuda" else images,
        model=model,
        optimizer=build_optimizer(model, t, device),
        order_rng=generator(t.seed, "cpu"),
        rng=generator(t.seed + 1, device),
        steps_per_epoch=steps_per_epoch,
    )


def _train_epoch(run: _Run, epoch: int, metrics: MetricsLog, bar: Any) -> None:
    """One pass over the data: schedules, step, teacher update, metrics every log_every steps."""
    cfg, t = run.cfg, run.cfg.train
    timer = (time.perf_counter(), run.step)  # (time, step) of the last metrics line
    warmup_steps = run.steps_per_epoch * t.warmup_epochs
    for idx in epoch_batches(len(run.images), t.batch_size, run.order_rng):
        lr = lr_at(run.step, run.total_steps, warmup_steps, t.lr, t.min_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        uint8 = run.images[idx].to(run.device, non_blocking=True)
        batch = augmented_batch(
            uint8, cfg.model.img_size, cfg.data, cfg.data.mean, cfg.data.std, run.rng
        )
        losses = train_step(
            run.model,
            run.optimizer,
            batch,
            accum_steps=t.accum_steps,
            generator=run.rng,
            amp=run.amp,
        )
        momentum = momentum_at(run.step, run.total_steps, t.momentum_start, t.momentum_end)
        if t.ema_every == "step":
            run.model.update_teacher(momentum)
        run.step += 1
        bar.update(t.batch_size)
        if run.step % t.log_every == 0 or run.step == run.total_steps:
            now = time.perf_counter()
            rate = (run.step - timer[1]) * t.batch_size / (now - timer[0])
            timer = (now, run.step)
            run.last = {"step": run.step, "epoch": epoch, "lr": lr, "momentum": momentum}
            run.last.update({k: v.item() for k, v in losses.items()})  # synchronises
            run.last["img_per_s"] = rate
            metrics.write(run.last)
            bar.set_postfix(epoch=epoch, loss=f"{run.last['loss']:.4f}")


def pretrain(cfg: Config) -> PretrainResult:
    """Pre-train ``cfg.model`` on ``cfg.data``; writes into ``cfg.out``: ``config.yaml``,
    ``metrics.jsonl``, ``tensorboard/``, ``checkpoint-epochNNNN.pt`` every
    ``train.checkpoint_every`` epochs, ``last.pt`` and ``denoise.png`` at the end."""
    started = time.perf_counter()
    run = _setup(cfg)
    cfg, t = run.cfg, run.cfg.train
    log.info(
        "pre-training %s (%s, %.1fM encoder parameters) on %d images, %s, %d steps of %d",
        cfg.model.method,
        cfg.model.arch,
        sum(p.numel() for p in run.model.encoder.parameters()) / 1e6,
        len(run.images),
        run.device,
        run.total_steps,
        t.batch_size,
    )
    with (
        MetricsLog(run.out) as metrics,
        progress(run.total_steps * t.batch_size, "pretrain") as bar,
    ):
        for epoch in range(t.epochs):
            _train_epoch(run, epoch, metrics, bar)
            if t.ema_every == "epoch":
                run.model.update_teacher(
                    momentum_at(epoch, t.epochs, t.momentum_start, t.momentum_end)
                )
            done = epoch + 1
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.epochs:
                _save(run, run.out / f"checkpoint-epoch{done:04d}.pt", epoch)
            elapsed = time.perf_counter() - started
            log.info(
                "epoch %d/%d: loss %.4f, %.0f img/s, %.0f s elapsed, ETA %.0f s",
                done,
                t.epochs,
                run.last.get("loss", float("nan")),
                run.last.get("img_per_s", 0.0),
                elapsed,
                elapsed / done * (t.epochs - done),
            )
        checkpoint = _save(run, run.out / "last.pt", t.epochs - 1)
    shown = eval_batch(
        run.images[:8].to(run.device), cfg.model.img_size, cfg.data.mean, cfg.data.std
    )
    save_denoise_figure(
        run.model,
        shown,
        run.out / "denoise.png",
        cfg.data.mean,
        cfg.data.std,
        generator(t.seed, run.device),
    )
    seconds = time.perf_counter() - started
    log.info("pre-training done in %.0f s: %s", seconds, checkpoint)
    return PretrainResult(run.out, checkpoint, cfg, run.last, seconds)


def _save(run: _Run, path: Path, epoch: int) -> Path:
    return save_checkpoint(
        path,
        {
            "config": run.cfg.to_dict(),
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "step": run.step,
            "epoch": epoch,
        },
    )
