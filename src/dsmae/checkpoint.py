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

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from dsmae.config import Config, ConfigError, config_from_dict, validate
from dsmae.models.vit import create_encoder
from dsmae.writes import WriteError, replacing, written

FORMAT = 1
SMALL_MODEL = 10_000_000  # parameters: any config may describe a model up to this size


class CheckpointError(OSError):
    """A checkpoint cannot be written or is not a readable, safe dsmae checkpoint."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and a rename (never half-written;
    :func:`~dsmae.writes.replacing`).

    Raises:
        WriteError: the folder cannot be created or written (read-only, full disk: also
            when ``torch.save``'s zip writer reports it as a ``RuntimeError``); the
            temporary file is removed and whatever was at ``path`` is kept.
    """
    path = Path(path)
    try:
        with written("checkpoint", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path, "checkpoint") as f:
                torch.save({"format": FORMAT, **state}, f)
    except WriteError as err:
        kept = f"; the previous {path.name} is intact" if path.is_file() else ""
        raise WriteError(f"{err}{kept}") from err.__cause__
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
    if not _looks_like_torch_file(path):
        raise CheckpointError(
            f"{path} is not a dsmae checkpoint: it is not a file written by torch.save"
        )
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
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} is not a dsmae checkpoint: its config is not a mapping")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"{path} is not a dsmae checkpoint: 'model' is not a state dict")
    return state


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle (the legacy one)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def checkpoint_config(state: dict[str, Any], source: str | Path) -> Config:
    """The validated config of a loaded checkpoint, checked against its weights' size
    before anything is built from it.

    Raises:
        CheckpointError: a config that names unknown keys or impossible values, or that
            describes an encoder far larger than the weights stored beside it (over 16x,
            and over 10M parameters: building it would allocate that model before the
            shapes are compared).
    """
    try:
        cfg = config_from_dict(state["config"])
        validate(cfg)
    except ConfigError as err:
        raise CheckpointError(f"{source} holds an invalid config: {err}") from None
    m = cfg.model
    stored = sum(t.numel() for k, t in state["model"].items() if k.startswith("encoder."))
    check_encoder_size(m.depth, m.embed_dim, m.mlp_ratio, m.patch_size, stored, source)
    return cfg


def check_encoder_size(
    depth: int, embed_dim: int, mlp_ratio: float, patch_size: int, stored: int, source: Any
) -> None:
    """Refuse, before it is built, a ViT encoder (``depth`` blocks of width ``embed_dim``)
    described beside ``stored`` weights that it would dwarf: over 16x, and over 10M
    parameters (a model this size builds in no time); building it would allocate that
    model before the shapes are compared.

    Raises:
        CheckpointError: naming ``source`` and both sizes.
    """
    described = depth * (4 + 2 * mlp_ratio) * embed_dim**2 + patch_size**2 * embed_dim
    if described > max(16 * stored, SMALL_MODEL):
        raise CheckpointError(
            f"{source}: its config describes an encoder of about {described:,.0f} "
            f"parameters, but the file holds {stored:,}: config and weights do not "
            "belong together"
        )


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A ``dsmae pretrain`` checkpoint, read once: what every command that takes
    ``--checkpoint`` works from.

    ``path`` is the file as it was given (it names the checkpoint in messages and in
    results), ``state`` what :func:`load_checkpoint` read (on the CPU) but the optimizer
    state, which no such command needs (it would double the memory held: resuming reads
    the file itself), and ``config`` its validated config (:func:`checkpoint_config`).
    """

    path: str | Path
    state: dict[str, Any]
    config: Config

    @classmethod
    def read(cls, path: str | Path) -> Checkpoint:
        """Load and check the checkpoint at ``path``.

        Raises:
            FileNotFoundError: nothing at ``path``.
            CheckpointError: see :func:`load_checkpoint` and :func:`checkpoint_config`.
        """
        state = load_checkpoint(path)
        state.pop("optimizer", None)
        return cls(path, state, checkpoint_config(state, path))

    def encoder(
        self, *, random_init: bool = False, seed: int = 0, teacher: bool = False
    ) -> VisionTransformer:
        """The student encoder (the EMA teacher with ``teacher``; the same architecture
        freshly initialised from ``seed`` with ``random_init``), a timm
        ``VisionTransformer`` on the CPU mapping (B, C, H, W) images to (B, 1 + N, D)
        tokens. Its initialisation draws from torch's global generator, seeded with
        ``seed`` first.

        Raises:
            CheckpointError: no teacher in the checkpoint, or weights that do not fit the
                architecture its config describes.
        """
        torch.manual_seed(seed)
        encoder = create_encoder(self.config.model)
        if not random_init:
            prefix = "teacher." if teacher else "encoder."
            weights = {
                k[len(prefix) :]: v for k, v in self.state["model"].items() if k.startswith(prefix)
            }
            if teacher and not weights:
                raise CheckpointError(f"{self.path} ({self.config.model.method}) has no teacher")
            load_weights(encoder, weights, f"{self.path} ({prefix.rstrip('.')})")
        return encoder


def training_state(state: dict[str, Any], source: str | Path) -> tuple[int, dict[str, Any]]:
    """The step and optimizer state of a checkpoint to resume from.

    Raises:
        CheckpointError: they are missing or malformed.
    """
    step, optimizer = state.get("step"), state.get("optimizer")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{source} cannot be resumed: no valid 'step' ({step!r})")
    if not isinstance(optimizer, dict) or "state" not in optimizer:
        raise CheckpointError(f"{source} cannot be resumed: no optimizer state in it")
    return step, optimizer


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(weights)``, with a message listing what differs on mismatch.

    Raises:
        CheckpointError: names of missing and unexpected entries and of shape mismatches
            (``name: checkpoint (a, b) vs model (c, d)``), or of tensors holding NaN or
            infinity, ``source`` named.
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
    broken = [k for k in sorted(weights) if not bool(torch.isfinite(weights[k]).all())]
    if broken:
        more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
        raise CheckpointError(
            f"{source} holds non-finite weights (NaN or infinity in {', '.join(broken[:5])}"
            f"{more}): it comes from a run that diverged; use an earlier checkpoint"
        )
    module.load_state_dict(weights)
