"""How a configuration is refused: :class:`ConfigError`, naming the key at fault, and
the checks every section's ``validate`` is made of, the duration of a time budget among
them."""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any

from dsmae.config.choices import POOLS


class ConfigError(ValueError):
    """A configuration key is unknown or its value impossible; the message names the key.

    ``key`` is the dotted config key (or the argument) at fault, where there is one: the
    command line names the flag that set it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# A value as messages show it: cut, so that no message costs more than the value's start
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 60, 60
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
LONGEST_DURATION = 366 * 24 * 3600.0  # a time budget of at most a year


def shown(value: Any) -> str:
    """``repr(value)`` cut to a few items and about 60 characters a string (reading only
    that much of it): what error messages quote of a value."""
    return _SHOWN.repr(value)


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Refuse a ``value`` of ``key`` outside ``allowed`` (a tuple of :mod:`choices`)."""
    if value not in allowed:
        raise ConfigError(f"{key}={shown(value)} is not one of: {', '.join(allowed)}", key)


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


UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smh])+")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smh])")


def parse_duration(text: str, key: str = "train.time_budget") -> float:
    """Seconds of a duration written as ``90s``, ``10m``, ``2h`` or ``1h30m``.

    Raises:
        ConfigError: naming ``key``, for anything else, a zero duration or one over a
            year (:data:`LONGEST_DURATION`).
    """
    compact = str(text).replace(" ", "").lower()
    if not _DURATION.fullmatch(compact):
        raise ConfigError(
            f"{key}: write a duration such as 90s, 10m, 2h or 1h30m, got {shown(text)}", key
        )
    seconds = sum(float(n) * UNITS[unit] for n, unit in _PART.findall(compact))
    if seconds <= 0:
        raise ConfigError(f"{key}: must be a positive duration, got {shown(text)}", key)
    if not math.isfinite(seconds) or seconds > LONGEST_DURATION:
        raise ConfigError(f"{key}: must be at most a year, got {shown(text)}", key)
    return seconds
