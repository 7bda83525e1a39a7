"""Run configuration: dataclass defaults in one place, YAML presets and overrides on top.

The defaults are the paper's CIFAR-10 / ViT-Tiny pre-training setting (SPEC section 5).
A run's configuration is built in layers, each a nested mapping merged onto the one
before: defaults <- preset (``src/dsmae/presets/NAME.yaml``) <- the user's YAML files
<- command-line overrides (``--set train.epochs=100`` and the common flags). Unknown
keys and impossible values are refused with a :class:`ConfigError` naming the key,
before anything is built. The resolved configuration (every ``None`` filled in) is
saved with every run and inside every checkpoint.
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
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class ConfigError(ValueError):
    """A configuration key is unknown or its value impossible; the message names the key."""


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


@dataclass
class DataConfig:
    """Where images come from and how they are augmented for pre-training."""

    source: str = "cifar10"  # digits | cifar10 | cifar100 | stl10 | path to a folder
    root: str = "~/.cache/dsmae/datasets"  # torchvision data sets live here
    download: bool = False
    subset: int | None = None  # pre-train on a fixed random sample of N images
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    mean: list[float] | None = None  # None: measured on the pre-training images
    std: list[float] | None = None
    skip_bad_images: bool = False  # skip (and count) unreadable files of a folder


@dataclass
class TrainConfig:
    """Optimisation of pre-training (SPEC section 5) and how it runs."""

    epochs: int = 500
    warmup_epochs: int = 20
    batch_size: int = 2048  # the global (effective) batch of one optimizer step
    micro_batch: int | None = None  # per device; None: batch_size / devices (no accumulation)
    base_lr: float = 1.5e-4
    lr: float | None = None  # None: base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum_start: float = 0.96
    momentum_end: float = 0.99
    ema_every: str = "epoch"  # teacher update once per epoch (SdAE, SPEC 3) | "step"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each rank's GPU)
    amp: bool | None = None  # bf16 autocast; None: on for CUDA, off on CPU
    compile: bool | None = None  # torch.compile the step; None: on for CUDA, off on CPU
    compile_scope: str = "model"  # "model": forward, loss, backward as one graph | "blocks"
    grad_checkpointing: bool = False  # recompute encoder block activations in backward
    data_on_device: bool | None = None  # keep the uint8 data set on the GPU; None: on CUDA
    seed: int = 0
    grad_clip: float = 0.0  # clip the gradient norm to this; 0: off
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps; 0: never
    dist_timeout_minutes: float = 15.0  # a rank waiting longer on the others fails
    checkpoint_every: int = 50  # epochs; 0: off
    checkpoint_minutes: float = 30.0  # also every this many minutes; 0: off
    keep_checkpoints: int = 3  # periodic checkpoints kept (the newest); 0: all
    log_every: int = 10  # optimizer steps between metric lines


@dataclass
class MonitorConfig:
    """What is watched during pre-training, every N epochs (0: never)."""

    knn_every: int = 20  # k-NN top-1 on encoder features of the train/test splits
    knn_k: int = 20
    knn_temperature: float = 0.07
    images_every: int = 20  # Fig. 2 grid of fixed images to TensorBoard
    num_images: int = 8


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
    layer_decay: float = 0.75  # layer-wise lr decay; 1: none
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


@dataclass
class Config:
    """Everything one run needs; ``out`` is its output folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    out: str = "runs/dsmae"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
    """Defaults <- preset <- YAML files <- dotted overrides, then resolved and validated."""
    layers = []
    if preset:
        layers.append(read_preset(preset))
    layers.extend(read_yaml(f) for f in files)
    tree = Config().to_dict()
    for layer in layers:
        _merge(tree, layer, prefix="")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    cfg = config_from_dict(tree)
    return resolve(cfg)


