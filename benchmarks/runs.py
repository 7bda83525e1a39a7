"""How every benchmark script describes a pre-training run, in one place: a named setting
(``benchmarks/settings/NAME.yaml``, config values on top of the library's defaults) or a
shipped preset, and dotted overrides on top; given to :func:`dsmae.pretrain` as a config
(:func:`run_config`) or to the ``dsmae`` command as its arguments (:func:`pretrain_args`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SETTINGS = Path(__file__).resolve().parent / "settings"


def setting_file(name: str) -> Path:
    """The YAML file of setting ``name`` (``cifar-cpu``, ``smoke``, ``paper``, ...)."""
    path = SETTINGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SETTINGS.glob("*.yaml")))
        raise SystemExit(f"no setting {name!r} in {SETTINGS} (known: {known})")
    return path


def setting_values(name: str) -> dict[str, Any]:
    """The config values of setting ``name`` as dotted keys (``{"model.depth": 6, ...}``)."""
    import yaml

    from dsmae.config import flat_config

    return flat_config(yaml.safe_load(setting_file(name).read_text()) or {})


def set_args(values: Mapping[str, Any]) -> list[str]:
    """Dotted config values as ``--set KEY=VALUE`` arguments, each value written so that
    ``--set`` reads it back as it is (YAML: strings as they are, the rest as JSON)."""
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    return [arg for key, value in text.items() for arg in ("--set", f"{key}={value}")]


def pretrain_args(
    setting: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    preset: str | None = None,
) -> list[str]:
    """``pretrain`` and its arguments (after ``dsmae`` or ``python -m dsmae``): the
    ``preset``, the setting's file, then ``overrides`` as ``--set`` values."""
    argv = ["pretrain"]
    if preset is not None:
        argv += ["--preset", preset]
    if setting is not None:
        argv += ["--config", str(setting_file(setting))]
    return [*argv, *set_args(overrides or {})]


def run_config(setting: str | None = None, overrides: Mapping[str, Any] | None = None) -> Any:
    """The :class:`dsmae.config.Config` of the same run, for :func:`dsmae.pretrain`."""
    from dsmae.config import build_config

    files = [setting_file(setting)] if setting is not None else []
    return build_config(files=files, overrides=dict(overrides or {}))
