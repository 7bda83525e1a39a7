"""Checkpoints: written atomically, read without executing code (``weights_only=True``).

A checkpoint is a dict of tensors and plain Python values::

    {"format": 1, "config": <resolved Config as a dict>, "model": <DSMAE state dict>,
     "optimizer": <state dict>, "step": int, "epoch": int}

``model`` holds the student encoder (``encoder.*``), the teacher (``teacher.*``), the
decoder (``decoder.*``) and the regressor (``regressor.*``), as present in the method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a dsmae checkpoint (no 'config' and 'model' entries)")
    return state