def override_config(
    cfg: Config,
    files: typing.Sequence[str | Path] = (),
    overrides: typing.Mapping[str, Any] | None = None,
    *,
    fixed: tuple[str, ...] = ("model",),
) -> Config:
    """``cfg`` (e.g. a checkpoint's) with YAML files and dotted overrides on top, resolved.

    Keys under the ``fixed`` sections are refused: a checkpoint's model cannot change.
    """
    tree = cfg.to_dict()
    layers = [read_yaml(f) for f in files]
    for layer in layers:
        for section in fixed:
            if section in layer:
                raise ConfigError(f"{section}: fixed by the checkpoint; it cannot be changed")
        _merge(tree, layer, prefix="")
    for key, value in (overrides or {}).items():
        if key.split(".")[0] in fixed:
            raise ConfigError(f"{key}: fixed by the checkpoint; it cannot be changed")
        _set_dotted(tree, key, value)
    return resolve(config_from_dict(tree))


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
    validate_model(m)
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


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate_model(m: ModelConfig) -> None:
    """Refuse impossible model settings (expects a resolved ModelConfig)."""
    from dsmae.masking import num_selected  # imports torch: kept out of `dsmae --help`

    _check_choice("model.method", m.method, METHODS)
    _check_choice("model.arch", m.arch, tuple(ARCHS))
    _check_choice("model.noise_mode", m.noise_mode, ("add", "replace"))
    _check_choice("model.target_norm", m.target_norm, ("none", "layernorm"))
    _require(m.in_chans in (1, 3), "model.in_chans", f"must be 1 or 3, got {m.in_chans}")
    _require(m.img_size >= 1, "model.img_size", f"must be positive, got {m.img_size}")
    _require(m.patch_size >= 1, "model.patch_size", f"must be positive, got {m.patch_size}")
    _require(
        m.img_size % m.patch_size == 0,
        "model.patch_size",
        f"{m.patch_size} does not divide model.img_size={m.img_size}",
    )
    for key in ("depth", "embed_dim", "num_heads", "decoder_dim", "decoder_heads"):
        value = getattr(m, key)
        _require(value is not None and value >= 1, f"model.{key}", f"must be >= 1, got {value}")
    for key, dim, heads in (
        ("model.embed_dim", m.embed_dim, m.num_heads),
        ("model.decoder_dim", m.decoder_dim, m.decoder_heads),
    ):
        _require(dim % heads == 0, key, f"{dim} is not divisible by the {heads} heads")
        _require(dim % 4 == 0, key, f"{dim} must be a multiple of 4 (2-D sin-cos embedding)")
    for key in ("decoder_depth", "regressor_depth"):
        value = getattr(m, key)
        _require(value >= 0, f"model.{key}", f"must be >= 0, got {value}")
    r = m.noise_ratio
    _require(r is not None and 0 < r <= 1, "model.noise_ratio", f"must be in (0, 1], got {r}")
    n = (m.img_size // m.patch_size) ** 2
    k = num_selected(n, r)
    _require(k >= 1, "model.noise_ratio", f"{r} of {n} patches selects none")
    if m.method == "mae":
        _require(k < n, "model.noise_ratio", f"{r} masks all {n} patches; mae needs a visible one")
    _require(0 <= m.lam <= 1, "model.lam", f"must be in [0, 1], got {m.lam}")
    _require(m.noise_std >= 0, "model.noise_std", f"must be >= 0, got {m.noise_std}")
    _require(m.mlp_ratio > 0, "model.mlp_ratio", f"must be positive, got {m.mlp_ratio}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Refuse impossible settings anywhere in a resolved Config."""
    validate_model(cfg.model)
    d, t, p, mon = cfg.data, cfg.train, cfg.probe, cfg.monitor
    lo, hi = ([*d.crop_scale, None, None])[:2]
    _require(
        len(d.crop_scale) == 2 and 0 < lo <= hi <= 1,
        "data.crop_scale",
        f"must be [min, max] with 0 < min <= max <= 1, got {d.crop_scale}",
    )
    for key in ("mean", "std"):
        value = getattr(d, key)
        _require(
            value is None or len(value) == cfg.model.in_chans,
            f"data.{key}",
            f"needs one value per channel ({cfg.model.in_chans}), got {value}",
        )
    _require(d.std is None or min(d.std) > 0, "data.std", f"must be positive, got {d.std}")
    _require(d.subset is None or d.subset >= 1, "data.subset", f"must be >= 1, got {d.subset}")
    _require(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _require(t.warmup_epochs >= 0, "train.warmup_epochs", f"must be >= 0, got {t.warmup_epochs}")
    _require(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    per_device = t.batch_size // world_size
    _require(
        t.micro_batch is not None and t.micro_batch >= 1 and per_device % t.micro_batch == 0,
        "train.micro_batch",
        f"must divide the per-device batch {per_device} (train.batch_size={t.batch_size} over "
        f"{world_size} processes), got {t.micro_batch}",
    )
    _require(t.lr is not None and t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    _require(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        "train.betas",
        f"must be two numbers in [0, 1), got {t.betas}",
    )
    for key in ("momentum_start", "momentum_end"):
        value = getattr(t, key)
        _require(0 <= value < 1, f"train.{key}", f"must be in [0, 1), got {value}")
    _check_choice("train.ema_every", t.ema_every, ("step", "epoch"))
    _check_choice("train.compile_scope", t.compile_scope, ("model", "blocks"))
    _require(
        DEVICE_PATTERN.fullmatch(t.device) is not None,
        "train.device",
        f"must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}",
    )
    _require(bool(cfg.out.strip()), "out", "must name a folder, got an empty string")
    _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0: off), got {t.grad_clip}")
    _require(t.max_bad_steps >= 0, "train.max_bad_steps", f"must be >= 0, got {t.max_bad_steps}")
    _require(t.dist_timeout_minutes > 0, "train.dist_timeout_minutes", "must be positive")
    _require(
        not (d.download and os.path.isdir(os.path.expanduser(d.source))),
        "data.download",
        f"data.source={d.source!r} is a folder; there is nothing to download",
    )
    _require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    _require(t.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0")
    _require(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0")
    for key in ("knn_every", "images_every"):
        _require(getattr(mon, key) >= 0, f"monitor.{key}", "must be >= 0")
    _require(mon.knn_k >= 1, "monitor.knn_k", f"must be >= 1, got {mon.knn_k}")
    _require(mon.knn_temperature > 0, "monitor.knn_temperature", "must be positive")
    _require(mon.num_images >= 1, "monitor.num_images", "must be >= 1")
    _check_choice("probe.pool", p.pool, POOLS)
    _check_choice("probe.recipe", p.recipe, ("fast", "mae"))
    ft = cfg.finetune
    _check_choice("finetune.pool", ft.pool, POOLS)
    _require(
        ft.auto_augment == "none" or ft.auto_augment.startswith("rand-"),
        "finetune.auto_augment",
        f"must be a timm RandAugment policy such as 'rand-m9-mstd0.5-inc1', or 'none'; "
        f"got {ft.auto_augment!r}",
    )
    _require(ft.epochs >= 1, "finetune.epochs", f"must be >= 1, got {ft.epochs}")
    _require(
        ft.batch_size >= 2 and ft.batch_size % (2 * world_size) == 0,
        "finetune.batch_size",
        f"must be a positive multiple of 2 x {world_size} processes (mixup pairs images), "
        f"got {ft.batch_size}",
    )
    _require(ft.lr is not None and ft.lr > 0, "finetune.lr", f"must be positive, got {ft.lr}")
    _require(
        0 < ft.layer_decay <= 1, "finetune.layer_decay", f"must be in (0, 1], got {ft.layer_decay}"
    )
    _require(0 <= ft.drop_path < 1, "finetune.drop_path", f"must be in [0, 1), got {ft.drop_path}")
    for key in ("mixup", "cutmix"):
        _require(getattr(ft, key) >= 0, f"finetune.{key}", "must be >= 0 (0: off)")
    _require(0 <= ft.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)")
    _require(0 <= ft.random_erase <= 1, "finetune.random_erase", "must be in [0, 1]")
    _require(ft.workers >= 0, "finetune.workers", f"must be >= 0, got {ft.workers}")
    flo, fhi = ([*ft.crop_scale, None, None])[:2]
    _require(
        len(ft.crop_scale) == 2 and 0 < flo <= fhi <= 1,
        "finetune.crop_scale",
        f"must be [min, max] with 0 < min <= max <= 1, got {ft.crop_scale}",
    )
    _require(p.epochs >= 1, "probe.epochs", f"must be >= 1, got {p.epochs}")
    _require(p.batch_size >= 1, "probe.batch_size", f"must be >= 1, got {p.batch_size}")
