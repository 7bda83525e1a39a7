"""How a configuration is refused: :class:`ConfigError`, naming the key at fault, and
the checks every section's ``validate`` is made of."""

from __future__ import annotations

from typing import Any

from dsmae.config.choices import POOLS


class ConfigError(ValueError):
    """A configuration key is unknown or its value impossible; the message names the key.

    ``key`` is the dotted config key (or the argument) at fault, where there is one: the
    command line names the flag that set it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Refuse a ``value`` of ``key`` outside ``allowed`` (a tuple of :mod:`choices`)."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}", key)


def require(ok: bool, key: str, message: str) -> None:
    """Refuse ``key`` with ``message`` (what it must be, and what it is) unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}", key)


def check_crop_scale(key: str, scale: list[float]) -> None:
    """Refuse a random-resized-crop scale ``key`` that is not ``[min, max]`` in (0, 1]."""
    lo, hi = ([*scale, None, None])[:2]
    require(
        len(scale) == 2 and 0 < lo <= hi <= 1,
        key,
        f"must be [min, max] with 0 < min <= max <= 1, got {scale}",
    )


def check_pool_argument(pool: str) -> None:
    """Refuse a ``pool`` argument (of a function, not a config key) outside :data:`POOLS`."""
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}", "pool")
