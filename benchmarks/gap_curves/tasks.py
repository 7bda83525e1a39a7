"""The tasks: a pre-training to an epoch, and the evaluation of a checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from dsmae.experiments.cells import pretraining_seconds

from .claims import claim, done_path
from .study import VARIANTS, Study, Task, log


def train(study: Study, task: Task) -> dict[str, Any]:
    """Pre-train (or resume) ``task``'s run to its epoch."""
    from dsmae.checkpoint import load_checkpoint
    from dsmae.pretrain import pretrain

    cfg = study.config(task.variant, task.seed)
    result = pretrain(cfg, resume="auto", until_epoch=task.epoch)
    step = load_checkpoint(result.checkpoint)["step"]
    return {
        "checkpoint": str(result.checkpoint),
        "steps_per_epoch": step // task.epoch,
        "last": result.last_metrics,
    }


def checkpoint_of(study: Study, variant: str, seed: int, epoch: int) -> Path:
    """The checkpoint of a run after ``epoch`` (``last.pt`` after the schedule's end)."""
    folder = study.run_folder(variant, seed)
    if epoch == study.epochs:
        return folder / "last.pt"
    last = study.epochs if seed == 0 else study.spread_epoch
    trained = json.loads(done_path(study, Task("train", variant, seed, last)).read_text())
    return folder / f"checkpoint-{epoch * trained['steps_per_epoch']:08d}.pt"


_SPLITS: dict[str, Any] = {}


def evaluate(study: Study, task: Task) -> dict[str, Any]:
    """Linear probe (fast recipe) and k-NN top-1 of a checkpoint's encoder (avg pool)."""
    from dsmae.checkpoint import Checkpoint
    from dsmae.config import MonitorConfig, ProbeConfig
    from dsmae.evaluation.frozen import frozen_features
    from dsmae.evaluation.knn import knn_accuracy
    from dsmae.evaluation.linprobe import train_linear_probe
    from dsmae.evaluation.results import labelled_splits

    random_init = task.variant == "random-init"
    variant = next(iter(VARIANTS)) if random_init else task.variant
    epoch = study.epochs if random_init else task.epoch
    path = checkpoint_of(study, variant, task.seed, epoch)
    checkpoint = Checkpoint.read(path)
    cfg = checkpoint.config
    if "splits" not in _SPLITS:  # the same labelled splits for every checkpoint
        _SPLITS["splits"] = labelled_splits(cfg.data, cfg.model, "the study")
    splits = _SPLITS["splits"]
    encoder = checkpoint.encoder(random_init=random_init, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    f = frozen_features(encoder, splits, cfg, "avg", device)
    probe, knn = ProbeConfig(), MonitorConfig()
    classes = len(f.classes)
    top1, history = train_linear_probe(
        f.train, f.train_labels, f.test, f.test_labels, classes, probe
    )
    knn_top1 = knn_accuracy(
        f.train, f.train_labels, f.test, f.test_labels, classes,
        k=knn.knn_k, temperature=knn.knn_temperature,
    )  # fmt: skip
    step = int(checkpoint.state["step"])
    batch = cfg.train.batch_size
    metrics = path.parent / "metrics.jsonl"
    seconds = 0.0 if random_init else pretraining_seconds(metrics, step, batch)
    return {
        "variant": task.variant,
        "seed": task.seed,
        "epoch": task.epoch,
        "step": 0 if random_init else step,
        "checkpoint": str(path),
        "linprobe": top1,
        "linprobe_best": max(history),
        "knn": knn_top1,
        "pretrain_s": seconds,
        "images_seen": 0 if random_init else step * batch,
    }


def work(study: Study) -> None:
    """Take tasks from the queue until none is left."""
    from dsmae.runtime import keep_freed_memory

    keep_freed_memory()
    while (task := claim(study)) is not None:
        started = time.perf_counter()
        log.info("%s: start", task.name)
        result = train(study, task) if task.kind == "train" else evaluate(study, task)
        result["task_s"] = time.perf_counter() - started
        result["threads"] = torch.get_num_threads()
        path = done_path(study, task)
        path.write_text(json.dumps(result, indent=2) + "\n")
        (study.out / "claims" / f"{task.name}.pid").unlink(missing_ok=True)
        log.info("%s: done in %.0f s", task.name, result["task_s"])
