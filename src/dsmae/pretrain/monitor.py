"""Watching a pre-training run every few epochs: an online k-NN classifier on encoder
features (as solo-learn and lightly track quality), representation health (feature std,
effective rank, teacher-student cosine: a collapse shows as a number), each loss term's
share of the encoder's gradient (whether ``L_z`` steers the encoder at all) and a Fig. 2
grid in TensorBoard."""

from __future__ import annotations

import logging

import numpy as np
import torch

from dsmae.config import Config
from dsmae.data.images import DataError, ImageTensors
from dsmae.data.pipeline import eval_batch, load_split
from dsmae.evaluation.frozen import extract_features
from dsmae.evaluation.knn import knn_accuracy
from dsmae.health import (
    effective_rank,
    feature_std,
    gradient_share,
    teacher_student_cosine,
    term_gradients,
)
from dsmae.metrics import MetricsLog
from dsmae.models import PretrainModel, patch_tokens
from dsmae.runtime import generator
from dsmae.seeds import monitor_seed
from dsmae.visualize import denoise, to_uint8_images, triplet_grid

log = logging.getLogger(__name__)

HEALTH_IMAGES = 256  # the fixed sample of pre-training images the health numbers read
HEALTH_BATCH = 64  # images per forward pass of the health monitor, and of the gradients'


