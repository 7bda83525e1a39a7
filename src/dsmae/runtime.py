"""Where and how computation runs: device choice, autocast, seeded generators, progress bars."""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
from tqdm import tqdm

from dsmae.config import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name is used as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r}, but CUDA is not available here")
    return device


def use_amp(device: torch.device, amp: bool | None) -> bool:
    """bf16 autocast: on by default for CUDA, off on CPU (bf16 matmuls are slow on most CPUs)."""
    return device.type == "cuda" if amp is None else amp


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled``, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def progress(total: int, desc: str, unit: str = "img", disable: bool = False) -> tqdm:
    """A progress bar counting ``unit``s: shows the rate (e.g. img/s) and the ETA.

    Drawn on stderr when it is a terminal; silent otherwise (logs carry the metrics).
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        disable=disable or not sys.stderr.isatty(),
    )
