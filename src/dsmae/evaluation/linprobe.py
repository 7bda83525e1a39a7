"""Linear probing (MAE protocol, SPEC section 6).

The encoder is frozen and run once over the train and test splits (no augmentation);
on those cached features a ``BatchNorm1d(affine=False)`` + ``Linear`` classifier is
trained with SGD (momentum 0.9, ``lr = base_lr * batch / 256``, warm-up then cosine,
MAE's head initialisation), and the top-1 of the LAST epoch on the test split is the
result. The best epoch's top-1 is recorded beside it, labelled as such.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsmae.checkpoint import load_checkpoint
from dsmae.config import ProbeConfig, config_from_dict
from dsmae.evaluation.frozen import best_epoch, frozen_features, save_result
from dsmae.runtime import generator
from dsmae.schedules import lr_at

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    """Outcome of one linear probe; ``top1`` is the last epoch's test accuracy in %."""

    top1: float
    best_top1: float
    best_epoch: int
    epochs: int
    pool: str
    num_train: int
    num_test: int
    num_classes: int
    data: str
    random_init: bool
    checkpoint: str


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    probe: ProbeConfig,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """Train BatchNorm (no affine) + linear on fixed features; evaluate after every epoch.

    Args:
        train_x: (N, D) features; train_y: (N,) int64 labels in [0, num_classes).
        test_x: (M, D); test_y: (M,).

    Returns:
        the last epoch's test top-1 (%) and the per-epoch test top-1 history.
    """
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
        nn.Linear(train_x.shape[1], num_classes),
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    batch = min(probe.batch_size, len(train_x))
    peak_lr = probe.base_lr * batch / 256
    optimizer = torch.optim.SGD(
        head.parameters(), lr=peak_lr, momentum=0.9, weight_decay=probe.weight_decay
    )
    steps_per_epoch = max(len(train_x) // batch, 1)
    total, warmup = probe.epochs * steps_per_epoch, probe.warmup_epochs * steps_per_epoch
    order_rng = generator(seed)
    history, step = [], 0
    for _ in range(probe.epochs):
        head.train()
        order = torch.randperm(len(train_x), generator=order_rng)
        for start in range(0, steps_per_epoch * batch, batch):
            idx = order[start : start + batch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, peak_lr)
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        head.eval()
        with torch.no_grad():
            correct = (head(test_x).argmax(dim=1) == test_y).sum().item()
        history.append(100.0 * correct / len(test_y))
    return history[-1], history


def linprobe(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    data_root: str | None = None,
    download: bool | None = None,
    skip_bad_images: bool | None = None,
    random_init: bool = False,
    probe: ProbeConfig | None = None,
    probe_overrides: Mapping[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
) -> ProbeResult:
    """Linear-probe the encoder of ``checkpoint`` on ``data`` (default: the data set it was
    pre-trained on) and write ``<checkpoint stem>.linprobe[-random-init].json`` beside it.

    The probe's settings are ``probe`` (default: the checkpoint's ``probe`` section) with
    ``probe_overrides`` (field name -> value) on top.
    """
    saved = config_from_dict(load_checkpoint(checkpoint)["config"]).probe
    probe = dataclasses.replace(probe or saved, **(probe_overrides or {}))
    feats = frozen_features(
        checkpoint,
        pool=probe.pool,
        purpose="a linear probe",
        data=data,
        data_root=data_root,
        download=download,
        skip_bad_images=skip_bad_images,
        random_init=random_init,
        device=device,
        seed=seed,
    )
    top1, history = train_linear_probe(
        feats.train,
        feats.train_labels,
        feats.test,
        feats.test_labels,
        len(feats.classes),
        probe,
        seed=seed,
    )
    best_top1, best = best_epoch(history)
    result = ProbeResult(
        top1=top1,
        best_top1=best_top1,
        best_epoch=best,
        epochs=probe.epochs,
        pool=probe.pool,
        num_train=len(feats.train),
        num_test=len(feats.test),
        num_classes=len(feats.classes),
        data=feats.data,
        random_init=random_init,
        checkpoint=str(checkpoint),
    )
    out = save_result(checkpoint, "linprobe", random_init, result)
    log.info(
        "linear probe top-1 %.2f%% (last epoch; best %.2f%% at epoch %d) -> %s",
        top1,
        best_top1,
        best,
        out,
    )
    return result
