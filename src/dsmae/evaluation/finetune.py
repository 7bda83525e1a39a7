"""Full fine-tuning with MAE's recipe (SPEC section 6), built from timm's tools.

The encoder of a checkpoint (or, with ``random_init``, the same architecture freshly
initialised: the ``scratch`` baseline of Table 2, trained with the same recipe) gets a
linear classifier on its [CLS] token (or the mean of its patch tokens) and every weight
is trained:

- AdamW, ``lr = base_lr * batch_size / 256``, linear warm-up then cosine to ``min_lr``,
  with layer-wise learning-rate decay (``timm.optim.param_groups_layer_decay``: block
  ``i`` of ``L`` gets ``layer_decay ** (L + 1 - i)``, the head 1) and weight decay on
  weight matrices only;
- stochastic depth (``drop_path``), RandAugment (``randaug_n`` ops of magnitude
  ``randaug_m``, after the random resized crop and flip), mixup / cutmix with label
  smoothing (``timm.data.Mixup``, soft-target cross-entropy) and random erasing.

The top-1 of the LAST epoch on the test split is the result; the best epoch is recorded
beside it, labelled as such. timm's mixup, RandAugment and random erasing draw from the
global RNGs, which are seeded from ``seed`` at the start.

Under torchrun every process takes its share of each global batch (DistributedDataParallel)
and the test accuracy is summed over processes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

from dsmae import distributed
from dsmae.config import Config, FinetuneConfig
from dsmae.data.augment import crop_boxes
from dsmae.data.pipeline import augmented_batch, eval_batch
from dsmae.data.sources import DataError
from dsmae.evaluation.frozen import best_epoch, labelled_splits, save_result
from dsmae.export import encoder_from_checkpoint
from dsmae.metrics import MetricsLog
from dsmae.runtime import autocast, generator, progress, use_amp
from dsmae.schedules import lr_at

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """Outcome of one fine-tuning; ``top1`` is the last epoch's test accuracy in %."""

    top1: float
    best_top1: float
    best_epoch: int
    epochs: int
    num_train: int
    num_test: int
    num_classes: int
    data: str
    random_init: bool
    checkpoint: str
    history: list[float]


def classifier(encoder: VisionTransformer, num_classes: int, cfg: FinetuneConfig) -> nn.Module:
    """The encoder with drop path and a zero-initialised-bias linear head on its pooled
    features ([CLS] after the final norm, or the mean of patch tokens after it)."""
    dpr = torch.linspace(0, cfg.drop_path, len(encoder.blocks)).tolist()  # timm's rule
    for block, rate in zip(encoder.blocks, dpr, strict=True):
        block.drop_path1 = _drop_path(rate)
        block.drop_path2 = _drop_path(rate)
    encoder.global_pool = cfg.pool if cfg.pool == "avg" else "token"
    encoder.reset_classifier(num_classes)
    nn.init.trunc_normal_(encoder.head.weight, std=2e-5)  # MAE's head init
    nn.init.zeros_(encoder.head.bias)
    return encoder


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


