"""Linear probing (MAE protocol, SPEC section 6), by one of two recipes (``probe.recipe``).

Both train a ``BatchNorm1d(affine=False)`` + ``Linear`` head (MAE's initialisation) on the
pooled features (``probe.pool``) of the frozen encoder, with ``lr = base_lr * batch / 256``,
a linear warm-up then a half-cosine decay per step, and report the top-1 of the LAST epoch
on the test split; the best epoch's top-1 is recorded beside it, labelled as such.

- ``"fast"`` (default): the encoder runs once over the train and test splits without
  augmentation, and the head is trained with SGD (momentum 0.9) on those cached features.
- ``"mae"``: MAE's ``main_linprobe.py``: the encoder runs live on every training batch,
  which gets a fresh random-resized crop and horizontal flip every epoch, and the head is
  trained with timm's LARS (see :func:`train_mae_probe`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.optim import Lars
from torch import nn

from dsmae.checkpoint import Checkpoint
from dsmae.config import Config, ProbeConfig, ProbeRecipe
from dsmae.data.augment import crop_boxes, random_flips
from dsmae.data.pipeline import augmented_batch, eval_batch
from dsmae.evaluation.frozen import frozen_features, pooled_features
from dsmae.evaluation.results import (
    LabelledSplits,
    TrainedResult,
    labelled_splits,
    result_path,
    warn_if_unwritable,
)
from dsmae.runtime import autocast, generator, resolve_device, use_amp
from dsmae.schedules import lr_at, scaled_lr
from dsmae.seeds import probe_step_seed

log = logging.getLogger(__name__)

MAE_CROP_SCALE = (0.08, 1.0)  # MAE's RandomResizedCrop for the probe (ratio 3/4-4/3)


@dataclass
class ProbeResult(TrainedResult):
    """Outcome of one linear probe (:func:`linprobe`) by ``recipe``; ``top1`` is the last
    epoch's test accuracy in %.

    ``settings`` is the probe configuration it was made with plus ``"data"`` (the data set
    or folder probed on): a result on disk is reused only where it matches."""

    protocol = "linprobe"
    keys = ("top1", "best_top1", "best_epoch", "epochs", "pool", "recipe", "num_train",
            "num_test", "num_classes", "data", "random_init", "checkpoint", "settings")  # fmt: skip

    recipe: str


@dataclass
class ProbeData:
    """What both recipes read: the frozen encoder (eval mode, no gradients, on ``device``),
    the checkpoint's config (with the evaluation's changes) and the labelled splits."""

    encoder: VisionTransformer
    config: Config
    splits: LabelledSplits
    device: torch.device


def probe_head(dim: int, num_classes: int, rng: torch.Generator) -> nn.Sequential:
    """MAE's probe head: ``BatchNorm1d(dim, affine=False, eps=1e-6)`` then ``Linear(dim,
    num_classes)`` with trunc-normal (std 0.01) weights drawn from ``rng`` and zero bias.
    Maps (B, dim) features to (B, num_classes) logits."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=rng)
    nn.init.zeros_(head[1].bias)
    return head


def mae_lars(head: nn.Sequential, lr: float, weight_decay: float) -> Lars:
    """timm's LARS set up as MAE's ``util/lars.py`` behaves: momentum 0.9, trust coefficient
    0.001, and the trust ratio and weight decay on the weight matrix only (MAE exempts every
    1-d parameter: here the bias). timm divides by ``|g| + wd |w|`` where MAE takes
    ``|g + wd w|``: the same for MAE's probe default ``weight_decay = 0``."""
    linear = head[1]
    groups = [
        {"params": [linear.weight], "weight_decay": weight_decay, "always_adapt": True},
        {"params": [linear.bias], "weight_decay": 0.0, "always_adapt": False},
    ]
    return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)


