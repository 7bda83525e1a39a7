"""The pre-training engine (SPEC section 5): AdamW, warm-up + cosine learning rate, the
teacher's momentum schedule, gradient accumulation, bf16 autocast on GPU, metrics,
monitoring, checkpoints and exact resume, on one process or many under ``torchrun``.

Every random choice of a step (crop boxes, flips, noise mask, noise) is drawn for the
GLOBAL batch from a generator seeded by ``(seed, step)``, and the data order of an
epoch depends only on ``(seed, epoch)``. So a run resumed from any step, or run on
another number of processes with the same global batch, takes the same steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel

from dsmae import distributed
from dsmae.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    training_state,
)
from dsmae.config import Config, ConfigError, TrainConfig, fill_data_stats
from dsmae.data.augment import crop_boxes, random_flips
from dsmae.data.pipeline import (
    augmented_batch,
    channel_stats,
    epoch_order,
    eval_batch,
    load_split,
)
from dsmae.flops import train_flops_per_image
from dsmae.metrics import MetricsLog
from dsmae.models import DSMAE
from dsmae.monitor import Monitor
from dsmae.preemption import Preempted, StopSignals
from dsmae.run_folder import (
    checkpoints_in,
    cut_metrics,
    lock_folder,
    prune_checkpoints,
    run_id_of,
    start_run,
)
from dsmae.runtime import (
    autocast,
    compile_model,
    generator,
    progress,
    synchronize,
    use_amp,
    use_compile,
)
from dsmae.schedules import lr_at, momentum_at
from dsmae.seeds import pretrain_step_seed
from dsmae.visualize import save_denoise_figure
from dsmae.writes import WriteError, atomic_write_text

log = logging.getLogger(__name__)

# Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = (
    "out",
    "data.root",
    "data.download",
    "train.device",
    "train.micro_batch",
    "train.compile",
    "train.compile_scope",
    "train.grad_checkpointing",
    "train.data_on_device",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.keep_checkpoints",
    "train.log_every",
    "train.max_bad_steps",
    "train.dist_timeout_minutes",
    "monitor",
    "probe",
    "finetune",
)


class DivergedError(RuntimeError):
    """Pre-training stopped: too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class PretrainResult:
    """Where a pre-training run left its outputs, and its last logged metrics."""

    out: Path
    checkpoint: Path
    config: Config
    last_metrics: dict[str, Any]
    seconds: float


