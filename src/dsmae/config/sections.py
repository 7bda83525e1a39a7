"""The sections of a run's configuration, each a dataclass of its keys, their defaults
and its ``validate`` (refusing impossible values, naming the key): model, data, train,
monitor, probe, finetune, log, and :class:`Config`, which holds them all.

The defaults are the paper's CIFAR-10 / ViT-Tiny pre-training setting (SPEC section 5).
The fields marked :data:`RESUMABLE` may differ when a run resumes (:func:`resumable_keys`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from dsmae.config import choices
from dsmae.config.checks import check_choice, check_crop_scale, parse_duration, require

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
WANDB_FORBIDDEN = "/\\#?%:"  # characters a W&B project name cannot hold


# Field metadata of the keys that may differ between a run and its resumption: where and
# how the run computes, not what it learns (see resumable_keys).
RESUMABLE = types.MappingProxyType({"resumable": True})


def resumable(default: Any) -> Any:
    """A field marked :data:`RESUMABLE`, with this default."""
    return field(default=default, metadata=RESUMABLE)


@dataclass
class ModelConfig:
    """The pre-training model (SPEC sections 1-4)."""

    method: choices.Method = "dsmae"
    arch: choices.Arch = "vit_tiny"
    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    depth: int | None = None  # None: from arch
    embed_dim: int | None = None  # None: from arch
    num_heads: int | None = None  # None: from arch
    mlp_ratio: float = 4.0
    noise_ratio: float | None = None  # None: 0.9 for the DSMAE variants, 0.75 for mae
    noise_std: float = 1.0
    noise_mode: choices.NoiseMode = "add"
    lam: float = 0.6
    norm_pix_loss: bool = True
    decoder_depth: int = 4
    decoder_dim: int | None = None  # None: encoder width (MAE's original: 512)
    decoder_heads: int | None = None  # None: encoder heads (MAE's original: 16)
    regressor_depth: int = 2
    target_norm: choices.TargetNorm = "layernorm"  # teacher tokens standardised per token (SPEC 3)
    # beyond the paper, off by default (SPEC 3): the target averages the teacher's top K
    # blocks as data2vec does (1: its final tokens); the teacher sees only the noisy
    # positions' clean patches as SdAE's does ("clean": the whole clean image)
    target_layers: int = 1
    teacher_input: choices.TeacherInput = "clean"

    def validate(self) -> None:
        """Refuse impossible model settings (expects a resolved ModelConfig)."""
        from dsmae.masking import num_selected  # imports torch: kept out of `dsmae --help`

        check_choice("model.method", self.method, choices.METHODS)
        check_choice("model.arch", self.arch, tuple(choices.ARCHS))
        check_choice("model.noise_mode", self.noise_mode, choices.NOISE_MODES)
        check_choice("model.target_norm", self.target_norm, choices.TARGET_NORMS)
        check_choice("model.teacher_input", self.teacher_input, choices.TEACHER_INPUTS)
        require(self.in_chans in (1, 3), "model.in_chans", f"must be 1 or 3, got {self.in_chans}")
        require(self.img_size >= 1, "model.img_size", f"must be positive, got {self.img_size}")
        size, patch = self.img_size, self.patch_size
        require(patch >= 1, "model.patch_size", f"must be positive, got {patch}")
        require(
            size % patch == 0, "model.patch_size", f"{patch} does not divide model.img_size={size}"
        )
        for key in ("depth", "embed_dim", "num_heads", "decoder_dim", "decoder_heads"):
            value = getattr(self, key)
            require(value is not None and value >= 1, f"model.{key}", f"must be >= 1, got {value}")
        for key, dim, heads in (
            ("model.embed_dim", self.embed_dim, self.num_heads),
            ("model.decoder_dim", self.decoder_dim, self.decoder_heads),
        ):
            require(dim % heads == 0, key, f"{dim} is not divisible by the {heads} heads")
            require(dim % 4 == 0, key, f"{dim} must be a multiple of 4 (2-D sin-cos embedding)")
        for key in ("decoder_depth", "regressor_depth"):
            value = getattr(self, key)
            require(value >= 0, f"model.{key}", f"must be >= 0, got {value}")
        r = self.noise_ratio
        require(r is not None and 0 < r <= 1, "model.noise_ratio", f"must be in (0, 1], got {r}")
        n = (size // patch) ** 2
        k = num_selected(n, r)
        require(k >= 1, "model.noise_ratio", f"{r} of {n} patches selects none")
        if choices.METHOD_TRAITS[self.method].drops_patches:
            require(
                k < n,
                "model.noise_ratio",
                f"{r} masks all {n} patches; {self.method} needs a visible one",
            )
        require(0 <= self.lam <= 1, "model.lam", f"must be in [0, 1], got {self.lam}")
        require(self.noise_std >= 0, "model.noise_std", f"must be >= 0, got {self.noise_std}")
        require(
            0 < self.mlp_ratio <= 64,
            "model.mlp_ratio",
            f"must be in (0, 64] (the MLP's width over the encoder's), got {self.mlp_ratio}",
        )
        self._validate_teacher_target()

    def _validate_teacher_target(self) -> None:
        """Refuse a teacher-target option out of range, or set for a method without a
        teacher (it would be ignored)."""
        layers = self.target_layers
        require(
            1 <= layers <= self.depth,
            "model.target_layers",
            f"must be in [1, model.depth={self.depth}], got {layers}",
        )
        if self.method in choices.METHODS_WITH_TEACHER:
            return
        for key, default in (("target_layers", 1), ("teacher_input", "clean")):
            require(
                getattr(self, key) == default,
                f"model.{key}",
                f"{self.method} has no teacher: leave it at {default!r}",
            )


@dataclass
class DataConfig:
    """Where images come from and how they are augmented for pre-training."""

    source: str = "cifar10"  # digits | cifar10 | cifar100 | stl10 | a folder | WebDataset shards
    root: str = resumable("~/.cache/dsmae/datasets")  # torchvision data sets live here
    download: bool = resumable(False)
    subset: int | None = None  # pre-train on a fixed random sample of N images
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    mean: list[float] | None = None  # None: measured on the pre-training images
    std: list[float] | None = None
    skip_bad_images: bool = False  # skip (and count) unreadable files of a folder or shards
    # a stream of WebDataset shards (dsmae.data.shards): the images of one epoch
    samples_per_epoch: int | None = None
    shuffle_buffer: int = 10_000  # a stream: samples each of its readers mixes at a time
    workers: int = 4  # a stream: reader processes per training process (0: in it)

    def validate(self, in_chans: int) -> None:
        """Refuse impossible data settings for images of ``in_chans`` channels."""
        check_crop_scale("data.crop_scale", self.crop_scale)
        for key in ("mean", "std"):
            value = getattr(self, key)
            require(
                value is None or len(value) == in_chans,
                f"data.{key}",
                f"needs one value per channel ({in_chans}), got {value}",
            )
        std, subset = self.std, self.subset
        require(std is None or min(std) > 0, "data.std", f"must be positive, got {std}")
        require(subset is None or subset >= 1, "data.subset", f"must be >= 1, got {subset}")
        require(
            not (self.download and os.path.isdir(os.path.expanduser(self.source))),
            "data.download",
            f"data.source={self.source!r} is a folder; there is nothing to download",
        )
        self._validate_stream()

    def _validate_stream(self) -> None:
        """Refuse impossible stream settings, and for a source of WebDataset shards the
        settings a stream cannot honour (``samples_per_epoch`` is ignored by the other
        sources, whose epoch is all their images: checkpoints of a stream carry it into
        evaluations on a folder)."""
        from dsmae.data.sources import is_shard_source  # imports torch: kept out of `--help`

        buffer, workers, per_epoch = self.shuffle_buffer, self.workers, self.samples_per_epoch
        require(buffer >= 1, "data.shuffle_buffer", f"must be >= 1 (1: no shuffling), got {buffer}")
        require(workers >= 0, "data.workers", f"must be >= 0 (0: none), got {workers}")
        require(
            per_epoch is None or per_epoch >= 1,
            "data.samples_per_epoch",
            f"must be >= 1, got {per_epoch}",
        )
        if not is_shard_source(self.source):
            return
        stream = f"data.source={self.source!r} names WebDataset shards, a stream"
        require(
            per_epoch is not None,
            "data.samples_per_epoch",
            f"{stream} of unknown length: set the images of one epoch, e.g. --set "
            "data.samples_per_epoch=50000 (dsmae shards prints the number it wrote)",
        )
        require(
            self.subset is None,
            "data.subset",
            f"{stream}; set data.samples_per_epoch instead, the images of one epoch",
        )
        require(not self.download, "data.download", f"{stream}; there is nothing to download")


@dataclass
class TrainConfig:
    """Optimisation of pre-training (SPEC section 5) and how it runs."""

    epochs: int = 500
    warmup_epochs: int = 20
    batch_size: int = 2048  # the global (effective) batch of one optimizer step
    micro_batch: int | None = resumable(None)  # per device; None: batch / devices, no accumulation
    base_lr: float = 1.5e-4
    lr: float | None = None  # None: base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum_start: float = 0.96
    momentum_end: float = 0.99
    ema_every: choices.EmaEvery = "epoch"  # teacher update once per epoch (SdAE, SPEC 3)
    device: str = resumable("auto")  # auto | cpu | cuda | cuda:N (under torchrun: each rank's GPU)
    amp: bool | None = None  # bf16 autocast; None: on for CUDA, off on CPU
    compile: bool | None = resumable(None)  # torch.compile the step; None: on for CUDA, off on CPU
    compile_scope: choices.CompileScope = resumable("model")  # "model": step as one graph
    compile_backend: str = resumable("inductor")  # torch.compile's backend (e.g. aot_eager)
    compile_mode: choices.CompileMode = resumable("default")  # Inductor's mode
    attention: choices.AttentionKernel = resumable("auto")  # SDPA kernel (auto: torch's)
    bf16_residual: bool = False  # under autocast, the residual stream in bf16 (models/precision)
    fast_norm: bool = False  # under autocast, LayerNorm in bf16 (timm's fast norm)
    grad_checkpointing: bool = resumable(False)  # recompute encoder block activations in backward
    data_on_device: bool | None = resumable(None)  # uint8 data set kept on the GPU; None: on CUDA
    seed: int = 0
    grad_clip: float = 0.0  # clip the gradient norm to this; 0: off
    max_bad_steps: int = resumable(10)  # stop after this many non-finite steps in a row; 0: never
    dist_timeout_minutes: float = resumable(15.0)  # a rank waiting longer on the others fails
    checkpoint_every: int = resumable(50)  # epochs; 0: off
    checkpoint_minutes: float = resumable(30.0)  # also every this many minutes; 0: off
    keep_checkpoints: int = resumable(3)  # periodic checkpoints kept (the newest); 0: all
    log_every: int = resumable(10)  # optimizer steps between metric lines
    # a wall-clock budget such as "2h": train.epochs fitted to it, kept on a resume
    # (dsmae.budget); None: train.epochs as set
    time_budget: str | None = resumable(None)

    def validate(self, world_size: int) -> None:
        """Refuse impossible training settings for a run of ``world_size`` processes."""
        require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        warmup, batch = self.warmup_epochs, self.batch_size
        require(warmup >= 0, "train.warmup_epochs", f"must be >= 0, got {warmup}")
        require(batch >= 1, "train.batch_size", f"must be >= 1, got {batch}")
        per_device, micro = batch // world_size, self.micro_batch
        require(
            micro is not None and micro >= 1 and per_device % micro == 0,
            "train.micro_batch",
            f"must divide the per-device batch {per_device} (train.batch_size={batch} over "
            f"{world_size} processes), got {micro}",
        )
        require(self.base_lr > 0, "train.base_lr", f"must be positive, got {self.base_lr}")
        require(self.lr is not None and self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        for key in ("momentum_start", "momentum_end"):
            value = getattr(self, key)
            require(0 <= value < 1, f"train.{key}", f"must be in [0, 1), got {value}")
        check_choice("train.ema_every", self.ema_every, choices.EMA_EVERY)
        check_choice("train.compile_scope", self.compile_scope, choices.COMPILE_SCOPES)
        check_choice("train.compile_mode", self.compile_mode, choices.COMPILE_MODES)
        check_choice("train.attention", self.attention, choices.ATTENTION_KERNELS)
        require(bool(self.compile_backend), "train.compile_backend", "must name a backend")
        require(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            "train.device",
            f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )
        self._validate_safety()

    def _validate_safety(self) -> None:
        """Refuse impossible clipping, divergence, timeout, logging and checkpoint settings."""
        clip, bad = self.grad_clip, self.max_bad_steps
        require(clip >= 0, "train.grad_clip", f"must be >= 0 (0: off), got {clip}")
        require(bad >= 0, "train.max_bad_steps", f"must be >= 0, got {bad}")
        require(self.dist_timeout_minutes > 0, "train.dist_timeout_minutes", "must be positive")
        require(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        require(self.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0")
        require(self.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0")
        if self.time_budget is not None:
            parse_duration(self.time_budget)


@dataclass
class MonitorConfig:
    """What is watched during pre-training, every N epochs (0: never)."""

    knn_every: int = 20  # k-NN top-1 on encoder features of the train/test splits
    # representation health and each loss term's share of the encoder gradient
    # (health_* numbers), on fixed images
    every: int = 20
    knn_k: int = 20
    knn_temperature: float = 0.07
    images_every: int = 20  # Fig. 2 grid of fixed images to TensorBoard
    num_images: int = 8

    def validate(self) -> None:
        """Refuse impossible monitor settings."""
        for key in ("knn_every", "every", "images_every"):
            require(getattr(self, key) >= 0, f"monitor.{key}", "must be >= 0")
        require(self.knn_k >= 1, "monitor.knn_k", f"must be >= 1, got {self.knn_k}")
        require(self.knn_temperature > 0, "monitor.knn_temperature", "must be positive")
        require(self.num_images >= 1, "monitor.num_images", "must be >= 1")


@dataclass
class ProbeConfig:
    """Linear probing (MAE protocol): frozen features, BatchNorm without affine + linear.

    ``pool`` is also what ``dsmae knn``, ``dsmae features`` and the k-NN monitor read."""

    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 256
    base_lr: float = 0.1  # SGD, momentum 0.9, lr = base_lr * batch_size / 256
    weight_decay: float = 0.0
    pool: choices.Pool = "avg"  # mean of the patch tokens (SPEC 6); also knn, features, monitor
    recipe: choices.ProbeRecipe = "fast"  # "fast": SGD on cached features
    after_pretrain: bool = False  # run the probe when pre-training ends
    random_baseline: bool = False  # ... and also on the same encoder at random init

    def validate(self) -> None:
        """Refuse impossible linear-probe settings."""
        check_choice("probe.pool", self.pool, choices.POOLS)
        check_choice("probe.recipe", self.recipe, choices.PROBE_RECIPES)
        require(self.epochs >= 1, "probe.epochs", f"must be >= 1, got {self.epochs}")
        batch, base = self.batch_size, self.base_lr
        require(batch >= 1, "probe.batch_size", f"must be >= 1, got {batch}")
        require(base > 0, "probe.base_lr", f"must be positive, got {base}")
        warmup = self.warmup_epochs
        require(warmup >= 0, "probe.warmup_epochs", f"must be >= 0, got {warmup}")


@dataclass
class FinetuneConfig:
    """Full fine-tuning (SPEC section 6): MAE's recipe, with its defaults for small data."""

    epochs: int = 100
    warmup_epochs: int = 5
    batch_size: int = 128  # global; even (mixup pairs images)
    base_lr: float = 1e-3  # AdamW, lr = base_lr * batch_size / 256
    lr: float | None = None  # None: from base_lr
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # layer-wise lr decay (MAE: 0.75 for ViT-S and smaller); 1: none
    drop_path: float = 0.1
    mixup: float = 0.8  # alpha; 0: off
    cutmix: float = 1.0  # alpha; 0: off
    label_smoothing: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm's policy string, MAE's; "none": off
    random_erase: float = 0.25  # probability
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    pool: choices.Pool = "avg"  # mean of the patch tokens + a fresh LayerNorm (MAE)
    grad_clip: float = 0.0  # 0: off
    workers: int = 4  # DataLoader worker processes for the per-image transform; 0: in this process

    def validate(self, world_size: int) -> None:
        """Refuse impossible fine-tuning settings for a run of ``world_size`` processes."""
        check_choice("finetune.pool", self.pool, choices.POOLS)
        require(
            self.auto_augment == "none" or self.auto_augment.startswith("rand-"),
            "finetune.auto_augment",
            f"must be a timm RandAugment policy such as 'rand-m9-mstd0.5-inc1', or 'none'; "
            f"got {self.auto_augment!r}",
        )
        require(self.epochs >= 1, "finetune.epochs", f"must be >= 1, got {self.epochs}")
        require(
            self.batch_size >= 2 and self.batch_size % (2 * world_size) == 0,
            "finetune.batch_size",
            f"must be a positive multiple of 2 x {world_size} processes (mixup pairs images), "
            f"got {self.batch_size}",
        )
        lr, decay, drop = self.lr, self.layer_decay, self.drop_path
        base = self.base_lr
        require(base > 0, "finetune.base_lr", f"must be positive, got {base}")
        require(lr is not None and lr > 0, "finetune.lr", f"must be positive, got {lr}")
        require(0 < decay <= 1, "finetune.layer_decay", f"must be in (0, 1], got {decay}")
        require(0 <= drop < 1, "finetune.drop_path", f"must be in [0, 1), got {drop}")
        for key in ("mixup", "cutmix"):
            require(getattr(self, key) >= 0, f"finetune.{key}", "must be >= 0 (0: off)")
        require(0 <= self.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)")
        require(0 <= self.random_erase <= 1, "finetune.random_erase", "must be in [0, 1]")
        require(self.workers >= 0, "finetune.workers", f"must be >= 0, got {self.workers}")
        check_crop_scale("finetune.crop_scale", self.crop_scale)