def build_finetune_optimizer(
    model: VisionTransformer, cfg: FinetuneConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over timm's layer-decay parameter groups (each with its ``lr_scale``)."""
    groups = param_groups_layer_decay(
        model,
        weight_decay=cfg.weight_decay,
        no_weight_decay_list=model.no_weight_decay(),
        layer_decay=cfg.layer_decay,
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def _augment(
    images: torch.Tensor, cfg: Config, step: int, randaug: v2.RandAugment | None
) -> torch.Tensor:
    """Random resized crop + flip (seeded by step), RandAugment per image, normalise."""
    f, size = cfg.finetune, cfg.model.img_size
    rng = generator(cfg.train.seed * 7919 + step, images.device)
    boxes = crop_boxes(len(images), f.crop_scale, generator=rng, device=images.device)
    flips = torch.rand(len(images), generator=rng, device=images.device) < 0.5
    if randaug is not None:
        images = torch.stack([randaug(image) for image in images])
    return augmented_batch(images, size, boxes, flips, cfg.data.mean, cfg.data.std)


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Config, amp: bool
) -> tuple[int, int]:
    """(correct, seen) of ``model`` on this process's share of the test images."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), 256):
        x = eval_batch(
            images[start : start + 256].to(device),
            cfg.model.img_size,
            cfg.data.mean,
            cfg.data.std,
        )
        with autocast(device, amp):
            logits = model(x)
        correct += int((logits.argmax(1).cpu() == labels[start : start + 256]).sum())
    return correct, len(images)


def finetune(
    checkpoint: str | Path,
    cfg: Config,
    *,
    random_init: bool = False,
    out: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune the encoder of ``checkpoint`` with ``cfg.finetune`` on ``cfg.data``.

    ``cfg`` is the checkpoint's config with the user's changes (data, finetune section,
    device, seed); its model section must be the checkpoint's.

    Writes ``<checkpoint stem>.finetune[-random-init].json`` beside the checkpoint and,
    when ``out`` is given, ``out/metrics.jsonl`` (one line per epoch) and TensorBoard logs.
    """
    f, t = cfg.finetune, cfg.train
    proc, device = distributed.setup(t.device, t.dist_timeout_minutes)
    try:
        random.seed(t.seed)
        np.random.seed(t.seed)
        splits = labelled_splits(cfg.data, cfg.model, "fine-tuning")
        train, test = splits["train"], splits["test"]
        num_classes = len(train.classes)
        encoder, _ = encoder_from_checkpoint(checkpoint, random_init=random_init, seed=t.seed)
        torch.manual_seed(t.seed)
        model = classifier(encoder, num_classes, f).to(device)
        optimizer = build_finetune_optimizer(model, f, device)
        forward: torch.nn.Module = model
        if proc.distributed:
            ids = [device.index] if device.type == "cuda" else None
            forward = DistributedDataParallel(model, device_ids=ids)
        amp = use_amp(device, t.amp)
        mixup = None
        if f.mixup > 0 or f.cutmix > 0:
            mixup = Mixup(
                mixup_alpha=f.mixup,
                cutmix_alpha=f.cutmix,
                label_smoothing=f.label_smoothing,
                num_classes=num_classes,
            )
        erase = (
            RandomErasing(f.random_erase, mode="pixel", device=str(device))
            if f.random_erase > 0
            else None
        )
        randaug = v2.RandAugment(f.randaug_n, f.randaug_m) if f.randaug_n > 0 else None
        soft_ce = SoftTargetCrossEntropy()

        steps_per_epoch = len(train) // f.batch_size
        if steps_per_epoch == 0:
            raise DataError(
                f"finetune.batch_size={f.batch_size} is larger than the {len(train)} "
                "training images"
            )
        total, warmup = f.epochs * steps_per_epoch, f.warmup_epochs * steps_per_epoch
        mine = slice(
            proc.rank * f.batch_size // proc.world_size,
            (proc.rank + 1) * f.batch_size // proc.world_size,
        )
        test_share = slice(proc.rank, None, proc.world_size)
        metrics = MetricsLog(out, prefix="finetune") if out and proc.is_main else None
        history: list[float] = []
        step = 0
        bar = progress(total * f.batch_size, "finetune", disable=not proc.is_main)
        with bar:
            for epoch in range(f.epochs):
                order = torch.randperm(len(train), generator=generator(t.seed + epoch))
                model.train()
                for i in range(steps_per_epoch):
                    idx = order[i * f.batch_size : (i + 1) * f.batch_size][mine]
                    x = _augment(train.images[idx].to(device), cfg, step, randaug)
                    y = train.labels[idx].to(device)
                    if erase is not None:
                        x = erase(x)
                    if mixup is not None:
                        x, y = mixup(x, y)
                    lr = lr_at(step, total, warmup, f.lr, f.min_lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    with autocast(device, amp):
                        logits = forward(x)
                    if mixup is not None:
                        loss = soft_ce(logits.float(), y)
                    else:
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=f.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if f.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), f.grad_clip)
                    optimizer.step()
                    step += 1
                    bar.update(f.batch_size)
                correct, seen = _evaluate(
                    model, test.images[test_share], test.labels[test_share], cfg, amp
                )
                counts = distributed.mean_over_processes(
                    {"correct": torch.tensor(float(correct)), "seen": torch.tensor(float(seen))},
                    proc,
                )
                top1 = 100.0 * float(counts["correct"]) / float(counts["seen"])
                history.append(top1)
                bar.set_postfix(epoch=epoch + 1, top1=f"{top1:.2f}")
                log.info("fine-tune epoch %d/%d: test top-1 %.2f%%", epoch + 1, f.epochs, top1)
                if metrics is not None:
                    metrics.write(
                        {"epoch": epoch + 1, "step": step, "loss": loss.item(), "top1": top1}
                    )
        if metrics is not None:
            metrics.close()
    finally:
        distributed.teardown()

    best_top1, best = best_epoch(history)
    result = FinetuneResult(
        top1=history[-1],
        best_top1=best_top1,
        best_epoch=best,
        epochs=f.epochs,
        num_train=len(train),
        num_test=len(test),
        num_classes=num_classes,
        data=cfg.data.source,
        random_init=random_init,
        checkpoint=str(checkpoint),
        history=history,
    )
    if proc.is_main:
        save_result(checkpoint, "finetune", random_init, result)
    return result
