"""Run configuration: dataclass defaults in one place, YAML presets and overrides on top.

The defaults are the paper's CIFAR-10 / ViT-Tiny pre-training setting (SPEC section 5).
A run's configuration is built in layers, each a nested mapping merged onto the one
before: defaults <- preset (``src/dsmae/presets/NAME.yaml``, only what differs from the
defaults) <- the user's YAML files <- command-line overrides (``--set train.epochs=100``
and the common flags). Unknown keys and impossible values are refused with a
:class:`ConfigError` naming the key, before anything is built: each section's
``validate`` sits beside its fields. The resolved configuration (every ``None`` filled
in) is saved with every run and inside every checkpoint; the fields marked
:data:`RESUMABLE` may differ when a run resumes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dsmae.schedules import scaled_lr

METHODS = ("dsmae", "dsmae-ly", "dsmae-lz", "mae")
# name: (depth, width, heads), paper section 4.A; MLP ratio 4 for all.
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (12, 192, 3),
    "vit_small": (12, 384, 6),
    "vit_base": (12, 768, 12),
}
DEFAULT_NOISE_RATIO = {"dsmae": 0.9, "dsmae-ly": 0.9, "dsmae-lz": 0.9, "mae": 0.75}
POOLS = ("avg", "cls")  # the features read from an encoder: mean of the patch tokens, [CLS]
# Inductor's modes (torch.compile's ``mode``); "default" passes none
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# scaled_dot_product_attention's kernels (torch.nn.attention.SDPBackend); "auto": torch picks
ATTENTION_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
WANDB_FORBIDDEN = "/\\#?%:"  # characters a W&B project name cannot hold


class ConfigError(ValueError):
    """A configuration key is unknown or its value impossible; the message names the key.

    ``key`` is the dotted config key (or the argument) at fault, where there is one: the
    command line names the flag that set it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}", key)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}", key)


def _check_crop_scale(key: str, scale: list[float]) -> None:
    lo, hi = ([*scale, None, None])[:2]
    _require(
        len(scale) == 2 and 0 < lo <= hi <= 1,
        key,
        f"must be [min, max] with 0 < min <= max <= 1, got {scale}",
    )


# Field metadata of the keys that may differ between a run and its resumption: where and
# how the run computes, not what it learns (see resumable_keys).
RESUMABLE = types.MappingProxyType({"resumable": True})


def resumable(default: Any) -> Any:
    """A field marked :data:`RESUMABLE`, with this default."""
    return field(default=default, metadata=RESUMABLE)