def build_optimizer(model: DSMAE, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: not on norms, biases, the position
    embedding, the [CLS] token or the mask token.

    Fused kernels on CUDA and CPU: one kernel per step, which also skips a non-finite
    step on the device (:func:`step_unless_non_finite`).
    """
    no_decay = {f"encoder.{name}" for name in model.encoder.no_weight_decay()}
    no_decay.add("decoder.mask_token")
    groups = param_groups_weight_decay(model, train.weight_decay, no_weight_decay_list=no_decay)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), fused=fused)


def step_unless_non_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` where ``finite`` (a 0-d bool tensor) is True; else nothing changes.

    A fused Adam(W) takes the decision on the device, through the ``found_inf`` input that
    ``GradScaler`` uses: its kernel leaves weights and moments untouched and the step count
    is restored, with no host synchronisation. Other optimizers read the flag on the host.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    elif finite:  # synchronises with the device
        optimizer.step()


@dataclass
class Corruption:
    """The random choices of one step for a batch: crop boxes (B, 4), flips (B,), the
    noise mask (B, N) and the noise (B, C, H, W) (None for mae)."""

    boxes: torch.Tensor
    flips: torch.Tensor
    mask: torch.Tensor
    eps: torch.Tensor | None

    def __getitem__(self, part: slice) -> Corruption:
        return Corruption(
            self.boxes[part],
            self.flips[part],
            self.mask[part],
            None if self.eps is None else self.eps[part],
        )


def draw_step(model: DSMAE, cfg: Config, step: int, device: torch.device) -> Corruption:
    """Every random choice of optimizer step ``step`` for the whole global batch, from a
    generator seeded by (seed, step) alone."""
    rng = generator(pretrain_step_seed(cfg.train.seed, step), device)
    b = cfg.train.batch_size
    boxes = crop_boxes(b, cfg.data.crop_scale, generator=rng, device=device)
    flips = random_flips(b, cfg.data.hflip, generator=rng, device=device)
    mask, eps = model.sample_corruption(b, rng, device)
    return Corruption(boxes, flips, mask, eps)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    *,
    micro_batch: int | None = None,
    mask: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    amp: bool = False,
    grad_clip: float = 0.0,
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch, in micro-batches of ``micro_batch`` images.

    Every micro-batch loss is a mean over the same number of tokens, so the accumulated
    gradient equals the full batch's. Under DistributedDataParallel, gradients are
    all-reduced once, on the last micro-batch. The teacher is NOT updated here.

    Args:
        model: a DSMAE, possibly wrapped in DistributedDataParallel or compiled.
        images: (B, C, H, W) augmented, normalised, on the model's device.
        mask, eps: the corruption of these images (see ``DSMAE.sample_corruption``);
            drawn from ``generator`` inside the model when None.
        grad_clip: clip the gradient norm to this value (0: no clipping).

    A step whose gradient norm is not finite (a NaN or infinite loss or gradient,
    overflow under bf16) changes nothing: the optimizer does not step
    (:func:`step_unless_non_finite`, decided on the device). Under
    DistributedDataParallel the norm is that of the all-reduced gradient, so every process
    makes the same choice. Nothing here waits for the device.

    Returns:
        the batch's mean ``loss`` (and ``loss_y``/``loss_z`` where the method has them),
        ``grad_norm`` (before clipping) and ``finite`` (bool: whether the optimizer
        stepped), as detached 0-d tensors on the device.
    """
    micro_batch = micro_batch or images.shape[0]
    chunks = range(0, images.shape[0], micro_batch)
    accum = len(chunks)
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    for i, start in enumerate(chunks):
        part = slice(start, start + micro_batch)
        last = i == accum - 1
        sync = contextlib.nullcontext()
        if isinstance(model, DistributedDataParallel) and not last:
            sync = model.no_sync()
        with sync:  # no all-reduce until the last micro-batch's backward
            with autocast(images.device, amp):
                out = model(
                    images[part],
                    generator=generator,
                    mask=None if mask is None else mask[part],
                    eps=None if eps is None else eps[part],
                )
            (out.loss / accum).backward()
        for name in ("loss", "loss_y", "loss_z"):
            value = getattr(out, name)
            if value is not None:
                totals[name] = totals.get(name, 0) + value.detach().float() / accum
    params = [p for p in model.parameters() if p.grad is not None]
    totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    totals["finite"] = torch.isfinite(totals["grad_norm"])
    step_unless_non_finite(optimizer, totals["finite"])
    return totals


def resolve_data_stats(cfg: Config, images: torch.Tensor) -> Config:
    """Fill ``data.mean``/``data.std`` from the pre-training images where they are None."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return cfg
    return fill_data_stats(cfg, *channel_stats(images))


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
    interrupted write (``.NAME.tmp``) is never a candidate.
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


class StepHealth:
    """Counts the steps skipped for a non-finite gradient, on the device.

    :meth:`record` runs every step without waiting for the device; :meth:`check` reads
    the counters (one synchronisation) when metrics are logged, warns about new skipped
    steps and stops a run that has diverged.
    """

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = zero.clone()  # steps skipped in this process's run
        self.in_a_row = zero.clone()  # the current run of consecutive skipped steps
        self.longest = zero.clone()  # the longest such run since the last check
        self.reported = 0  # ``skipped`` at the last check
        self.checked_step = 0  # the step of the last check

    def record(self, finite: torch.Tensor) -> None:
        """One step's outcome: ``finite`` is the 0-d bool of :func:`train_step`."""
        bad = (~finite).long()
        self.skipped += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        torch.maximum(self.longest, self.in_a_row, out=self.longest)

    def check(
        self, step: int, losses: dict[str, torch.Tensor], limit: int, last_good: Path | None
    ) -> int:
        """Warn about the steps skipped since the last check (up to ``step``, 1-based) and
        return how many were skipped in all.

        Raises:
            DivergedError: ``limit`` (> 0) consecutive steps were skipped. Nothing is
                saved, so the last good checkpoint stays as it was.
        """
        skipped, longest = int(self.skipped), int(self.longest)  # synchronises
        self.longest.copy_(self.in_a_row)
        new, first = skipped - self.reported, self.checked_step + 1
        self.reported, self.checked_step = skipped, step
        if not new and not (limit and longest >= limit):
            return skipped
        values = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        if new:
            where = f"step {step}" if first == step else f"{new} of steps {first}-{step}"
            log.warning("%s skipped: non-finite gradient (step %d: %s)", where, step, values)
        if limit and longest >= limit:
            raise DivergedError(
                f"stopped at step {step}: {longest} steps in a row had a non-finite loss or "
                f"gradient ({values}). The last good checkpoint is {last_good or 'none yet'}. "
                "Try a lower train.base_lr, train.grad_clip (e.g. 1.0), or more "
                "train.warmup_epochs, then resume from it with --resume (and --force, as the "
                "settings changed)."
            )
        return skipped


@dataclass
class _Run:
    """The state of one pre-training run (in this process)."""

    cfg: Config
    proc: distributed.Process
    out: Path
    device: torch.device
    amp: bool
    images: torch.Tensor  # (N, C, H, W) uint8, the pre-training split
    model: DSMAE
    forward: torch.nn.Module  # the model as trained: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    flops_per_image: float
    mean: torch.Tensor  # (C,) normalisation of the images, on the device
    std: torch.Tensor
    health: StepHealth
    compiled: bool
    run_id: str  # this run's, recorded in its checkpoints ("" on ranks that write nothing)
    lock: Any = None  # the open lock file of the output folder (rank 0)
    resumed: bool = False
    step: int = 0
    last: dict[str, Any] = dataclasses.field(default_factory=dict)  # last metrics line
    last_save: float = dataclasses.field(default_factory=time.monotonic)
    last_checkpoint: Path | None = None  # the newest checkpoint written or resumed from

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs


def _setup(cfg: Config, resume: str | None, force: bool, overwrite: bool) -> _Run:
    """Join the processes, lock the output folder, load the data, build the model,
    restore a checkpoint."""
    out = Path(cfg.out)
    proc, device = distributed.setup(cfg.train.device, cfg.train.dist_timeout_minutes)
    lock = None
    if proc.is_main:
        check_writable(out)
        lock = lock_folder(out)
    try:
        return _build_run(cfg, resume, force, overwrite, proc, device, lock)
    except BaseException:
        if lock is not None:
            lock.close()  # releases the folder
        raise


def _build_run(
    cfg: Config,
    resume: str | None,
    force: bool,
    overwrite: bool,
    proc: distributed.Process,
    device: torch.device,
    lock: Any,
) -> _Run:
    t, out = cfg.train, Path(cfg.out)
    state, resumed_from, cfg, run_id = _resume_state(cfg, out, resume, force)
    if proc.is_main:
        run_id = start_run(out, overwrite, run_id)
        if state is not None:
            cut_metrics(out, int(state["step"]))
    images = load_split(cfg.data, cfg.model, "pretrain").images
    steps_per_epoch = len(images) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is larger than the {len(images)} pre-training images"
        )
    cfg = resolve_data_stats(cfg, images)

    torch.manual_seed(t.seed)  # weight initialisation, identical on every process
    model = DSMAE(cfg.model).to(device).train()
    if t.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, t, device)
    if state is not None:
        load_weights(model, state["model"], str(resumed_from))
        optimizer.load_state_dict(state["optimizer"])
    sample = eval_batch(images[:2], cfg.model.img_size, cfg.data.mean, cfg.data.std).to(device)
    flops = train_flops_per_image(model, sample)

    forward = distributed.wrap(model, proc, device)
    compiled = use_compile(device, t.compile)
    if compiled:
        forward = compile_model(forward, t.compile_scope)
    on_device = t.data_on_device if t.data_on_device is not None else device.type == "cuda"
    if on_device:
        images = images.to(device)
    elif device.type == "cuda":
        images = images.pin_memory()
    if proc.is_main:
        atomic_write_text(out / "config.yaml", cfg.to_yaml(), "config")
    return _Run(
        cfg=cfg,
        proc=proc,
        out=out,
        device=device,
        amp=use_amp(device, t.amp),
        images=images,
        model=model,
        forward=forward,
        optimizer=optimizer,
        steps_per_epoch=steps_per_epoch,
        flops_per_image=flops,
        mean=torch.tensor(cfg.data.mean, device=device),
        std=torch.tensor(cfg.data.std, device=device),
        health=StepHealth(device),
        compiled=compiled,
        run_id=run_id or "",
        lock=lock,
        resumed=state is not None,
        step=0 if state is None else int(state["step"]),
        last_checkpoint=resumed_from,
    )


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"out={str(out)!r} is not a writable folder: {err}") from None


