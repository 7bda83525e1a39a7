"""Checkpoints: written atomically, read without executing code (``weights_only=True``).

A checkpoint is a dict of tensors and plain Python values::

    {"format": 1, "config": <resolved Config as a dict>, "model": <DSMAE state dict>,
     "optimizer": <state dict>, "step": int, "epoch": int}

``model`` holds the student encoder (``encoder.*``), the teacher (``teacher.*``), the
decoder (``decoder.*``) and the regressor (``regressor.*``), as present in the method.

A checkpoint is written to a hidden temporary file beside its destination, flushed to
disk and then renamed over it, so a crash, a kill or a full disk mid-write leaves the
previous file at that path untouched. Reading goes through ``torch.load(...,
weights_only=True)``: a file that would run code or build arbitrary objects when
unpickled is refused, and the code never runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


class CheckpointError(OSError):
    """A checkpoint cannot be written or is not a readable, safe dsmae checkpoint."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and a rename (never half-written).

    Raises:
        CheckpointError: the folder cannot be created or written (read-only, full disk);
            the temporary file is removed and whatever was at ``path`` is kept.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # e.g. the folder never existed
            tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is intact" if path.is_file() else ""
        raise CheckpointError(f"could not write checkpoint {path}: {err}{kept}") from err
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: the file is truncated or corrupt, holds objects other than
            tensors and plain values (refused unopened: loading it could run code), or is
            not a dsmae checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refused to load {path}: it is not a plain file of tensors ({first}). dsmae loads "
            "checkpoints with weights_only=True, so code inside a file is never run; only load "
            "files you trust with other tools."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt: {err}") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a dsmae checkpoint (no 'config' and 'model' entries)")
    return state


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(weights)``, with a message listing what differs on mismatch.

    Raises:
        CheckpointError: names of missing and unexpected entries and of shape mismatches
            (``name: checkpoint (a, b) vs model (c, d)``), ``source`` named.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(weights))
        if weights[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if names:
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                problems.append(f"{label}: {', '.join(names[:5])}{more}")
        raise CheckpointError(
            f"the weights in {source} do not fit the model its config describes ("
            + "; ".join(problems)
            + ")"
        )
    module.load_state_dict(weights)
