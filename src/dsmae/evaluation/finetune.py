"""Full fine-tuning with MAE's recipe (SPEC section 6), built from timm's tools.

What runs, per epoch and per step (MAE's ``main_finetune.py`` and ``models_vit.py``):

- Model: the encoder of a checkpoint (or, with ``random_init``, the same architecture
  freshly initialised: the ``scratch`` baseline of Table 2, trained with the same recipe)
  with stochastic depth (``drop_path``, growing linearly over the blocks) and a linear head
  (trunc-normal std 2e-5, zero bias). ``pool = "avg"`` (default, MAE's ``global_pool``):
  the mean of the patch tokens, then a FRESH ``LayerNorm`` (``fc_norm``), the pre-trained
  final norm replaced by ``Identity`` (timm's ``global_pool="avg"`` with ``fc_norm``).
  ``pool = "cls"``: the [CLS] token after the pre-trained final norm.
- Training images: per image, on the CPU, timm's ``create_transform`` with MAE's arguments
  (:func:`dsmae.data.finetune_loader.train_transform`): random resized crop (``crop_scale``,
  bicubic) and horizontal flip, RandAugment ``auto_augment`` (default
  ``rand-m9-mstd0.5-inc1``, after the crop; its 0-bit posterize kept working on recent
  Pillow), to tensor, normalise, random erasing (``random_erase``, per-pixel noise). They run
  in a ``DataLoader`` with ``workers`` processes (:mod:`dsmae.data.finetune_loader`); each
  image's augmentation is seeded from (``seed``, epoch, image index), so it does not depend on
  the number of workers or processes. Then on the device, mixup / cutmix with label smoothing
  (``timm.data.Mixup``, soft-target cross-entropy; plain cross-entropy with label smoothing
  when both are off).
- AdamW, ``lr = base_lr * batch_size / 256``, set every step: linear warm-up then cosine to
  ``min_lr``, with layer-wise learning-rate decay (``timm.optim.param_groups_layer_decay``:
  block ``i`` of ``L`` gets ``layer_decay ** (L + 1 - i)``, ``fc_norm`` and the head 1) and
  weight decay on weight matrices only; gradient clipping with ``grad_clip``.
- Test images: resized and normalised, no augmentation; top-1 after every epoch.

The top-1 of the LAST epoch on the test split is the result; the best epoch is recorded
beside it, labelled as such. Each epoch visits the training images in the order
``torch.randperm(N, generator(seed + epoch))``, in global batches of ``batch_size`` (the
last partial batch dropped); mixup and drop path draw from the global RNGs, seeded with
``seed + rank`` once the model is built (MAE's per-process seed).

The step runs as pre-training's does: bf16 autocast where ``train.amp`` says (default: on
CUDA) and ``torch.compile`` where ``train.compile`` says (default: on CUDA; its
``compile_scope``, ``compile_backend`` and ``compile_mode``); the test top-1 is computed
eagerly.

Under torchrun every process takes its share of each global batch (DistributedDataParallel)
and the test accuracy is summed over processes.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader

from dsmae import distributed
from dsmae.checkpoint import Checkpoint
from dsmae.config import Config, FinetuneConfig
from dsmae.data.finetune_loader import ProcessBatchSampler, train_loader
from dsmae.data.images import DataError, ImageTensors
from dsmae.data.pipeline import eval_batch
from dsmae.evaluation.results import (
    LabelledSplits,
    TrainedResult,
    labelled_splits,
    result_path,
    warn_if_unwritable,
)
from dsmae.metrics import MetricsLog
from dsmae.pretrain.run_folder import check_metrics_folder
from dsmae.runtime import (
    autocast,
    check_step_settings,
    compile_model,
    progress,
    use_amp,
    use_compile,
)
from dsmae.schedules import lr_at
from dsmae.seeds import process_seed

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult(TrainedResult):
    """Outcome of one fine-tuning (:func:`finetune`); ``top1`` is the last epoch's test
    accuracy in %, ``history`` every epoch's.

    ``settings`` is the ``finetune`` config section plus ``"data"`` (the data source): what a
    cached result is compared against before it is reused.
    """

    protocol = "finetune"
    keys = ("top1", "best_top1", "best_epoch", "epochs", "num_train", "num_test", "num_classes",
            "data", "random_init", "checkpoint", "pool", "settings", "history")  # fmt: skip

    history: list[float]


def classifier(
    encoder: VisionTransformer, num_classes: int, cfg: FinetuneConfig
) -> VisionTransformer:
    """The encoder with drop path and a linear head (MAE's init), in place.

    ``cfg.pool == "avg"``: (B, C, H, W) -> mean of the (B, N, D) patch tokens -> a fresh
    ``fc_norm`` LayerNorm -> head, the pre-trained final ``norm`` replaced by ``Identity``
    (timm's ``global_pool="avg"`` with ``fc_norm``, MAE's ``models_vit``). ``"cls"``: the
    [CLS] token after the pre-trained final norm -> head. Output: (B, num_classes) logits.
    """
    dpr = torch.linspace(0, cfg.drop_path, len(encoder.blocks)).tolist()  # timm's rule
    for block, rate in zip(encoder.blocks, dpr, strict=True):
        block.drop_path1 = _drop_path(rate)
        block.drop_path2 = _drop_path(rate)
    if cfg.pool == "avg":
        device = encoder.cls_token.device
        encoder.norm = nn.Identity()
        encoder.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6, device=device)
        global_pool = "avg"
    elif cfg.pool == "cls":
        encoder.fc_norm = nn.Identity()
        global_pool = "token"
    else:
        raise ValueError(f"pool must be 'avg' or 'cls', not {cfg.pool!r}")
    encoder.reset_classifier(num_classes, global_pool)
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
    checkpoint: Checkpoint,
    cfg: Config | None = None,
    *,
    random_init: bool = False,
    out: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune the encoder of ``checkpoint`` (with ``random_init``: its architecture at
    random initialisation, seeded by ``cfg.train.seed``) with ``cfg.finetune`` on
    ``cfg.data``.

    ``cfg`` is the checkpoint's config with the user's changes (data, finetune section,
    device, seed; default: the checkpoint's own); its model section must be the
    checkpoint's.

    Writes ``<checkpoint stem>.finetune[-cls][-random-init].json`` beside the checkpoint
    and, when ``out`` is given, ``out/metrics.jsonl`` (one line per epoch) and TensorBoard
    logs.

    Raises:
        DataError: a split without class labels, or fewer training images than a batch.
        RunFolderError: ``out`` holds another run (a pre-training's, or metrics already).
        WriteError: ``out`` cannot be written.
    """
    cfg = checkpoint.config if cfg is None else cfg
    proc, device = distributed.setup(cfg.train.device, cfg.train.dist_timeout_minutes)
    try:
        check_step_settings(device, cfg.train)
        if proc.is_main:
            pool = cfg.finetune.pool
            warn_if_unwritable(result_path(checkpoint.path, "finetune", random_init, pool))
            if out is not None:
                check_metrics_folder(Path(out))
        splits = _training_splits(cfg)
        run = _prepare(checkpoint, cfg, splits, random_init, proc, device)
        history = _train(run, splits.test, out)
        del run  # its loader's worker processes stop
    finally:
        distributed.teardown()
    trained = FinetuneResult.trained_fields(history, cfg.finetune, cfg.data.source)
    measured = splits.measured_on(checkpoint, random_init)
    result = FinetuneResult(**trained, **measured, pool=cfg.finetune.pool, history=history)
    if proc.is_main:
        result.keep()
    return result


def _training_splits(cfg: Config) -> LabelledSplits:
    """The labelled splits of ``cfg.data``, refused unless the train split holds a batch.

    Raises:
        DataError: a split without class labels, or fewer training images than
            ``finetune.batch_size``.
    """
    splits = labelled_splits(cfg.data, cfg.model, "fine-tuning")
    batch = cfg.finetune.batch_size
    if len(splits.train) < batch:
        raise DataError(
            f"finetune.batch_size={batch} is larger than the {len(splits.train)} training images"
        )
    return splits


@dataclass
class _FinetuneRun:
    """What the training loop of one fine-tuning works with, on this process."""

    cfg: Config
    proc: distributed.Process
    device: torch.device
    model: VisionTransformer  # the classifier, trained in place
    forward: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    loader: DataLoader[tuple[torch.Tensor, int]]
    batches: ProcessBatchSampler
    mixup: Mixup | None
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> loss
    amp: bool


def _prepare(
    checkpoint: Checkpoint,
    cfg: Config,
    splits: LabelledSplits,
    random_init: bool,
    proc: distributed.Process,
    device: torch.device,
) -> _FinetuneRun:
    """Build the classifier, its optimizer, mixup and the training batches, in the order
    their random draws have always come: the encoder's init from ``train.seed``, the head
    from ``train.seed`` again, then the global RNGs seeded per process."""
    f, t = cfg.finetune, cfg.train
    num_classes = len(splits.train.classes)
    encoder = checkpoint.encoder(random_init=random_init, seed=t.seed)
    torch.manual_seed(t.seed)
    model = classifier(encoder, num_classes, f).to(device)
    optimizer = build_finetune_optimizer(model, f, device)
    forward = distributed.wrap(model, proc, device)
    if use_compile(device, t.compile):  # the training step; evaluation stays eager
        forward = compile_model(forward, t)
        log.info("fine-tuning with torch.compile (%s)", t.compile_scope)
    # mixup (numpy) and drop path (torch) draw from the global RNGs, seeded per process
    # as MAE does (``seed + rank``); the images are seeded per image (AugmentedImages)
    _seed_globals(process_seed(t.seed, proc.rank))
    amp = use_amp(device, t.amp)
    mixup, criterion = _mixup_and_loss(f, num_classes)
    loader, batches = train_loader(
        splits.train, cfg, proc.rank, proc.world_size, pin_memory=device.type == "cuda"
    )
    parts = (model, forward, optimizer, loader, batches, mixup, criterion, amp)
    return _FinetuneRun(cfg, proc, device, *parts)


def _seed_globals(seed: int) -> None:
    """Seed ``random``, ``numpy.random`` and torch's global generator with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mixup_and_loss(
    f: FinetuneConfig, num_classes: int
) -> tuple[Mixup | None, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """timm's ``Mixup`` (mixup / cutmix with label smoothing) and the soft-target
    cross-entropy it needs; with both off, no mixup and cross-entropy with label
    smoothing. The loss maps (B, C) float32 logits and (B,) labels or (B, C) soft
    targets to a scalar."""
    if f.mixup > 0 or f.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=f.mixup,
            cutmix_alpha=f.cutmix,
            label_smoothing=f.label_smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    return None, functools.partial(F.cross_entropy, label_smoothing=f.label_smoothing)


def _train(run: _FinetuneRun, test: ImageTensors, out: str | Path | None) -> list[float]:
    """``finetune.epochs`` epochs of training, the test top-1 (%) after each (logged, and
    written to ``out/metrics.jsonl`` by the main process where ``out`` is given).
    Returns the per-epoch top-1 history."""
    f, proc = run.cfg.finetune, run.proc
    steps_per_epoch = len(run.batches)
    schedule = (f.epochs * steps_per_epoch, f.warmup_epochs * steps_per_epoch)
    metrics = MetricsLog(out, prefix="finetune", config=run.cfg) if out and proc.is_main else None
    history: list[float] = []
    step = 0
    with progress(schedule[0] * f.batch_size, "finetune", disable=not proc.is_main) as bar:
        for epoch in range(f.epochs):
            step, loss = _train_epoch(run, epoch, step, schedule, bar)
            top1 = _test_top1(run, test)
            history.append(top1)
            bar.set_postfix(epoch=epoch + 1, top1=f"{top1:.2f}")
            log.info("fine-tune epoch %d/%d: test top-1 %.2f%%", epoch + 1, f.epochs, top1)
            if metrics is not None:
                metrics.write({"epoch": epoch + 1, "step": step, "loss": loss.item(), "top1": top1})
    if metrics is not None:
        metrics.close()
    return history


def _train_epoch(
    run: _FinetuneRun, epoch: int, step: int, schedule: tuple[int, int], bar: Any
) -> tuple[int, torch.Tensor]:
    """One epoch of optimizer steps from global step ``step``, the lr of each parameter
    group set per step (warm-up then cosine over ``schedule`` = (total, warm-up) steps,
    times the group's ``lr_scale``). Returns the next step and the last step's loss."""
    f = run.cfg.finetune
    run.batches.set_epoch(epoch)
    run.model.train()
    for images, labels in run.loader:
        x = images.to(run.device, non_blocking=True)
        y = labels.to(run.device, non_blocking=True)
        if run.mixup is not None:
            x, y = run.mixup(x, y)
        lr = lr_at(step, *schedule, f.lr, f.min_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss = _step(run, x, y)
        step += 1
        bar.update(f.batch_size)
    return step, loss


def _step(run: _FinetuneRun, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on (B, C, S, S) images ``x`` with labels or soft targets ``y``
    (gradient clipping with ``finetune.grad_clip``); returns the loss."""
    with autocast(run.device, run.amp):
        logits = run.forward(x)
    loss = run.criterion(logits.float(), y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.cfg.finetune.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.finetune.grad_clip)
    run.optimizer.step()
    return loss


def _test_top1(run: _FinetuneRun, test: ImageTensors) -> float:
    """Test top-1 (%) of the model: each process evaluates its share of the images, and
    the counts are summed over processes."""
    share = slice(run.proc.rank, None, run.proc.world_size)
    correct, seen = _evaluate(run.model, test.images[share], test.labels[share], run.cfg, run.amp)
    counts = distributed.mean_over_processes(
        {"correct": torch.tensor(float(correct)), "seen": torch.tensor(float(seen))}, run.proc
    )
    return 100.0 * float(counts["correct"]) / float(counts["seen"])
