"""The layers a configuration is read from, as nested mappings of config keys: the
shipped presets (``src/dsmae/presets/NAME.yaml``, only what differs from the defaults),
the user's YAML files and ``--set section.key=value`` assignments."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dsmae.config.checks import ConfigError


def available_presets() -> list[str]:
    """Names of the presets shipped in ``dsmae/presets``."""
    folder = resources.files("dsmae") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    """The override mapping of a shipped preset."""
    if name not in available_presets():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    text = (resources.files("dsmae") / "presets" / f"{name}.yaml").read_text()
    return as_mapping(_load_yaml(text, f"preset {name}"), f"preset {name}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The override mapping of a user's YAML file.

    Raises:
        ConfigError: unreadable, not UTF-8 text, not YAML, or YAML with tags that would
            build Python objects or with aliases (refused: only plain values are read).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (UTF-8 YAML expected)") from None
    return as_mapping(_load_yaml(text, f"config file {path}"), str(path))


class _PlainLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader without aliases (``*name``): a config needs none, and
    an alias is how a short document expands to billions of values ("billion laughs") or
    holds itself (a recursive mapping)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not read in a config", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def _load_yaml(text: str, where: str) -> Any:
    """``text`` read as ``yaml.safe_load`` reads it, but for aliases (:class:`_PlainLoader`);
    its errors (syntax, tabs, ``!!python`` tags, aliases) as a :class:`ConfigError` naming
    ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_PlainLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{line}: {problem}") from None


def as_mapping(obj: Any, where: str) -> dict[str, Any]:
    """``obj`` (read from ``where``) as a mapping of config keys; nothing (None) is none."""
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