@dataclass
class ModelConfig:
    """The pre-training model (SPEC sections 1-4)."""

    method: str = "dsmae"
    arch: str = "vit_tiny"
    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    depth: int | None = None  # None: from arch
    embed_dim: int | None = None  # None: from arch
    num_heads: int | None = None  # None: from arch
    mlp_ratio: float = 4.0
    noise_ratio: float | None = None  # None: 0.9 for the DSMAE variants, 0.75 for mae
    noise_std: float = 1.0
    noise_mode: str = "add"  # "add" | "replace"
    lam: float = 0.6
    norm_pix_loss: bool = True
    decoder_depth: int = 4
    decoder_dim: int | None = None  # None: encoder width (MAE's original: 512)
    decoder_heads: int | None = None  # None: encoder heads (MAE's original: 16)
    regressor_depth: int = 2
    target_norm: str = "layernorm"  # teacher tokens standardised per token | "none" (SPEC 3)

    def validate(self) -> None:
        """Refuse impossible model settings (expects a resolved ModelConfig)."""
        from dsmae.masking import num_selected  # imports torch: kept out of `dsmae --help`

        _check_choice("model.method", self.method, METHODS)
        _check_choice("model.arch", self.arch, tuple(ARCHS))
        _check_choice("model.noise_mode", self.noise_mode, ("add", "replace"))
        _check_choice("model.target_norm", self.target_norm, ("none", "layernorm"))
        _require(self.in_chans in (1, 3), "model.in_chans", f"must be 1 or 3, got {self.in_chans}")
        _require(self.img_size >= 1, "model.img_size", f"must be positive, got {self.img_size}")
        size, patch = self.img_size, self.patch_size
        _require(patch >= 1, "model.patch_size", f"must be positive, got {patch}")
        _require(
            size % patch == 0, "model.patch_size", f"{patch} does not divide model.img_size={size}"
        )
        for key in ("depth", "embed_dim", "num_heads", "decoder_dim", "decoder_heads"):
            value = getattr(self, key)
            _require(value is not None and value >= 1, f"model.{key}", f"must be >= 1, got {value}")
        for key, dim, heads in (
            ("model.embed_dim", self.embed_dim, self.num_heads),
            ("model.decoder_dim", self.decoder_dim, self.decoder_heads),
        ):
            _require(dim % heads == 0, key, f"{dim} is not divisible by the {heads} heads")
            _require(dim % 4 == 0, key, f"{dim} must be a multiple of 4 (2-D sin-cos embedding)")
        for key in ("decoder_depth", "regressor_depth"):
            value = getattr(self, key)
            _require(value >= 0, f"model.{key}", f"must be >= 0, got {value}")
        r = self.noise_ratio
        _require(r is not None and 0 < r <= 1, "model.noise_ratio", f"must be in (0, 1], got {r}")
        n = (size // patch) ** 2
        k = num_selected(n, r)
        _require(k >= 1, "model.noise_ratio", f"{r} of {n} patches selects none")
        if self.method == "mae":
            _require(
                k < n, "model.noise_ratio", f"{r} masks all {n} patches; mae needs a visible one"
            )
        _require(0 <= self.lam <= 1, "model.lam", f"must be in [0, 1], got {self.lam}")
        _require(self.noise_std >= 0, "model.noise_std", f"must be >= 0, got {self.noise_std}")
        _require(self.mlp_ratio > 0, "model.mlp_ratio", f"must be positive, got {self.mlp_ratio}")


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
        _check_crop_scale("data.crop_scale", self.crop_scale)
        for key in ("mean", "std"):
            value = getattr(self, key)
            _require(
                value is None or len(value) == in_chans,
                f"data.{key}",
                f"needs one value per channel ({in_chans}), got {value}",
            )
        std, subset = self.std, self.subset
        _require(std is None or min(std) > 0, "data.std", f"must be positive, got {std}")
        _require(subset is None or subset >= 1, "data.subset", f"must be >= 1, got {subset}")
        _require(
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
        _require(
            buffer >= 1, "data.shuffle_buffer", f"must be >= 1 (1: no shuffling), got {buffer}"
        )
        _require(workers >= 0, "data.workers", f"must be >= 0 (0: none), got {workers}")
        _require(
            per_epoch is None or per_epoch >= 1,
            "data.samples_per_epoch",
            f"must be >= 1, got {per_epoch}",
        )
        if not is_shard_source(self.source):
            return
        stream = f"data.source={self.source!r} names WebDataset shards, a stream"
        _require(
            per_epoch is not None,
            "data.samples_per_epoch",
            f"{stream} of unknown length: set the images of one epoch, e.g. --set "
            "data.samples_per_epoch=50000 (dsmae shards prints the number it wrote)",
        )
        _require(
            self.subset is None,
            "data.subset",
            f"{stream}; set data.samples_per_epoch instead, the images of one epoch",
        )
        _require(not self.download, "data.download", f"{stream}; there is nothing to download")


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
    ema_every: str = "epoch"  # teacher update once per epoch (SdAE, SPEC 3) | "step"
    device: str = resumable("auto")  # auto | cpu | cuda | cuda:N (under torchrun: each rank's GPU)
    amp: bool | None = None  # bf16 autocast; None: on for CUDA, off on CPU
    compile: bool | None = resumable(None)  # torch.compile the step; None: on for CUDA, off on CPU
    compile_scope: str = resumable("model")  # "model": step as one graph | "blocks": per block
    compile_backend: str = resumable("inductor")  # torch.compile's backend (e.g. aot_eager)
    compile_mode: str = resumable("default")  # Inductor's mode: one of COMPILE_MODES
    attention: str = resumable("auto")  # SDPA kernel: one of ATTENTION_KERNELS (auto: torch's)
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
        _require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        warmup, batch = self.warmup_epochs, self.batch_size
        _require(warmup >= 0, "train.warmup_epochs", f"must be >= 0, got {warmup}")
        _require(batch >= 1, "train.batch_size", f"must be >= 1, got {batch}")
        per_device, micro = batch // world_size, self.micro_batch
        _require(
            micro is not None and micro >= 1 and per_device % micro == 0,
            "train.micro_batch",
            f"must divide the per-device batch {per_device} (train.batch_size={batch} over "
            f"{world_size} processes), got {micro}",
        )
        _require(self.base_lr > 0, "train.base_lr", f"must be positive, got {self.base_lr}")
        _require(
            self.lr is not None and self.lr > 0, "train.lr", f"must be positive, got {self.lr}"
        )
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        for key in ("momentum_start", "momentum_end"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"train.{key}", f"must be in [0, 1), got {value}")
        _check_choice("train.ema_every", self.ema_every, ("step", "epoch"))
        _check_choice("train.compile_scope", self.compile_scope, ("model", "blocks"))
        _check_choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        _check_choice("train.attention", self.attention, ATTENTION_KERNELS)
        _require(bool(self.compile_backend), "train.compile_backend", "must name a backend")
        _require(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            "train.device",
            f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )
        self._validate_safety()

    def _validate_safety(self) -> None:
        """Refuse impossible clipping, divergence, timeout, logging and checkpoint settings."""
        clip, bad = self.grad_clip, self.max_bad_steps
        _require(clip >= 0, "train.grad_clip", f"must be >= 0 (0: off), got {clip}")
        _require(bad >= 0, "train.max_bad_steps", f"must be >= 0, got {bad}")
        _require(self.dist_timeout_minutes > 0, "train.dist_timeout_minutes", "must be positive")
        _require(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        _require(self.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0")
        _require(self.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0")
        if self.time_budget is not None:
            from dsmae.budget import parse_duration  # budget imports this module

            parse_duration(self.time_budget)


@dataclass
class MonitorConfig:
    """What is watched during pre-training, every N epochs (0: never)."""

    knn_every: int = 20  # k-NN top-1 on encoder features of the train/test splits
    knn_k: int = 20
    knn_temperature: float = 0.07
    images_every: int = 20  # Fig. 2 grid of fixed images to TensorBoard
    num_images: int = 8

    def validate(self) -> None:
        """Refuse impossible monitor settings."""
        for key in ("knn_every", "images_every"):
            _require(getattr(self, key) >= 0, f"monitor.{key}", "must be >= 0")
        _require(self.knn_k >= 1, "monitor.knn_k", f"must be >= 1, got {self.knn_k}")
        _require(self.knn_temperature > 0, "monitor.knn_temperature", "must be positive")
        _require(self.num_images >= 1, "monitor.num_images", "must be >= 1")


@dataclass
class ProbeConfig:
    """Linear probing (MAE protocol): frozen features, BatchNorm without affine + linear.

    ``pool`` is also what ``dsmae knn``, ``dsmae features`` and the k-NN monitor read."""

    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 256
    base_lr: float = 0.1  # SGD, momentum 0.9, lr = base_lr * batch_size / 256
    weight_decay: float = 0.0
    pool: str = "avg"  # mean of the patch tokens (SPEC 6) | "cls"; also knn, features, monitor
    recipe: str = "fast"  # "fast": SGD on cached features | "mae": LARS on live augmented ones
    after_pretrain: bool = False  # run the probe when pre-training ends
    random_baseline: bool = False  # ... and also on the same encoder at random init

    def validate(self) -> None:
        """Refuse impossible linear-probe settings."""
        _check_choice("probe.pool", self.pool, POOLS)
        _check_choice("probe.recipe", self.recipe, ("fast", "mae"))
        _require(self.epochs >= 1, "probe.epochs", f"must be >= 1, got {self.epochs}")
        batch, base = self.batch_size, self.base_lr
        _require(batch >= 1, "probe.batch_size", f"must be >= 1, got {batch}")
        _require(base > 0, "probe.base_lr", f"must be positive, got {base}")
        warmup = self.warmup_epochs
        _require(warmup >= 0, "probe.warmup_epochs", f"must be >= 0, got {warmup}")


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
    pool: str = "avg"  # mean of the patch tokens + a fresh LayerNorm (MAE) | "cls"
    grad_clip: float = 0.0  # 0: off
    workers: int = 4  # DataLoader worker processes for the per-image transform; 0: in this process

    def validate(self, world_size: int) -> None:
        """Refuse impossible fine-tuning settings for a run of ``world_size`` processes."""
        _check_choice("finetune.pool", self.pool, POOLS)
        _require(
            self.auto_augment == "none" or self.auto_augment.startswith("rand-"),
            "finetune.auto_augment",
            f"must be a timm RandAugment policy such as 'rand-m9-mstd0.5-inc1', or 'none'; "
            f"got {self.auto_augment!r}",
        )
        _require(self.epochs >= 1, "finetune.epochs", f"must be >= 1, got {self.epochs}")
        _require(
            self.batch_size >= 2 and self.batch_size % (2 * world_size) == 0,
            "finetune.batch_size",
            f"must be a positive multiple of 2 x {world_size} processes (mixup pairs images), "
            f"got {self.batch_size}",
        )
        lr, decay, drop = self.lr, self.layer_decay, self.drop_path
        base = self.base_lr
        _require(base > 0, "finetune.base_lr", f"must be positive, got {base}")
        _require(lr is not None and lr > 0, "finetune.lr", f"must be positive, got {lr}")
        _require(0 < decay <= 1, "finetune.layer_decay", f"must be in (0, 1], got {decay}")
        _require(0 <= drop < 1, "finetune.drop_path", f"must be in [0, 1), got {drop}")
        for key in ("mixup", "cutmix"):
            _require(getattr(self, key) >= 0, f"finetune.{key}", "must be >= 0 (0: off)")
        _require(0 <= self.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)")
        _require(0 <= self.random_erase <= 1, "finetune.random_erase", "must be in [0, 1]")
        _require(self.workers >= 0, "finetune.workers", f"must be >= 0, got {self.workers}")
        _check_crop_scale("finetune.crop_scale", self.crop_scale)


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
        _require(
            bool(project.strip()) and not set(project) & set(WANDB_FORBIDDEN),
            "log.wandb_project",
            f"must be a name without any of {WANDB_FORBIDDEN}, got {project!r}",
        )
        _require(
            self.mlflow is None or bool(self.mlflow.strip()),
            "log.mlflow",
            f"must be a tracking URI such as http://host:5000 or file:./mlruns (null: off), "
            f"got {self.mlflow!r}",
        )
        _require(
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


# ----------------------------------------------------------------------------- presets


def available_presets() -> list[str]:
    """Names of the presets shipped in ``dsmae/presets``."""
    folder = resources.files("dsmae") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    """The override mapping of a shipped preset."""
    if name not in available_presets():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    text = (resources.files("dsmae") / "presets" / f"{name}.yaml").read_text()
    return _as_mapping(_load_yaml(text, f"preset {name}"), f"preset {name}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The override mapping of a user's YAML file.

    Raises:
        ConfigError: unreadable, not UTF-8 text, not YAML, or YAML with tags that would
            build Python objects (refused: only plain values are read).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (UTF-8 YAML expected)") from None
    return _as_mapping(_load_yaml(text, f"config file {path}"), str(path))


def _load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``; its errors (syntax, tabs, ``!!python`` tags) as a
    :class:`ConfigError` naming ``where`` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{line}: {problem}") from None


def _as_mapping(obj: Any, where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(obj).__name__}")
    return obj


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.epochs=100"`` -> ``("train.epochs", 100)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    return key.strip(), _load_yaml(value, f"the value of {key.strip()}")


# ----------------------------------------------------------------------------- building


def build_config(
    preset: str | None = None,
    files: typing.Sequence[str | Path] = (),
    overrides: typing.Mapping[str, Any] | None = None,
) -> Config:
    """Defaults <- preset <- YAML files <- dotted overrides, then resolved and validated.

    A layer that changes what a resolved value derives from (a saved ``config.yaml`` holds
    them all) gets that value derived anew: see :func:`_follow_derived`."""
    layers = []
    if preset:
        layers.append(read_preset(preset))
    layers.extend(read_yaml(f) for f in files)
    tree = Config().to_dict()
    for layer in layers:
        _apply_layer(tree, layer, measured=True)
    _apply_overrides(tree, overrides or {}, measured=True)
    cfg = config_from_dict(tree)
    return resolve(cfg)


def override_config(
    cfg: Config,
    files: typing.Sequence[str | Path] = (),
    overrides: typing.Mapping[str, Any] | None = None,
    *,
    fixed: tuple[str, ...] = ("model",),
) -> Config:
    """``cfg`` (e.g. a checkpoint's) with YAML files and dotted overrides on top, resolved
    and validated (values derived from changed ones derived anew: :func:`_follow_derived`;
    ``data.mean``/``data.std`` stay: they are the encoder's).

    Keys under the ``fixed`` sections are refused: a checkpoint's model cannot change.
    """
    tree = cfg.to_dict()
    layers = [read_yaml(f) for f in files]
    for layer in layers:
        for section in fixed:
            if section in layer:
                raise ConfigError(f"{section}: fixed by the checkpoint; it cannot be changed")
        _apply_layer(tree, layer, measured=False)
    for key in overrides or {}:
        if key.split(".")[0] in fixed:
            raise ConfigError(f"{key}: fixed by the checkpoint; it cannot be changed", key)
    _apply_overrides(tree, overrides or {}, measured=False)
    return resolve(config_from_dict(tree))


# A value resolve() derives where it is None, and the keys it derives from.
DERIVED_FROM: dict[str, tuple[str, ...]] = {
    "train.lr": ("train.base_lr", "train.batch_size"),
    "train.micro_batch": ("train.batch_size",),
    "finetune.lr": ("finetune.base_lr", "finetune.batch_size"),
    "model.depth": ("model.arch",),
    "model.embed_dim": ("model.arch",),
    "model.num_heads": ("model.arch",),
    "model.noise_ratio": ("model.method",),
    "model.decoder_dim": ("model.arch", "model.embed_dim"),
    "model.decoder_heads": ("model.arch", "model.num_heads"),
}
# A value pre-training measures where it is None (on its images), and what it depends on.
MEASURED_FROM: dict[str, tuple[str, ...]] = {
    "data.mean": ("data.source", "data.subset", "model.in_chans"),
    "data.std": ("data.source", "data.subset", "model.in_chans"),
}
# A value whose only use is to derive another: changed while that one is set, it does nothing.
ONLY_DERIVES = {"train.base_lr": "train.lr", "finetune.base_lr": "finetune.lr"}


def flat_config(tree: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys: ``{"model": {"depth": 4}}`` -> ``{"model.depth": 4}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, typing.Mapping):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _apply_layer(tree: dict[str, Any], layer: typing.Mapping[str, Any], measured: bool) -> None:
    """Merge ``layer`` onto ``tree`` (unknown keys refused), then let the values derived
    from what it changed follow (:func:`_follow_derived`)."""
    before = flat_config(tree)
    _merge(tree, layer, prefix="")
    _follow_derived(tree, before, flat_config(layer), measured)


def _apply_overrides(
    tree: dict[str, Any], overrides: typing.Mapping[str, Any], measured: bool
) -> None:
    """Set the dotted ``overrides`` in ``tree`` (unknown keys refused), then let the
    values derived from what they changed follow (:func:`_follow_derived`)."""
    before = flat_config(tree)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    _follow_derived(tree, before, dict(overrides), measured)


def _follow_derived(
    tree: dict[str, Any], before: dict[str, Any], layer: dict[str, Any], measured: bool
) -> None:
    """Keep every resolved value true to the values it derives from, after ``layer``
    (dotted) changed some of them in ``tree`` (``before``: ``tree`` before it).

    A derived value the layer leaves alone is set to None (so derived anew, e.g.
    ``train.lr`` from a new ``train.base_lr`` or ``train.batch_size``) when it held what
    its old inputs derived; a value of the user's own stays, but a ``base_lr`` change
    that it would make a no-op is refused, naming both keys. With ``measured``,
    ``data.mean``/``data.std`` are measured again on new pre-training data.

    Raises:
        ConfigError: the layer changes a ``base_lr`` while the ``lr`` it derives is set.
    """
    changed = {k for k, v in layer.items() if k in before and before[k] != v}
    follows = {**DERIVED_FROM, **(MEASURED_FROM if measured else {})}
    for key, inputs in follows.items():
        moved = changed.intersection(inputs)
        if not moved or key in layer or before.get(key) is None:
            continue
        if key in MEASURED_FROM or _is_derived(before, key):
            _set_dotted(tree, key, None)
    for key, target in ONLY_DERIVES.items():
        if key in changed and target not in layer and flat_config(tree)[target] is not None:
            raise ConfigError(
                f"{key}: changing it does nothing while {target}={before[target]} is set (it "
                f"derives {target} only where that is null): set {target} instead, or "
                f"{target}=null as well to derive it",
                key,
            )


def _is_derived(flat: dict[str, Any], key: str) -> bool:
    """Whether ``flat`` (a config before a layer) holds at ``key`` what :func:`resolve`
    derives from its other values; not when those are of the wrong type (validation
    names them)."""
    try:
        return bool(flat[key] == _derived(flat, key))
    except (TypeError, ValueError, KeyError):
        return False


def _derived(flat: dict[str, Any], key: str) -> Any:
    """What :func:`resolve` derives for ``key`` from the other values of ``flat``."""
    if key.endswith(".lr"):
        section = key.split(".")[0]
        return scaled_lr(float(flat[f"{section}.base_lr"]), flat[f"{section}.batch_size"])
    if key == "train.micro_batch":
        return flat["train.batch_size"] // world_size_from_env()
    if key == "model.noise_ratio":
        return DEFAULT_NOISE_RATIO.get(flat["model.method"])
    depth, width, heads = ARCHS.get(flat["model.arch"], (None, None, None))
    if key == "model.decoder_dim":
        return flat["model.embed_dim"] if flat["model.embed_dim"] is not None else width
    if key == "model.decoder_heads":
        return flat["model.num_heads"] if flat["model.num_heads"] is not None else heads
    return {"model.depth": depth, "model.embed_dim": width, "model.num_heads": heads}[key]


def config_from_dict(tree: typing.Mapping[str, Any]) -> Config:
    """A :class:`Config` from a nested mapping (e.g. a saved config); unknown keys are refused.

    Configs saved by dsmae 0.1.0 before its evaluation settings changed are read too
    (see :func:`_upgrade`)."""
    return _build(Config, _upgrade(tree), prefix="")


def _upgrade(tree: typing.Mapping[str, Any]) -> dict[str, Any]:
    """A saved config in today's keys: ``pool: token`` is ``cls``, and the fine-tuning
    RandAugment as ``randaug_n``/``randaug_m`` (torchvision's, now replaced by timm's
    policy string) becomes ``auto_augment`` (MAE's policy, or "none" where it was off)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for section in ("probe", "finetune"):
        if tree.get(section, {}).get("pool") == "token":
            tree[section]["pool"] = "cls"
    finetune = tree.get("finetune", {})
    if "randaug_n" in finetune or "randaug_m" in finetune:
        off = finetune.pop("randaug_n", 2) == 0
        finetune.pop("randaug_m", None)
        finetune.setdefault("auto_augment", "none" if off else FinetuneConfig.auto_augment)
    return tree


def _merge(base: dict[str, Any], layer: typing.Mapping[str, Any], prefix: str) -> None:
    for key, value in layer.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {name!r}; known here: {', '.join(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{name!r} is a section; give it a mapping, not {value!r}")
            _merge(base[key], value, prefix=f"{name}.")
        else:
            base[key] = value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for depth, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"unknown config key {dotted!r} (no section {where!r})")
        node = child
    _merge(node, {leaf: value}, prefix=".".join(parents) + "." if parents else "")


def _build(cls: type, tree: typing.Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in tree if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; known: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in tree:
            continue
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, _as_mapping(tree[name], key), prefix=key + ".")
        else:
            kwargs[name] = _coerce(tree[name], hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently convert) one value against its type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported type {hint} for {key}")  # a bug in this module


# ----------------------------------------------------------------------------- resolving


def world_size_from_env() -> int:
    """The number of processes of this run (torchrun's ``WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve(cfg: Config, world_size: int | None = None) -> Config:
    """Fill every ``None`` that has a derived default, then validate; returns a new Config.

    ``world_size`` (default: from the environment) sets the per-device micro-batch.
    """
    t = cfg.train
    world = world_size or world_size_from_env()
    per_device, rest = divmod(t.batch_size, world)
    if rest:
        raise ConfigError(f"train.batch_size={t.batch_size} does not split over {world} processes")
    train = dataclasses.replace(
        t,
        lr=t.lr if t.lr is not None else scaled_lr(t.base_lr, t.batch_size),
        micro_batch=t.micro_batch if t.micro_batch is not None else per_device,
    )
    f = cfg.finetune
    finetune = dataclasses.replace(
        f, lr=f.lr if f.lr is not None else scaled_lr(f.base_lr, f.batch_size)
    )
    out = dataclasses.replace(cfg, model=resolve_model(cfg.model), train=train, finetune=finetune)
    validate(out, world)
    return out


def resolve_model(m: ModelConfig) -> ModelConfig:
    """Fill the architecture's depth/width/heads, the method's noise ratio and the decoder
    width/heads where they are ``None``, then validate; returns a new ModelConfig."""
    _check_choice("model.method", m.method, METHODS)
    _check_choice("model.arch", m.arch, tuple(ARCHS))
    depth, width, heads = ARCHS[m.arch]
    embed_dim = m.embed_dim if m.embed_dim is not None else width
    num_heads = m.num_heads if m.num_heads is not None else heads
    m = dataclasses.replace(
        m,
        depth=m.depth if m.depth is not None else depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        noise_ratio=m.noise_ratio if m.noise_ratio is not None else DEFAULT_NOISE_RATIO[m.method],
        decoder_dim=m.decoder_dim if m.decoder_dim is not None else embed_dim,
        decoder_heads=m.decoder_heads if m.decoder_heads is not None else num_heads,
    )
    m.validate()
    return m


def fill_data_stats(
    cfg: Config, mean: typing.Sequence[float] | None, std: typing.Sequence[float] | None
) -> Config:
    """``cfg`` with ``data.mean``/``data.std`` set to ``mean``/``std`` where they are None
    (measured ones, or a checkpoint's)."""
    data = dataclasses.replace(
        cfg.data,
        mean=cfg.data.mean if cfg.data.mean is not None else mean,
        std=cfg.data.std if cfg.data.std is not None else std,
    )
    return dataclasses.replace(cfg, data=data)


def model_config(method: str = "dsmae", **options: Any) -> ModelConfig:
    """A resolved :class:`ModelConfig` from keywords (the field names of ModelConfig)."""
    return resolve_model(_build(ModelConfig, {"method": method, **options}, prefix="model."))


def validate(cfg: Config, world_size: int = 1) -> None:
    """Refuse impossible settings anywhere in a resolved Config, section by section."""
    cfg.model.validate()
    cfg.data.validate(cfg.model.in_chans)
    cfg.train.validate(world_size)
    _require(bool(cfg.out.strip()), "out", "must name a folder, got an empty string")
    cfg.monitor.validate()
    cfg.probe.validate()
    cfg.finetune.validate(world_size)
    cfg.log.validate()
    if cfg.probe.after_pretrain:
        from dsmae.data.sources import is_shard_source  # imports torch: kept out of `--help`

        _require(
            not is_shard_source(cfg.data.source),
            "probe.after_pretrain",
            f"data.source={cfg.data.source!r} is a stream of WebDataset shards, without the "
            "labelled test split a probe needs: set probe.after_pretrain=false and probe the "
            "checkpoint with dsmae linprobe --data (a data set or a labelled folder)",
        )
