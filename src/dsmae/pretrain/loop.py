"""``pretrain()``: a run set up (:mod:`~dsmae.pretrain.setup`), fitted to its time budget
where it has one (:mod:`~dsmae.pretrain.time_budget`), then its steps
(:mod:`~dsmae.pretrain.step`) with their metric lines, epoch ends and saves, read top to
bottom in :func:`_train`."""

from __future__ import annotations

import contextlib
import logging
import time

from dsmae import distributed
from dsmae.config import Config, ConfigError
from dsmae.data.pipeline import eval_batch
from dsmae.metrics import MetricsLog
from dsmae.preemption import Preempted, StopSignals
from dsmae.pretrain.report import Report, log_start
from dsmae.pretrain.saving import LAST_CHECKPOINT, checkpoint_path
from dsmae.pretrain.setup import set_up
from dsmae.pretrain.state import PretrainResult, Run
from dsmae.pretrain.time_budget import fit_budget
from dsmae.runtime import generator
from dsmae.visualize import save_denoise_figure

log = logging.getLogger(__name__)


def pretrain(
    cfg: Config,
    resume: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    until_epoch: int | None = None,
) -> PretrainResult:
    """Pre-train ``cfg.model`` on ``cfg.data``.

    Writes into ``cfg.out`` (rank 0): ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
    ``checkpoint-NNNNNNNN.pt`` (step-numbered) every ``train.checkpoint_every`` epochs and
    every ``train.checkpoint_minutes``, the newest ``train.keep_checkpoints`` kept, and
    ``last.pt`` and ``denoise.png`` at the end.

    The output folder is locked while the run writes into it, and a fresh run into a
    folder that holds another run is refused (:mod:`dsmae.pretrain.run_folder`). SIGTERM,
    SIGINT and SIGUSR1 stop the run after the current step with a checkpoint
    (:mod:`dsmae.preemption`).

    Args:
        resume: a checkpoint path, or "auto" for the newest one of ``cfg.out``'s run.
        force: resume even if the checkpoint was made with other settings.
        overwrite: start a fresh run in a folder that holds another run.
        until_epoch: stop after this epoch, with its checkpoint (the result's), as a
            preemption would: the schedules stay those of ``train.epochs``, and ``resume``
            continues the run. None: run all ``train.epochs``. A resumed run that is past
            it already is refused.

    Raises:
        ConfigError: ``until_epoch`` not a whole number in [1, train.epochs], or before
            the epoch the resumed run has reached.
        Preempted: stopped by a signal, after writing a checkpoint. A signal after the
            last step (while ``last.pt`` is written) lets the run end: the result's
            ``stop_requested`` names it.
    """
    started = time.perf_counter()
    if until_epoch is not None and (
        not isinstance(until_epoch, int)
        or isinstance(until_epoch, bool)
        or not 1 <= until_epoch <= cfg.train.epochs
    ):
        raise ConfigError(
            f"until_epoch must be a whole number of epochs in [1, train.epochs="
            f"{cfg.train.epochs}], got {until_epoch!r}",
            "until_epoch",
        )
    run = set_up(cfg, resume, force, overwrite)
    try:
        done = run.step // run.steps_per_epoch
        if until_epoch is not None and until_epoch < done:
            raise ConfigError(
                f"until_epoch={until_epoch}: the run in {run.out} has done {done} epochs "
                "already; ask for a later epoch",
                "until_epoch",
            )
        if run.cfg.train.time_budget is not None and not run.resumed:
            fit_budget(run, started)
        with StopSignals() as signals:
            result = _train(run, started, signals, until_epoch)
        result.stop_requested = signals.received  # after the last step: all is saved
        return result
    finally:
        if run.lock is not None:
            run.lock.close()
        distributed.teardown()


def _train(
    run: Run, started: float, signals: StopSignals, until_epoch: int | None
) -> PretrainResult:
    """The steps from ``run.step`` to the end of epoch ``until_epoch`` (None: the run's
    last), then its checkpoint (the run's last one, ``last.pt``, after the last epoch).

    Divergence is checked before every save and epoch end: a diverged run never saves nor
    moves on."""
    log_start(run)
    t = run.cfg.train
    stop_step = run.steps_per_epoch * min(until_epoch or t.epochs, t.epochs)
    report = Report(run, started)
    run.health.checked_step = run.step
    # closing the steps ends a stream's readers, however the loop ends
    with report.bar, contextlib.closing(run.steps(run.step, stop_step)) as steps:
        for taken in steps:
            run.step = taken.step + 1
            report.stepped(run, taken)
            epoch, losses = taken.step // run.steps_per_epoch, taken.losses
            if run.step % t.log_every == 0 or run.step == run.total_steps:
                losses = report.metrics_line(run, taken, epoch)
            epoch_ends = run.step % run.steps_per_epoch == 0
            save_now = not epoch_ends and run.checkpointer.due_mid_epoch()
            if epoch_ends or save_now:
                run.health.check(run.step, losses, t.max_bad_steps, run.last_checkpoint)
            if epoch_ends:
                _end_of_epoch(run, epoch + 1, report)
            elif save_now:
                run.save(checkpoint_path(run.out, run.step))
            signal_name = stop_requested(run, signals)  # after the epoch's teacher update
            if signal_name is not None:
                stop(run, signal_name, report.metrics)
    if run.step < run.total_steps:
        return _pause(run, started, report)
    return _finish(run, started, report)


def _end_of_epoch(run: Run, done: int, report: Report) -> None:
    """After epoch ``done`` (1-based; the teacher moved with its last step): the monitors,
    its checkpoint where one is due, and its progress line."""
    report.monitors(run, done)
    if run.checkpointer.due_after_epoch(done):
        run.save(checkpoint_path(run.out, run.step))
    report.epoch_line(run, done)


def _pause(run: Run, started: float, report: Report) -> PretrainResult:
    """Stop before the run's end with the checkpoint of this step (the epoch's own, if it
    was due); ``--resume`` continues from it."""
    checkpoint = checkpoint_path(run.out, run.step)
    if run.last_checkpoint != checkpoint:
        run.save(checkpoint)
    report.close()
    distributed.barrier(run.proc)
    log.info("stopped after step %d of %d, as asked: %s", run.step, run.total_steps, checkpoint)
    return PretrainResult(run.out, checkpoint, run.cfg, run.last, time.perf_counter() - started)


def _finish(run: Run, started: float, report: Report) -> PretrainResult:
    """Write ``last.pt`` and (rank 0) the denoising figure of the first 8 images."""
    cfg = run.cfg
    checkpoint = run.save(run.out / LAST_CHECKPOINT)
    if report.metrics is not None:
        shown = eval_batch(run.images[:8], cfg.model.img_size, cfg.data.mean, cfg.data.std)
        figure = run.out / "denoise.png"
        rng = generator(cfg.train.seed, run.device)
        save_denoise_figure(
            run.model, shown.to(run.device), figure, cfg.data.mean, cfg.data.std, rng
        )
    report.close()
    distributed.barrier(run.proc)
    seconds = time.perf_counter() - started
    log.info("pre-training done in %.0f s: %s", seconds, checkpoint)
    return PretrainResult(run.out, checkpoint, cfg, run.last, seconds)


def stop_requested(run: Run, signals: StopSignals) -> str | None:
    """The signal to stop on after this step, if any. Under torchrun the processes agree
    (one all-reduce every ``train.log_every`` steps), so they all stop at the same step."""
    if not run.proc.distributed:
        return signals.received
    if run.step % run.cfg.train.log_every:
        return None
    if distributed.any_process(signals.received is not None, run.proc, run.device):
        return signals.received or "a signal to another process"
    return None


def stop(run: Run, signal_name: str, metrics: MetricsLog | None) -> None:
    """Save a checkpoint at this step boundary and raise :class:`Preempted`."""
    path = run.save(checkpoint_path(run.out, run.step))
    if metrics is not None:
        metrics.close()
    distributed.barrier(run.proc)
    error = Preempted(signal_name, run.step, str(path))
    log.warning("%s", error)
    raise error