def _resume_state(
    cfg: Config, out: Path, resume: str | None, force: bool
) -> tuple[dict | None, Path | None, Config, str | None]:
    """The checkpoint to resume from (``resume``: a path, or "auto" for the newest
    readable one of ``out``'s run), its path, ``cfg`` normalising as that run did
    (``data.mean``/``data.std`` left to measure are taken from it) and the run's id,
    after checking that it was made with the same settings. Nothing to resume: None, None,
    ``cfg``, None (a fresh run)."""
    if resume is None:
        return None, None, cfg, None
    found = _newest_checkpoint(out, run_id_of(out)) if resume == "auto" else (Path(resume), None)
    if found is None:
        log.info("no checkpoint in %s: starting from scratch", out)
        return None, None, cfg, None
    path, state = found
    state = state if state is not None else load_checkpoint(path)
    saved_cfg = checkpoint_config(state, path)
    training_state(state, path)  # refuse a checkpoint without step or optimizer state
    cfg = fill_data_stats(cfg, saved_cfg.data.mean, saved_cfg.data.std)
    diffs = settings_differences(saved_cfg, cfg)
    if diffs and not force:
        raise ConfigError(
            f"{path} was made with other settings (add --force to resume anyway): "
            + "; ".join(diffs)
        )
    log.info("resuming from %s at step %d", path, state["step"])
    run_id = state.get("run_id") if isinstance(state.get("run_id"), str) else None
    return state, path, cfg, run_id or run_id_of(out) or uuid.uuid4().hex[:12]


