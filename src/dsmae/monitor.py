"""Watching a pre-training run every few epochs: an online k-NN classifier on encoder
features (as solo-learn and lightly track quality) and a Fig. 2 grid in TensorBoard."""

from __future__ import annotations

import logging

import numpy as np
import torch

from dsmae.config import Config
from dsmae.data.pipeline import eval_batch, load_split
from dsmae.data.sources import DataError, ImageTensors
from dsmae.evaluation.frozen import extract_features
from dsmae.evaluation.knn import knn_accuracy
from dsmae.metrics import MetricsLog
from dsmae.models import DSMAE
from dsmae.runtime import generator
from dsmae.visualize import denoise, to_uint8_images, triplet_grid

log = logging.getLogger(__name__)


class Monitor:
    """Runs the monitors that are due after an epoch; data is loaded on first use."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self._splits: tuple[ImageTensors, ImageTensors] | None = None
        self._knn_off = cfg.monitor.knn_every == 0

    def after_epoch(
        self,
        model: DSMAE,
        epoch: int,
        step: int,
        wall_s: float,
        flops: float,
        metrics: MetricsLog,
    ) -> None:
        """``epoch`` epochs are done (1-based), after ``step`` steps, ``wall_s`` seconds and
        ``flops`` model FLOPs of training."""
        mon = self.cfg.monitor
        if mon.images_every and epoch % mon.images_every == 0:
            grid = self.denoising_grid(model)
            if grid is not None:
                metrics.add_image("denoise", grid, step)
        if not self._knn_off and epoch % mon.knn_every == 0:
            top1 = self.knn_top1(model)
            if top1 is not None:
                record = {
                    "step": step,
                    "epoch": epoch,
                    "knn_top1": top1,
                    "wall_s": wall_s,
                    "flops": flops,
                }
                metrics.write(record)
                log.info("epoch %d: k-NN top-1 %.2f%%", epoch, top1)

    def _load(self) -> tuple[ImageTensors, ImageTensors] | None:
        if self._splits is None:
            try:
                self._splits = tuple(
                    load_split(self.cfg.data, self.cfg.model, s) for s in ("train", "test")
                )
            except DataError as err:
                log.warning("monitoring without labelled train/test splits: %s", err)
                self._knn_off = True
                return None
        return self._splits

    def knn_top1(self, model: DSMAE) -> float | None:
        """k-NN (cosine, temperature-weighted) top-1 in % of the student's features, train ->
        test split; None when the data has no labelled splits."""
        splits = self._load()
        if splits is None or any(not s.classes or bool((s.labels < 0).any()) for s in splits):
            if not self._knn_off:
                log.warning(
                    "k-NN monitor off: %s has no labelled train/test splits", self.cfg.data.source
                )
            self._knn_off = True
            return None
        train, test = splits
        d, m, mon = self.cfg.data, self.cfg.model, self.cfg.monitor
        was_training = model.encoder.training
        feats = [
            extract_features(
                model.encoder,
                s.images,
                size=m.img_size,
                mean=d.mean,
                std=d.std,
                pool=self.cfg.probe.pool,
                device=self.device,
            )
            for s in (train, test)
        ]
        model.encoder.train(was_training)
        return knn_accuracy(
            feats[0],
            train.labels,
            feats[1],
            test.labels,
            len(train.classes),
            k=mon.knn_k,
            temperature=mon.knn_temperature,
        )

    def denoising_grid(self, model: DSMAE) -> np.ndarray | None:
        """(H, W, C) uint8 Fig. 2 grid of the first train images (fixed, not augmented)."""
        splits = self._load()
        if splits is None:
            return None
        d, n = self.cfg.data, self.cfg.monitor.num_images
        images = eval_batch(
            splits[0].images[:n].to(self.device), self.cfg.model.img_size, d.mean, d.std
        )
        result = denoise(model, images, generator(self.cfg.train.seed, self.device))
        if result is None:
            return None
        columns = [to_uint8_images(x, d.mean, d.std) for x in (*result[:2], images)]
        scale = max(1, 96 // images.shape[-1])
        return np.asarray(triplet_grid(columns, per_row=2, scale=scale).convert("RGB"))