@dataclass
class LogConfig:
    """Where metrics go beside ``metrics.jsonl`` and TensorBoard (:mod:`dsmae.loggers`):
    Weights & Biases and MLflow, optional extras that get the same scalars, images and
    resolved config."""

    wandb: bool = False  # a W&B run (WANDB_MODE=offline: local files only, `wandb sync` later)
    wandb_project: str = "dsmae"
    wandb_entity: str | None = None  # user or team; None: the W&B login's default
    mlflow: str | None = None  # tracking URI (http://host:5000, file:./mlruns); None: off
    mlflow_experiment: str = "dsmae"

    def validate(self) -> None:
        """Refuse impossible logging settings."""
        project = self.wandb_project
        require(
            bool(project.strip()) and not set(project) & set(WANDB_FORBIDDEN),
            "log.wandb_project",
            f"must be a name without any of {WANDB_FORBIDDEN}, got {project!r}",
        )
        require(
            self.mlflow is None or bool(self.mlflow.strip()),
            "log.mlflow",
            f"must be a tracking URI such as http://host:5000 or file:./mlruns (null: off), "
            f"got {self.mlflow!r}",
        )
        require(
            bool(self.mlflow_experiment.strip()), "log.mlflow_experiment", "must name an experiment"
        )


@dataclass
class Config:
    """Everything one run needs; ``out`` is its output folder.

    The keys and sections marked :data:`RESUMABLE` (``monitor``, ``probe``, ``finetune``,
    ``log``, ``out``, ...) may differ between a run and its resumption; every other key
    must match."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata=RESUMABLE)
    probe: ProbeConfig = field(default_factory=ProbeConfig, metadata=RESUMABLE)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata=RESUMABLE)
    log: LogConfig = field(default_factory=LogConfig, metadata=RESUMABLE)
    out: str = resumable("runs/dsmae")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resumable_keys(section: type = Config, prefix: str = "") -> list[str]:
    """The dotted keys that may differ between a run and its resumption: the fields and
    whole sections marked :data:`RESUMABLE`, in field order."""
    hints = typing.get_type_hints(section)
    keys: list[str] = []
    for f in dataclasses.fields(section):
        if f.metadata.get("resumable"):
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys += resumable_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys
