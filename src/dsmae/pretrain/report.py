"""Where a pre-training run reports, on rank 0: the line that opens it, the metric lines
(``metrics.jsonl``, TensorBoard and the trackers of :class:`~dsmae.metrics.MetricsLog`),
the monitors after an epoch (:mod:`dsmae.pretrain.monitor`), the epoch's progress line
and the progress bar with images/s and ETA."""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from dsmae import distributed
from dsmae.metrics import MetricsLog
from dsmae.pretrain.monitor import Monitor
from dsmae.pretrain.state import Run
from dsmae.pretrain.step import Taken
from dsmae.runtime import progress, synchronize

log = logging.getLogger(__name__)


def log_start(run: Run) -> None:
    """The line that opens a run: model, data, processes, steps."""
    cfg, t = run.cfg, run.cfg.train
    data = f"{len(run.images)} images"
    if run.stream is not None:
        data = run.stream.describe(run.epoch_images)
    log.info(
        "pre-training %s (%s, %.1fM encoder parameters, %.2f GFLOP per image) on %s, "
        "%d process(es) on %s, steps %d to %d of %d images%s",
        cfg.model.method,
        cfg.model.arch,
        sum(p.numel() for p in run.model.encoder.parameters()) / 1e6,
        run.flops_per_image / 1e9,
        data,
        run.proc.world_size,
        run.device,
        run.step,
        run.total_steps,
        t.batch_size,
        f", torch.compile ({t.compile_scope})" if run.compiled else "",
    )


class Report:
    """The metric lines, monitors and progress bar of a run (rank 0; the other ranks
    only take part in the loss average), and the clock of the metric lines."""

    def __init__(self, run: Run, started: float) -> None:
        cfg, main = run.cfg, run.proc.is_main
        self.monitor = (run.monitor or Monitor(cfg, run.device)) if main else None
        purge = run.step + 1 if run.resumed else None  # TensorBoard hides the steps taken again
        self.metrics = MetricsLog(run.out, purge_step=purge, config=cfg) if main else None
        self.started = started
        self.since = (time.perf_counter(), run.step)  # (time, step) of the last metrics line
        self.once = {"setup_s": self.since[0] - started}  # written with the first metrics line
        self.first_step = run.step
        images = (run.total_steps - run.step) * cfg.train.batch_size
        self.bar: tqdm = progress(images, "pretrain", disable=not main)
        # the epoch so far, for its line: this process's summed loss (on the device: no
        # synchronisation a step), its finite steps, its steps and when it began
        self.epoch_loss = torch.zeros((), device=run.device)
        self.epoch_finite = torch.zeros((), device=run.device)
        self.epoch_steps = 0
        self.epoch_began = self.epoch_ended = self.since[0]

    def stepped(self, run: Run, taken: Taken) -> None:
        """Count step ``taken`` on the bar and in the epoch's mean loss (its non-finite
        steps left out); when it was the first and it compiled, time it alone and leave it
        out of the throughput."""
        self.bar.update(run.cfg.train.batch_size)
        loss = taken.losses["loss"].detach().float()
        finite = torch.isfinite(loss)
        self.epoch_loss += torch.where(finite, loss, torch.zeros_like(loss))
        self.epoch_finite += finite
        self.epoch_steps += 1
        if taken.step == self.first_step and run.compiled:
            synchronize(run.device)
            now = time.perf_counter()
            self.once["compile_s"] = now - self.since[0]
            log.info("first step (torch.compile included): %.1f s", self.once["compile_s"])
            self.since = (now, run.step)
            self.epoch_began, self.epoch_steps = now, 0
            self.epoch_loss.zero_()
            self.epoch_finite.zero_()

    def metrics_line(self, run: Run, taken: Taken, epoch: int) -> dict[str, torch.Tensor]:
        """Check the skipped steps (:class:`~dsmae.pretrain.divergence.StepHealth`), then
        write ``run.last``, the metrics line of ``run.step``; returns the step's losses
        averaged over the processes."""
        t = run.cfg.train
        skipped = run.health.check(run.step, taken.losses, t.max_bad_steps, run.last_checkpoint)
        losses = distributed.mean_over_processes(taken.losses, run.proc)
        run.last = {"step": run.step, "epoch": epoch, "lr": taken.lr, "momentum": taken.momentum}
        run.last.update({k: v.item() for k, v in losses.items()})  # synchronises
        now = time.perf_counter()
        then, step_then = self.since
        if run.step > step_then:
            run.last["img_per_s"] = (run.step - step_then) * t.batch_size / (now - then)
        run.last["skipped_steps"] = skipped
        run.last["wall_s"] = now - self.started
        run.last.update(self.once)
        self.once = {}
        if run.device.type == "cuda":
            run.last["peak_mem_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
        self.since = (now, run.step)
        if self.metrics is not None:
            self.metrics.write(run.last)
        self.bar.set_postfix(epoch=epoch, loss=f"{run.last['loss']:.4f}")
        return losses

    def monitors(self, run: Run, done: int) -> None:
        """The monitors due after epoch ``done`` (1-based): k-NN, health, images. The
        epoch's own time ends here, before them."""
        synchronize(run.device)
        self.epoch_ended = time.perf_counter()
        if self.monitor is None or self.metrics is None:
            return
        elapsed = time.perf_counter() - self.started
        flops = run.flops_per_image * run.step * run.cfg.train.batch_size
        self.monitor.after_epoch(run.model, done, run.step, elapsed, flops, self.metrics)

    def epoch_line(self, run: Run, done: int) -> None:
        """The progress line after epoch ``done``: the mean loss of its steps (this
        process's; its non-finite steps left out), their images/s, the time and the ETA,
        however few its steps; then the next epoch's count starts."""
        epochs = run.cfg.train.epochs
        now = time.perf_counter()
        elapsed = now - self.started
        finite = float(self.epoch_finite)  # synchronises, once an epoch
        loss = float(self.epoch_loss) / finite if finite else float("nan")
        seconds = self.epoch_ended - self.epoch_began
        rate = self.epoch_steps * run.cfg.train.batch_size / seconds if seconds > 0 else 0.0
        log.info(
            "epoch %d/%d: loss %.4f, %.0f img/s, %.0f s elapsed, ETA %.0f s",
            done,
            epochs,
            loss,
            rate,
            elapsed,
            elapsed / done * (epochs - done) if done else 0.0,
        )
        self.epoch_loss.zero_()
        self.epoch_finite.zero_()
        self.epoch_steps, self.epoch_began = 0, time.perf_counter()

    def close(self) -> None:
        """Flush and close the metric lines (rank 0)."""
        if self.metrics is not None:
            self.metrics.close()
