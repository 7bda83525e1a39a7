"""Resuming a pre-training run: which checkpoint it continues from, and whether that
checkpoint was made with the same settings.

``--resume auto`` takes the readable checkpoint of the output folder's run with the most
steps (:func:`find_resume_checkpoint`). A run continues only with the settings it was
started with, but for the keys marked resumable in :mod:`dsmae.config`
(:data:`RESUMABLE_CHANGES`: where and how it runs, not what it learns); ``--force``
continues anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsmae.checkpoint import CheckpointError, checkpoint_config, load_checkpoint, training_state
from dsmae.config import Config, ConfigError, fill_data_stats, resumable_keys
from dsmae.pretrain.run_folder import run_id_of
from dsmae.pretrain.saving import checkpoints_in

log = logging.getLogger(__name__)

# The dotted keys (or whole sections) that may differ between a run and its resumption.
RESUMABLE_CHANGES: tuple[str, ...] = tuple(resumable_keys())


@dataclass
class ResumePoint:
    """Where a run starts: the config it runs with and, when it continues a checkpoint,
    that checkpoint's loaded state, its path and the run's id (None for a fresh run)."""

    cfg: Config
    state: dict[str, Any] | None = None
    path: Path | None = None
    run_id: str | None = None

    @property
    def step(self) -> int:
        """The number of steps already taken: the checkpoint's, 0 for a fresh run."""
        return 0 if self.state is None else int(self.state["step"])


def resume_point(cfg: Config, out: Path, resume: str | None, force: bool) -> ResumePoint:
    """The checkpoint to resume from (``resume``: a path, or "auto" for the newest
    readable one of ``out``'s run), after checking that it was made with the same
    settings; ``cfg`` normalises as that run did (``data.mean``/``data.std`` left to
    measure are taken from it). Nothing to resume (``resume`` None, or "auto" and no
    checkpoint): a fresh run with ``cfg``.

    Raises:
        ConfigError: the checkpoint was made with other settings (listed), without ``force``.
        CheckpointError: the checkpoint cannot be read or has no training state.
    """
    if resume is None:
        return ResumePoint(cfg)
    found = _newest_checkpoint(out, run_id_of(out)) if resume == "auto" else (Path(resume), None)
    if found is None:
        return ResumePoint(cfg)
    path, state = found
    state = state if state is not None else load_checkpoint(path)
    saved_cfg = checkpoint_config(state, path)
    training_state(state, path)  # refuse a checkpoint without step or optimizer state
    cfg = fill_data_stats(cfg, saved_cfg.data.mean, saved_cfg.data.std)
    cfg = _budgeted_epochs(cfg, saved_cfg)
    diffs = settings_differences(saved_cfg, cfg)
    if diffs and not force:
        raise ConfigError(
            f"{path} was made with other settings (add --force to resume anyway): "
            + "; ".join(diffs)
        )
    run_id = state.get("run_id") if isinstance(state.get("run_id"), str) else None
    return ResumePoint(cfg, state, path, run_id or run_id_of(out) or uuid.uuid4().hex[:12])


def _budgeted_epochs(cfg: Config, saved: Config) -> Config:
    """``cfg`` with the epochs a budgeted run chose (``train.time_budget``, recorded in
    its checkpoint's ``train.epochs``): a resumed budgeted run keeps them."""
    if cfg.train.time_budget is None or saved.train.time_budget is None:
        return cfg
    if cfg.train.epochs != saved.train.epochs:
        log.info(
            "resuming a run fitted to its time budget: its train.epochs=%d stay",
            saved.train.epochs,
        )
    train = dataclasses.replace(cfg.train, epochs=saved.train.epochs)
    return dataclasses.replace(cfg, train=train)


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key: a -> b``."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_differences(va, vb, prefix=f"{name}.")
        elif va != vb:
            diffs.append(f"{name}: {va!r} -> {vb!r}")
    return diffs


def settings_differences(saved: Config, current: Config) -> list[str]:
    """The settings that make two configs different runs, as ``key: a -> b``: everything
    but what may change on a resume (:data:`RESUMABLE_CHANGES`)."""
    trees = [saved.to_dict(), current.to_dict()]
    for key in RESUMABLE_CHANGES:
        *parents, leaf = key.split(".")
        for tree in trees:
            node = tree
            for part in parents:
                node = node[part]
            node.pop(leaf)
    return config_differences(*trees)


def find_resume_checkpoint(out: Path) -> Path | None:
    """The readable checkpoint of ``out``'s run with the most steps (periodic ones or
    ``last.pt``).

    Only checkpoints of the run that owns the folder (its ``run.json``) are candidates.
    A checkpoint that cannot be read (truncated by a copy, a damaged disk) is skipped with
    a warning, so the run resumes from the one before it. The temporary file of an
    interrupted write (``.NAME.XXXXXXXX.tmp``) is never a candidate.
    """
    found = _newest_checkpoint(out, run_id_of(out))
    return None if found is None else found[0]


def _newest_checkpoint(out: Path, run_id: str | None) -> tuple[Path, dict[str, Any]] | None:
    """:func:`find_resume_checkpoint`'s choice and its loaded state, among the checkpoints
    of run ``run_id`` (any, for None). Periodic checkpoints carry their step in their
    name, so only the candidates tried are read: ``last.pt`` (whose step is inside it) and
    then the newest first."""
    last = out / "last.pt"
    last_state = _readable(last, run_id) if last.is_file() else None
    last_step = -1 if last_state is None else int(last_state.get("step", -1))
    for step, path in reversed(checkpoints_in(out)):
        if last_state is not None and step <= last_step:
            break  # at equal steps, last.pt wins
        state = _readable(path, run_id)
        if state is not None:
            return path, state
    return None if last_state is None else (last, last_state)


def _readable(path: Path, run_id: str | None) -> dict[str, Any] | None:
    """The state of a checkpoint of run ``run_id`` (any, for None), or None (with a
    warning) when it cannot be read or belongs to another run."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        log.warning("skipping an unreadable checkpoint: %s", err)
        return None
    if run_id is not None and state.get("run_id") != run_id:
        log.info("skipping %s: it belongs to another run of this folder", path)
        return None
    return state