def _batch(run: _Run, step: int, order: torch.Tensor) -> tuple[torch.Tensor, Corruption]:
    """This process's share of the global batch of ``step``, augmented, and its corruption.

    ``order`` (the epoch's permutation) lives where the images do, so with the data set
    on the GPU the gather, the augmentation and the draws never wait for the device.
    """
    cfg, proc = run.cfg, run.proc
    b = cfg.train.batch_size
    start = (step % run.steps_per_epoch) * b
    mine = distributed.local_share(b, proc)
    idx = order[start : start + b][mine]
    corruption = draw_step(run.model, cfg, step, run.device)[mine]
    images = load_batch(run.images, idx, corruption, cfg.model.img_size, run.mean, run.std)
    return images, corruption


def load_batch(
    images: torch.Tensor,
    idx: torch.Tensor,
    corruption: Corruption,
    size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """The batch ``images[idx]`` ((N, C, H, W) uint8, any device), cropped and flipped as
    ``corruption`` says, resized to ``size`` and normalised by ``mean``/``std`` ((C,)):
    (B, C, size, size) float32 on the device of ``corruption``."""
    uint8 = images[idx].to(corruption.boxes.device, non_blocking=True)
    return augmented_batch(uint8, size, corruption.boxes, corruption.flips, mean, std)


def _save(run: _Run, path: Path) -> Path:
    """Write a checkpoint (rank 0 only) and drop periodic ones beyond ``keep_checkpoints``."""
    run.last_save = time.monotonic()
    if not run.proc.is_main:
        return path
    state = {
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "step": run.step,
        "epoch": run.step // run.steps_per_epoch,
        "run_id": run.run_id,
    }
    try:
        save_checkpoint(path, state)
    except WriteError as err:
        raise WriteError(
            f"{err}. The last good checkpoint is {run.last_checkpoint or 'none yet'}: free some "
            "space (or fix the folder) and continue with --resume auto."
        ) from None
    run.last_checkpoint = path
    prune_checkpoints(run.out, run.run_id, run.cfg.train.keep_checkpoints)
    return path


def pretrain(
    cfg: Config, resume: str | None = None, force: bool = False, overwrite: bool = False
) -> PretrainResult:
    """Pre-train ``cfg.model`` on ``cfg.data``.

    Writes into ``cfg.out`` (rank 0): ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``,
    ``checkpoint-NNNNNNNN.pt`` (step-numbered) every ``train.checkpoint_every`` epochs and
    every ``train.checkpoint_minutes``, the newest ``train.keep_checkpoints`` kept, and
    ``last.pt`` and ``denoise.png`` at the end.

    The output folder is locked while the run writes into it, and a fresh run into a
    folder that holds another run is refused (:mod:`dsmae.run_folder`). SIGTERM, SIGINT
    and SIGUSR1 stop the run after the current step with a checkpoint
    (:mod:`dsmae.preemption`).

    Args:
        resume: a checkpoint path, or "auto" for the newest one of ``cfg.out``'s run.
        force: resume even if the checkpoint was made with other settings.
        overwrite: start a fresh run in a folder that holds another run.

    Raises:
        Preempted: stopped by a signal, after writing a checkpoint.
    """
    started = time.perf_counter()
    run = _setup(cfg, resume, force, overwrite)
    try:
        with StopSignals() as signals:
            return _train(run, started, signals)
    finally:
        if run.lock is not None:
            run.lock.close()
        distributed.teardown()


def _train(run: _Run, started: float, signals: StopSignals) -> PretrainResult:
    cfg, t, proc = run.cfg, run.cfg.train, run.proc
    log.info(
        "pre-training %s (%s, %.1fM encoder parameters, %.2f GFLOP per image) on %d images, "
        "%d process(es) on %s, steps %d to %d of %d images%s",
        cfg.model.method,
        cfg.model.arch,
        sum(p.numel() for p in run.model.encoder.parameters()) / 1e6,
        run.flops_per_image / 1e9,
        len(run.images),
        proc.world_size,
        run.device,
        run.step,
        run.total_steps,
        t.batch_size,
        f", torch.compile ({t.compile_scope})" if run.compiled else "",
    )
    monitor = Monitor(cfg, run.device) if proc.is_main else None
    purge = run.step + 1 if run.resumed else None  # TensorBoard hides the steps taken again
    metrics = MetricsLog(run.out, purge_step=purge) if proc.is_main else None
    warmup_steps = run.steps_per_epoch * t.warmup_epochs
    timer = (time.perf_counter(), run.step)  # (time, step) of the last metrics line
    once = {"setup_s": timer[0] - started}  # written with the first metrics line
    run.health.checked_step = run.step
    first_step = run.step
    order = None
    bar = progress(
        (run.total_steps - run.step) * t.batch_size, "pretrain", disable=not proc.is_main
    )
    with bar:
        while run.step < run.total_steps:
            step = run.step
            epoch, in_epoch = divmod(step, run.steps_per_epoch)
            if order is None or in_epoch == 0:
                order = epoch_order(len(run.images), t.seed, epoch).to(run.images.device)
            lr = lr_at(step, run.total_steps, warmup_steps, t.lr, t.min_lr)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            images, corruption = _batch(run, step, order)
            losses = train_step(
                run.forward,
                run.optimizer,
                images,
                micro_batch=t.micro_batch,
                mask=corruption.mask,
                eps=corruption.eps,
                amp=run.amp,
                grad_clip=t.grad_clip,
            )
            finite = losses.pop("finite")
            run.health.record(finite)
            if t.ema_every == "step":
                momentum = momentum_at(step, run.total_steps, t.momentum_start, t.momentum_end)
                run.model.update_teacher(momentum, apply=finite)
            else:  # the teacher moves at the end of the epoch, with this momentum
                momentum = momentum_at(epoch, t.epochs, t.momentum_start, t.momentum_end)
            run.step = step + 1
            bar.update(t.batch_size)
            if step == first_step and run.compiled:
                # the first step compiles: time it alone and leave it out of the throughput
                synchronize(run.device)
                now = time.perf_counter()
                once["compile_s"] = now - timer[0]
                log.info("first step (torch.compile included): %.1f s", once["compile_s"])
                timer = (now, run.step)
            if run.step % t.log_every == 0 or run.step == run.total_steps:
                skipped = run.health.check(run.step, losses, t.max_bad_steps, run.last_checkpoint)
                losses = distributed.mean_over_processes(losses, proc)
                run.last = {"step": run.step, "epoch": epoch, "lr": lr, "momentum": momentum}
                run.last.update({k: v.item() for k, v in losses.items()})  # synchronises
                now = time.perf_counter()
                if run.step > timer[1]:
                    run.last["img_per_s"] = (run.step - timer[1]) * t.batch_size / (now - timer[0])
                run.last["skipped_steps"] = skipped
                run.last["wall_s"] = now - started
                run.last.update(once)
                once = {}
                if run.device.type == "cuda":
                    run.last["peak_mem_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
                timer = (now, run.step)
                if metrics is not None:
                    metrics.write(run.last)
                bar.set_postfix(epoch=epoch, loss=f"{run.last['loss']:.4f}")
            end_of_epoch = in_epoch == run.steps_per_epoch - 1
            save_now = (
                not end_of_epoch
                and t.checkpoint_minutes
                and time.monotonic() - run.last_save > 60 * t.checkpoint_minutes
            )
            if end_of_epoch or save_now:  # never save nor move the teacher after divergence
                run.health.check(run.step, losses, t.max_bad_steps, run.last_checkpoint)
            if end_of_epoch:
                _end_of_epoch(run, epoch, started, monitor, metrics)
            elif save_now:
                _save(run, run.out / f"checkpoint-{run.step:08d}.pt")
            stop = _stop_requested(run, signals)  # after the epoch's teacher update
            if stop is not None:
                _stop(run, stop, metrics)
    checkpoint = _save(run, run.out / "last.pt")
    if proc.is_main:
        shown = eval_batch(run.images[:8], cfg.model.img_size, cfg.data.mean, cfg.data.std)
        save_denoise_figure(
            run.model,
            shown.to(run.device),
            run.out / "denoise.png",
            cfg.data.mean,
            cfg.data.std,
            generator(t.seed, run.device),
        )
        metrics.close()
    distributed.barrier(proc)
    seconds = time.perf_counter() - started
    log.info("pre-training done in %.0f s: %s", seconds, checkpoint)
    return PretrainResult(run.out, checkpoint, cfg, run.last, seconds)


def _stop_requested(run: _Run, signals: StopSignals) -> str | None:
    """The signal to stop on after this step, if any. Under torchrun the processes agree
    (one all-reduce every ``train.log_every`` steps), so they all stop at the same step."""
    if not run.proc.distributed:
        return signals.received
    if run.step % run.cfg.train.log_every:
        return None
    if distributed.any_process(signals.received is not None, run.proc, run.device):
        return signals.received or "a signal to another process"
    return None


def _stop(run: _Run, signal_name: str, metrics: MetricsLog | None) -> None:
    """Save a checkpoint at this step boundary and raise :class:`Preempted`."""
    path = _save(run, run.out / f"checkpoint-{run.step:08d}.pt")
    if metrics is not None:
        metrics.close()
    distributed.barrier(run.proc)
    error = Preempted(signal_name, run.step, str(path))
    log.warning("%s", error)
    raise error


def _end_of_epoch(
    run: _Run, epoch: int, started: float, monitor: Monitor | None, metrics: MetricsLog | None
) -> None:
    """Epoch-wise teacher update, monitoring, checkpoint and progress line."""
    t = run.cfg.train
    done = epoch + 1
    if t.ema_every == "epoch":
        run.model.update_teacher(momentum_at(epoch, t.epochs, t.momentum_start, t.momentum_end))
    elapsed = time.perf_counter() - started
    if monitor is not None and metrics is not None:
        flops = run.flops_per_image * run.step * t.batch_size
        monitor.after_epoch(run.model, done, run.step, elapsed, flops, metrics)
    due_epoch = t.checkpoint_every and done % t.checkpoint_every == 0
    due_time = t.checkpoint_minutes and time.monotonic() - run.last_save > 60 * t.checkpoint_minutes
    if (due_epoch or due_time) and done < t.epochs:
        _save(run, run.out / f"checkpoint-{run.step:08d}.pt")
    log.info(
        "epoch %d/%d: loss %.4f, %.0f img/s, %.0f s elapsed, ETA %.0f s",
        done,
        t.epochs,
        run.last.get("loss", float("nan")),
        run.last.get("img_per_s", 0.0),
        elapsed,
        elapsed / done * (t.epochs - done) if done else 0.0,
    )
