"""One builder of a run's configuration for every command, in layers, each a nested
mapping merged onto the one before:

    defaults <- base (a checkpoint's saved config, where there is one) <- preset
    (``src/dsmae/presets/NAME.yaml``) <- the user's YAML files <- dotted overrides
    (``--set train.epochs=100`` and the flags)

then resolved and validated (:func:`~dsmae.config.resolution.resolve`). A layer that
changes what a resolved value derives from gets that value derived anew
(:func:`_follow_derived`). Unknown keys and impossible values are refused with a
:class:`ConfigError` naming the key, before anything is built.
"""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import Any

from dsmae.config.checks import ConfigError, shown
from dsmae.config.choices import ARCHS, DEFAULT_NOISE_RATIO, Method
from dsmae.config.parsing import build_section, config_from_dict
from dsmae.config.resolution import resolve, resolve_model, world_size_from_env
from dsmae.config.sections import Config, ModelConfig
from dsmae.config.yaml_files import read_preset, read_yaml
from dsmae.schedules import scaled_lr

log = logging.getLogger(__name__)

# The sections a checkpoint fixes: an evaluation of it cannot change its model.
FIXED_BY_CHECKPOINT = ("model",)


def build_config(
    preset: str | None = None,
    files: typing.Sequence[str | Path] = (),
    overrides: typing.Mapping[str, Any] | None = None,
    *,
    base: Config | None = None,
) -> Config:
    """Defaults <- ``base`` <- preset <- YAML files <- dotted overrides, then resolved and
    validated: the configuration of every command.

    ``base`` is a checkpoint's config (resolved, as saved), for the commands that evaluate
    one: its ``model`` section is fixed (a layer or override of it is refused) and its
    ``data.mean``/``data.std`` stay (they are the encoder's). Without it, the values a
    layer changes get the normalisation measured anew on the pre-training images.
    A layer that changes what a resolved value derives from (a saved ``config.yaml`` holds
    them all) gets that value derived anew: see :func:`_follow_derived`.

    Raises:
        ConfigError: an unknown preset, key or section, an unreadable file, a value of the
            wrong type or an impossible one, or (with ``base``) a change of its model.
    """
    fixed = FIXED_BY_CHECKPOINT if base is not None else ()
    measured = base is None
    layers = []
    if preset:
        layers.append(read_preset(preset))
    layers.extend(read_yaml(f) for f in files)
    tree = (Config() if base is None else base).to_dict()
    for layer in layers:
        for section in fixed:
            if section in layer:
                raise ConfigError(f"{section}: fixed by the checkpoint; it cannot be changed")
        _apply_layer(tree, layer, measured)
    for key in overrides or {}:
        if key.split(".")[0] in fixed:
            raise ConfigError(f"{key}: fixed by the checkpoint; it cannot be changed", key)
    _apply_overrides(tree, overrides or {}, measured)
    return resolve(config_from_dict(tree))


def model_config(method: Method = "dsmae", **options: Any) -> ModelConfig:
    """A resolved :class:`ModelConfig` from keywords (the field names of ModelConfig)."""
    return resolve_model(build_section(ModelConfig, {"method": method, **options}, prefix="model."))


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
    _arch_gives_its_shape(tree, before, layer, changed)
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


# the encoder's shape, which model.arch names
ARCH_SHAPE = ("model.depth", "model.embed_dim", "model.num_heads")


def _arch_gives_its_shape(
    tree: dict[str, Any], before: dict[str, Any], layer: dict[str, Any], changed: set[str]
) -> None:
    """A layer that names another ``model.arch`` gets that architecture's shape: depth,
    width and heads an earlier layer set (a preset's small ViT) are derived anew from it,
    with a warning that names them, unless the same layer sets them too."""
    if "model.arch" not in changed:
        return
    replaced = [
        f"{key}={before[key]}"
        for key in ARCH_SHAPE
        if key not in layer and before.get(key) is not None and not _is_derived(before, key)
    ]
    if not replaced:
        return
    for key in ARCH_SHAPE:
        if key not in layer:
            _set_dotted(tree, key, None)
    depth, width, heads = ARCHS.get(layer["model.arch"], (None, None, None))
    log.warning(
        "model.arch=%s gives its own shape (depth %s, width %s, %s heads) in place of %s of "
        "an earlier layer (the preset or a config file); set those in the same place as the "
        "arch to keep them",
        layer["model.arch"], depth, width, heads, ", ".join(replaced),
    )  # fmt: skip


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


def _merge(base: dict[str, Any], layer: typing.Mapping[str, Any], prefix: str) -> None:
    for key, value in layer.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {name!r}; known here: {', '.join(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{name!r} is a section; give it a mapping, not {shown(value)}")
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