class Monitor:
    """Runs the monitors that are due after an epoch; data is loaded on first use, once."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self._loaded = False  # the train/test splits were asked for (loaded or not)
        self._train: ImageTensors | None = None
        self._splits: tuple[ImageTensors, ImageTensors] | None = None
        self._knn_off = False  # no labelled train/test splits
        self._health_images: torch.Tensor | None = None  # (n, C, H, W) uint8, fixed
        self._health_off = False  # no pre-training images at all

    def after_epoch(
        self,
        model: PretrainModel,
        epoch: int,
        step: int,
        wall_s: float,
        flops: float,
        metrics: MetricsLog,
    ) -> None:
        """``epoch`` epochs are done (1-based), after ``step`` steps, ``wall_s`` seconds and
        ``flops`` model FLOPs of training.

        One metrics record holds what is due: every ``monitor.knn_every`` epochs the k-NN
        top-1 (where the data has labelled train/test splits), every ``monitor.every``
        epochs the ``health_*`` numbers of :meth:`health` and :meth:`gradient_share`.
        """
        mon = self.cfg.monitor
        if mon.images_every and epoch % mon.images_every == 0:
            grid = self.denoising_grid(model)
            if grid is not None:
                metrics.add_image("denoise", grid, step)
        record: dict[str, float | int] = {}
        if mon.knn_every and epoch % mon.knn_every == 0:
            top1 = self.knn_top1(model)
            if top1 is not None:
                record["knn_top1"] = top1
                log.info("epoch %d: k-NN top-1 %.2f%%", epoch, top1)
        if mon.every and epoch % mon.every == 0:
            health = self.health(model)
            if health is not None:
                health.update(self.gradient_share(model) or {})
                record.update(health)
                log.info("epoch %d: %s", epoch, _describe_health(health, model.encoder.embed_dim))
        if record:
            metrics.write(
                {"step": step, "epoch": epoch, **record, "wall_s": wall_s, "flops": flops}
            )

    def _load(self) -> tuple[ImageTensors, ImageTensors] | None:
        """The train and test splits; None (and the k-NN off) where either cannot be loaded.
        Tried once; a train split that loads is kept for the grid and health."""
        if not self._loaded:
            self._loaded = True
            d, m = self.cfg.data, self.cfg.model
            try:
                self._train = load_split(d, m, "train")
                self._splits = (self._train, load_split(d, m, "test"))
            except DataError as err:
                log.warning("monitoring without labelled train/test splits: %s", err)
                self._knn_off = True
        return self._splits

    def knn_top1(self, model: PretrainModel) -> float | None:
        """k-NN (cosine, temperature-weighted) top-1 in % of the student's features, train ->
        test split; None when the data has no labelled splits."""
        splits = self._load()
        if splits is None or self._knn_off:
            return None
        if any(not s.classes or bool((s.labels < 0).any()) for s in splits):
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

    def denoising_grid(self, model: PretrainModel) -> np.ndarray | None:
        """(H, W, C) uint8 Fig. 2 grid of the first train images (fixed, not augmented);
        None without a train split."""
        self._load()
        if self._train is None:
            return None
        d, n = self.cfg.data, self.cfg.monitor.num_images
        images = eval_batch(
            self._train.images[:n].to(self.device), self.cfg.model.img_size, d.mean, d.std
        )
        result = denoise(model, images, generator(self.cfg.train.seed, self.device))
        if result is None:
            return None
        columns = [to_uint8_images(x, d.mean, d.std) for x in (*result[:2], images)]
        scale = max(1, 96 // images.shape[-1])
        return np.asarray(triplet_grid(columns, per_row=2, scale=scale).convert("RGB"))

    def health_images(self) -> torch.Tensor | None:
        """(n, C, H, W) uint8: the fixed sample the health numbers read, the first
        ``HEALTH_IMAGES`` (or all, if fewer) of a permutation seeded with ``train.seed`` of
        the train split, else of the pre-training split; None when neither loads."""
        if self._health_images is None and not self._health_off:
            self._load()
            images = None if self._train is None else self._train.images
            if images is None:
                try:
                    images = load_split(self.cfg.data, self.cfg.model, "pretrain").images
                except DataError as err:
                    log.warning("representation health monitor off: %s", err)
            if images is None or len(images) == 0:
                self._health_off = True
                return None
            order = torch.randperm(len(images), generator=generator(self.cfg.train.seed))
            self._health_images = images[order[:HEALTH_IMAGES]]  # a copy
        return self._health_images

    @torch.no_grad()
    def health(self, model: PretrainModel) -> dict[str, float] | None:
        """Representation health of the student's patch tokens (after the final norm) on
        :meth:`health_images`, normalised as the k-NN features are, with the model in eval
        mode (its train mode is restored after).

        The (n, N, D) tokens are flattened to (n * N, D) rows: ``health_feature_std``
        (:func:`~dsmae.health.feature_std`), ``health_effective_rank``
        (:func:`~dsmae.health.effective_rank`) and, for the methods with an EMA teacher,
        ``health_teacher_cosine`` (:func:`~dsmae.health.teacher_student_cosine`, the
        teacher's tokens of the same images). None when there are no images.
        """
        images = self.health_images()
        if images is None:
            return None
        d, m = self.cfg.data, self.cfg.model
        student: list[torch.Tensor] = []
        teacher: list[torch.Tensor] = []
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(images), HEALTH_BATCH):
                batch = images[start : start + HEALTH_BATCH].to(self.device)
                x = eval_batch(batch, m.img_size, d.mean, d.std)  # (B, C, H, W)
                student.append(patch_tokens(model.encoder, x).flatten(0, 1).float())  # (B*N, D)
                if model.teacher is not None:
                    teacher.append(patch_tokens(model.teacher, x).flatten(0, 1).float())
        finally:
            model.train(was_training)
        tokens = torch.cat(student)  # (n * N, D)
        numbers = {
            "health_feature_std": float(feature_std(tokens)),
            "health_effective_rank": float(effective_rank(tokens)),
        }
        if teacher:
            numbers["health_teacher_cosine"] = float(
                teacher_student_cosine(tokens, torch.cat(teacher))
            )
        return numbers

    def gradient_share(self, model: PretrainModel) -> dict[str, float] | None:
        """Each weighted loss term's gradient on the student encoder
        (:func:`~dsmae.health.gradient_share`: ``health_grad_norm_y``,
        ``health_grad_norm_z``, their ratio and cosine) on one fixed batch: the first
        ``HEALTH_BATCH`` of :meth:`health_images`, normalised as the k-NN features are,
        corrupted by a draw seeded with :func:`~dsmae.seeds.monitor_seed`.

        Training is untouched: the gradients are taken with ``torch.autograd.grad``, so no
        parameter's ``.grad`` changes, and the draw uses a generator of its own. None
        when there are no images.
        """
        images = self.health_images()
        if images is None:
            return None
        d, m = self.cfg.data, self.cfg.model
        x = eval_batch(images[:HEALTH_BATCH].to(self.device), m.img_size, d.mean, d.std)
        rng = generator(monitor_seed(self.cfg.train.seed), self.device)
        mask, eps = model.sample_corruption(len(x), rng, self.device)

        def weighted_terms() -> dict[str, torch.Tensor]:
            out = model(x, mask=mask, eps=eps)
            both = out.loss_y is not None and out.loss_z is not None
            weights = {"y": m.lam if both else 1.0, "z": 1.0 - m.lam if both else 1.0}
            losses = (("y", out.loss_y), ("z", out.loss_z))
            return {name: weights[name] * loss for name, loss in losses if loss is not None}

        params = [p for p in model.encoder.parameters() if p.requires_grad]
        was_training = model.training
        model.eval()  # no dropout or drop-path draws: the same pass each time, training's
        try:  # random streams untouched
            with torch.enable_grad():
                grads = term_gradients(weighted_terms, params)
        finally:
            model.train(was_training)
        share = gradient_share(grads.get("y"), grads.get("z"))
        return {f"health_{key}": value for key, value in share.items()}


def _describe_health(health: dict[str, float], dim: int) -> str:
    """One log line of :meth:`Monitor.health`'s numbers, beside their healthy values."""
    text = (
        f"feature std {health['health_feature_std']:.4f} (collapsed 0, healthy "
        f"~{dim**-0.5:.4f}), effective rank {health['health_effective_rank']:.1f} of {dim}"
    )
    if "health_teacher_cosine" in health:
        text += f", teacher-student cosine {health['health_teacher_cosine']:.3f}"
    if "health_grad_ratio_z_y" in health:
        text += (
            f"; encoder gradient of (1-lam) L_z / lam L_y {health['health_grad_ratio_z_y']:.3f}, "
            f"cosine {health['health_grad_cosine_y_z']:.3f}"
        )
    return text