@torch.no_grad()
def _top1(head: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test top-1 (%) of ``head`` on (M, D) features with (M,) labels."""
    head.eval()
    return 100.0 * (head(test_x).argmax(dim=1) == test_y).sum().item() / len(test_y)


def _train_head(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: Callable[[int, torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    probe: ProbeConfig,
    batch: int,
    rng: torch.Generator,
) -> list[float]:
    """The training loop both recipes share: ``probe.epochs`` epochs of ``len(labels) //
    batch`` steps (the last partial batch dropped) in an order drawn from ``rng``, the lr
    of every parameter group set per step (warm-up then half-cosine to 0 from the peak
    ``optimizer.defaults["lr"]``), and the test top-1 after every epoch.

    Args:
        features: (global step, (B,) indices into the train split) -> (B, D) features, on
            the device of ``head``.
        labels: (N,) int64 train labels; test: (M, D) features and (M,) labels.

    Returns:
        the per-epoch test top-1 (%) history.
    """
    peak_lr = optimizer.defaults["lr"]
    steps_per_epoch = max(len(labels) // batch, 1)
    total, warmup = probe.epochs * steps_per_epoch, probe.warmup_epochs * steps_per_epoch
    history, step = [], 0
    for epoch in range(probe.epochs):
        head.train()
        order = torch.randperm(len(labels), generator=rng)
        for start in range(0, steps_per_epoch * batch, batch):
            idx = order[start : start + batch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, peak_lr)
            x = features(step, idx)
            loss = F.cross_entropy(head(x), labels[idx].to(x.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        history.append(_top1(head, *test))
        log.debug("probe epoch %d/%d: test top-1 %.2f%%", epoch + 1, probe.epochs, history[-1])
    return history


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    probe: ProbeConfig,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """The fast recipe: train BatchNorm (no affine) + linear with SGD on fixed features;
    evaluate after every epoch. Head initialisation and data order come from a generator
    seeded with ``seed``.

    Args:
        train_x: (N, D) features; train_y: (N,) int64 labels in [0, num_classes).
        test_x: (M, D); test_y: (M,).

    Returns:
        the last epoch's test top-1 (%) and the per-epoch test top-1 history.
    """
    rng = generator(seed)
    head = probe_head(train_x.shape[1], num_classes, rng)
    batch = min(probe.batch_size, len(train_x))
    optimizer = torch.optim.SGD(
        head.parameters(),
        lr=scaled_lr(probe.base_lr, batch),
        momentum=0.9,
        weight_decay=probe.weight_decay,
    )
    history = _train_head(
        head, optimizer, lambda _, idx: train_x[idx], train_y, (test_x, test_y), probe, batch, rng
    )
    return history[-1], history


@torch.no_grad()
def encode(
    src: ProbeData,
    images: torch.Tensor,
    pool: str,
    amp: bool,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Features of a batch through the frozen encoder, under bf16 autocast where ``amp``.

    Args:
        images: (B, C, H, W) uint8, any device.
        rng: None: resized only (``eval_batch``); else a generator on ``src.device`` for a
            random-resized crop (area ``MAE_CROP_SCALE``, ratio 3/4-4/3) and a flip with
            probability 1/2 per image (``augmented_batch``).

    Returns:
        (B, D) float32 on ``src.device``.
    """
    model, dev = src.config.model, src.device
    x = images.to(dev, non_blocking=True)
    if rng is None:
        x = eval_batch(x, model.img_size, src.config.data.mean, src.config.data.std)
    else:
        boxes = crop_boxes(len(x), MAE_CROP_SCALE, generator=rng, device=dev)
        flips = random_flips(len(x), True, generator=rng, device=dev)
        x = augmented_batch(
            x, model.img_size, boxes, flips, src.config.data.mean, src.config.data.std
        )
    with autocast(dev, amp):
        return pooled_features(src.encoder, x, pool).float()


def train_mae_probe(src: ProbeData, probe: ProbeConfig, seed: int = 0) -> tuple[float, list[float]]:
    """MAE's own recipe (``main_linprobe.py``) with the encoder run live.

    Every training batch is cropped at random (area 0.08-1, ratio 3/4-4/3) and flipped
    with probability 1/2, afresh each epoch, from a generator seeded by (seed, step) on
    the device; :mod:`dsmae.data.augment` resamples the crop bilinearly where MAE's
    torchvision ``RandomResizedCrop`` is bicubic. The frozen encoder (bf16 autocast as the
    checkpoint's ``train.amp`` says: on CUDA by default) gives (B, D) pooled features, and
    the head is trained with :func:`mae_lars` at
    ``lr = base_lr * batch / 256``. The test images are not augmented; as the encoder is
    frozen their features are computed once, and the head is evaluated after every epoch.

    Returns:
        the last epoch's test top-1 (%) and the per-epoch test top-1 history.
    """
    dev, train, test_images = src.device, src.splits.train, src.splits.test.images
    amp = use_amp(dev, src.config.train.amp)
    chunk = probe.batch_size
    test_x = torch.cat(
        [
            encode(src, test_images[i : i + chunk], probe.pool, amp)
            for i in range(0, len(test_images), chunk)
        ]
    )
    rng = generator(seed)
    head = probe_head(test_x.shape[1], len(train.classes), rng).to(dev)
    batch = min(probe.batch_size, len(train.images))
    optimizer = mae_lars(head, scaled_lr(probe.base_lr, batch), probe.weight_decay)

    def features(step: int, idx: torch.Tensor) -> torch.Tensor:
        crops = generator(probe_step_seed(seed, step), dev)
        return encode(src, train.images[idx], probe.pool, amp, crops)

    test = (test_x, src.splits.test.labels.to(dev))
    history = _train_head(head, optimizer, features, train.labels, test, probe, batch, rng)
    return history[-1], history


def _fast_probe(src: ProbeData, probe: ProbeConfig, seed: int) -> tuple[float, list[float]]:
    """The fast recipe on ``src``: features computed once, then :func:`train_linear_probe`."""
    f = frozen_features(src.encoder, src.splits, src.config, probe.pool, src.device)
    return train_linear_probe(
        f.train, f.train_labels, f.test, f.test_labels, len(f.classes), probe, seed
    )


RECIPES: dict[ProbeRecipe, Callable[[ProbeData, ProbeConfig, int], tuple[float, list[float]]]] = {
    "fast": _fast_probe,
    "mae": train_mae_probe,
}


def load_probe_data(encoder: VisionTransformer, cfg: Config) -> ProbeData:
    """Freeze ``encoder`` on ``cfg.train.device`` and load the labelled train and test
    splits of ``cfg.data``.

    Raises:
        DataError: a split without class labels (a folder without class sub-folders).
    """
    splits = labelled_splits(cfg.data, cfg.model, "a linear probe")
    dev = resolve_device(cfg.train.device)
    encoder.eval().requires_grad_(False).to(dev)
    return ProbeData(encoder, cfg, splits, dev)


def linprobe(
    checkpoint: Checkpoint, cfg: Config | None = None, *, random_init: bool = False
) -> ProbeResult:
    """Linear-probe the encoder of ``checkpoint`` (with ``random_init``: its architecture
    at random initialisation, seeded by ``cfg.train.seed``) by ``cfg.probe.recipe`` and
    write the result beside it (:meth:`ProbeResult.save`).

    ``cfg`` is the checkpoint's config with the evaluation's changes (default: the
    checkpoint's own): the probe runs with its ``probe`` section on ``data``, on
    ``train.device``, seeded by ``train.seed``.

    Raises:
        ConfigError: an impossible ``probe`` section (e.g. an unknown ``recipe``).
        DataError: a split without class labels.
    """
    cfg = checkpoint.config if cfg is None else cfg
    probe = cfg.probe
    probe.validate()  # a config built without build_config (e.g. dataclasses.replace)
    warn_if_unwritable(result_path(checkpoint.path, "linprobe", random_init, probe.pool))
    encoder = checkpoint.encoder(random_init=random_init, seed=cfg.train.seed)
    src = load_probe_data(encoder, cfg)
    _, history = RECIPES[probe.recipe](src, probe, cfg.train.seed)
    trained = ProbeResult.trained_fields(history, probe, src.splits.data)
    measured = src.splits.measured_on(checkpoint, random_init)
    result = ProbeResult(**trained, **measured, pool=probe.pool, recipe=probe.recipe)
    out = result.keep()
    log.info(
        "linear probe (%s recipe) top-1 %.2f%% (last epoch; best %.2f%% at epoch %d) -> %s",
        probe.recipe,
        result.top1,
        result.best_top1,
        result.best_epoch,
        out or "not saved",
    )
    return result
