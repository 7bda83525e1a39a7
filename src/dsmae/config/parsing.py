"""A :class:`Config` from a nested mapping (a saved config, or the layers merged):
unknown keys refused, every value checked against its field's type hint (a ``Literal``
of :mod:`dsmae.config.choices` as a string: its validate names the choices; every number
finite, every integer within 64 bits)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from typing import Any

from dsmae.config.checks import ConfigError, shown
from dsmae.config.sections import Config, FinetuneConfig
from dsmae.config.yaml_files import as_mapping


def config_from_dict(tree: typing.Mapping[str, Any]) -> Config:
    """A :class:`Config` from a nested mapping (e.g. a saved config); unknown keys are refused.

    Configs saved by dsmae 0.1.0 before its evaluation settings changed are read too
    (see :func:`_upgrade`)."""
    return build_section(Config, _upgrade(tree), prefix="")


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


def build_section(cls: type, tree: typing.Mapping[str, Any], prefix: str) -> Any:
    """A config dataclass ``cls`` (a section, or :class:`Config`) from ``tree``, its keys
    under the dotted ``prefix``; unknown keys and values of the wrong type are refused."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in tree if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {shown(prefix + str(unknown[0]))}; known: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in tree:
            continue
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_section(hint, as_mapping(tree[name], key), prefix=key + ".")
        else:
            kwargs[name] = _coerce(tree[name], hint, key)
    return cls(**kwargs)


def typed_value(key: str, value: Any) -> Any:
    """``value`` as the config field at the dotted ``key`` holds it: ``"1e-3"`` (which
    YAML 1.1 reads as a string) becomes 0.001 for a float field, an int 2 becomes 2.0.

    Raises:
        ConfigError: no such key, or a value of the wrong type.
    """
    section: Any = Config
    *parents, leaf = key.split(".")
    for part in parents:
        hints = typing.get_type_hints(section)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            raise ConfigError(f"unknown config key {key!r} (no section {part!r})", key)
        section = hints[part]
    hints = typing.get_type_hints(section)
    if leaf not in hints or dataclasses.is_dataclass(hints[leaf]):
        raise ConfigError(f"unknown config key {key!r}", key)
    return _coerce(value, hints[leaf], key)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently convert) one value against its type hint."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:  # one of choices: its values' type here, the value in validate
        hint = type(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {shown(value)}", key)
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {shown(value)}", key)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:
                raise ConfigError(f"{key} must fit in 64 bits, got {shown(value)}", key)
            return value
        raise ConfigError(f"{key} must be an integer, got {shown(value)}", key)
    if hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2**1024 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {shown(value)}", key)
        if number is not None:
            return number
        raise ConfigError(f"{key} must be a number, got {shown(value)}", key)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {shown(value)}", key)
    raise TypeError(f"unsupported type {hint} for {key}")  # a bug in this module
