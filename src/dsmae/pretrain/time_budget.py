"""Fitting a run to ``train.time_budget`` (:mod:`dsmae.budget` has the arithmetic): time
a few real steps, a checkpoint save and the monitors, undo the steps, and fix
``train.epochs`` to the number that fits, the same on every process."""

from __future__ import annotations

import contextlib
import copy
import logging
import time

from dsmae import distributed
from dsmae.budget import epochs_in_budget
from dsmae.checkpoint import save_checkpoint
from dsmae.config import ConfigError
from dsmae.config.checks import parse_duration
from dsmae.pretrain.divergence import StepHealth
from dsmae.pretrain.monitor import Monitor
from dsmae.pretrain.state import Run
from dsmae.runtime import synchronize
from dsmae.writes import atomic_write_text

log = logging.getLogger(__name__)

BUDGET_WARMUP_STEPS = 3  # untimed steps before the timed ones: compilation happens here
BUDGET_TIMED_STEPS = 8
BUDGET_SAVE_TEST = ".budget-save-test.pt"


def fit_budget(run: Run, started: float) -> None:
    """``train.time_budget`` (:mod:`dsmae.budget`): time a few real steps, a checkpoint
    save and the monitors, undo the steps (weights, teacher and optimizer as they were, so
    the run is that of ``train.epochs=E`` from its first step), then fix ``train.epochs``
    to the E that fits, the same on every process, and record it in ``config.yaml``."""
    t = run.cfg.train
    budget = parse_duration(t.time_budget)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    moments = copy.deepcopy(run.optimizer.state_dict())
    steps, step_s = _time_steps(run)
    save_s = _time_save(run) if run.proc.is_main else 0.0
    run.model.load_state_dict(weights)
    run.optimizer.load_state_dict(moments)
    run.health = StepHealth(run.device)
    epoch_s = _epoch_seconds(run, step_s, save_s)
    elapsed = time.perf_counter() - started
    epochs = _agreed_epochs(run, budget, elapsed, epoch_s, end_s=2 * save_s)
    run.set_epochs(epochs)
    if run.proc.is_main:
        atomic_write_text(run.out / "config.yaml", run.cfg.to_yaml(), "config")
    log.info(
        "time budget %s (%.0f s): a step takes %.4f s (timed over %d steps, then undone), an "
        "epoch about %.1f s with its checkpoints and monitors, and %.1f s have passed: "
        "train.epochs=%d (at most %d)",
        t.time_budget, budget, step_s, steps, epoch_s, elapsed, epochs, t.epochs,
    )  # fmt: skip


def _epoch_seconds(run: Run, step_s: float, save_s: float) -> float:
    """The seconds an epoch will take: its steps, and its share of the periodic
    checkpoints and of the monitors (timed once here, rank 0)."""
    t = run.cfg.train
    watch = _time_monitors(run) if run.proc.is_main else {}
    seconds = run.steps_per_epoch * step_s
    seconds += sum(s / every for s, every in watch.values())
    if t.checkpoint_every:
        seconds += save_s / t.checkpoint_every
    if t.checkpoint_minutes:  # a save every so many minutes takes its share of each
        seconds /= max(1e-3, 1 - save_s / (60 * t.checkpoint_minutes))
    return seconds


def _agreed_epochs(run: Run, budget: float, elapsed: float, epoch_s: float, end_s: float) -> int:
    """:func:`~dsmae.budget.epochs_in_budget`, the smallest over the processes.

    Raises:
        ConfigError: no epoch fits (on this process or another).
    """
    refusal: ConfigError | None = None
    try:
        epochs = epochs_in_budget(budget, elapsed, epoch_s, end_s, run.cfg.train.epochs)
    except ConfigError as err:
        epochs, refusal = 0, err
    epochs = distributed.min_over_processes(epochs, run.proc, run.device)
    if epochs < 1:
        raise refusal or ConfigError(
            "train.time_budget: on another process no epoch fits it", "train.time_budget"
        )
    return epochs


def _time_steps(run: Run) -> tuple[int, float]:
    """Take the run's first steps (warm-up ones, then timed ones; teacher updates
    included) and return how many were timed and the seconds a step took."""
    total = min(BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS, run.total_steps)
    warmup = min(BUDGET_WARMUP_STEPS, total - 1)
    synchronize(run.device)
    begun = time.perf_counter()
    with contextlib.closing(run.steps(0, total)) as steps:
        for taken in steps:
            if taken.step == warmup - 1:  # the timed steps start after this one
                synchronize(run.device)
                begun = time.perf_counter()
    synchronize(run.device)
    return total - warmup, (time.perf_counter() - begun) / (total - warmup)


def _time_save(run: Run) -> float:
    """Seconds one checkpoint of the run takes to write (a test file, then removed)."""
    path = run.out / BUDGET_SAVE_TEST
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}
    begun = time.perf_counter()
    try:
        save_checkpoint(path, state)
    finally:
        path.unlink(missing_ok=True)
    return time.perf_counter() - begun


def _time_monitors(run: Run) -> dict[str, tuple[float, int]]:
    """Seconds each monitor that will run takes once, with its period in epochs
    (``monitor.knn_every``, ``monitor.every``, ``monitor.images_every``); the monitor is
    kept for the run."""
    mon = run.cfg.monitor
    run.monitor = Monitor(run.cfg, run.device)
    timed: dict[str, tuple[float, int]] = {}
    if mon.knn_every or mon.every:
        run.monitor.health_images()  # loads the splits: a cost paid once, now
    if mon.knn_every:
        begun = time.perf_counter()
        run.monitor.knn_top1(run.model)
        timed["knn"] = (time.perf_counter() - begun, mon.knn_every)
    if mon.every:
        begun = time.perf_counter()
        run.monitor.health(run.model)
        run.monitor.gradient_share(run.model)
        timed["health"] = (time.perf_counter() - begun, mon.every)
    if mon.images_every:
        begun = time.perf_counter()
        run.monitor.denoising_grid(run.model)
        timed["images"] = (time.perf_counter() - begun, mon.images_every)
    return timed
