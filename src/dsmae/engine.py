"""The pre-training engine (SPEC section 5): AdamW, warm-up + cosine learning rate, the
teacher's momentum schedule, gradient accumulation, bf16 autocast on GPU, metrics,
monitoring, checkpoints and exact resume (:mod:`dsmae.resume`), on one process or many
under ``torchrun``.

Every random choice of a step (crop boxes, flips, noise mask, noise) is drawn for the
GLOBAL batch from a generator seeded by ``(seed, step)``, and the data order of an
epoch depends only on ``(seed, epoch)``. So a run resumed from any step, or run on
another number of processes with the same global batch, takes the same steps. A stream
of WebDataset shards (:mod:`dsmae.data.shards`) replaces only where the uint8 images of a
step come from; its own resume guarantee is stated there.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dsmae import distributed
from dsmae.budget import epochs_in_budget, parse_duration
from dsmae.checkpoint import load_weights, save_checkpoint
from dsmae.config import Config, ConfigError, TrainConfig, fill_data_stats
from dsmae.data.augment import crop_boxes, random_flips
from dsmae.data.pipeline import augmented_batch, channel_stats, epoch_order, eval_batch, load_split
from dsmae.data.shards import (
    PREVIEW_IMAGES,
    STATS_IMAGES,
    STATS_SHARDS,
    ShardStream,
    open_stream,
    stream_layout,
)
from dsmae.data.sources import is_shard_source
from dsmae.flops import train_flops_per_image
from dsmae.metrics import MetricsLog
from dsmae.models import PretrainModel, build_model
from dsmae.models.precision import fast_norms, keep_residual_in_autocast_dtype
from dsmae.monitor import Monitor
from dsmae.preemption import Preempted, StopSignals
from dsmae.resume import ResumePoint, resume_point
from dsmae.run_folder import (
    cut_metrics,
    lock_folder,
    move_aside_if_foreign,
    prune_checkpoints,
    start_run,
)
from dsmae.runtime import (
    attention_kernel,
    autocast,
    check_step_settings,
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
from dsmae.writes import WriteError, atomic_write_text, unwritable_reason

log = logging.getLogger(__name__)


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
    stop_requested: str | None = None  # a stop signal that came while the run was ending


def build_optimizer(
    model: PretrainModel, train: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
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


def draw_step(model: PretrainModel, cfg: Config, step: int, device: torch.device) -> Corruption:
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
    attention: str = "auto",
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch, in micro-batches of ``micro_batch`` images
    (:func:`_accumulate_gradients`). The teacher is NOT updated here.

    Args:
        model: a pre-training model, possibly wrapped in DistributedDataParallel or compiled.
        images: (B, C, H, W) augmented, normalised, on the model's device.
        mask, eps: the corruption of these images (see ``PretrainModel.sample_corruption``);
            drawn from ``generator`` inside the model when None.
        amp: bf16 autocast of the forward passes.
        grad_clip: clip the gradient norm to this value (0: no clipping).
        attention: the attention kernel of the forward passes (``train.attention``).

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
    optimizer.zero_grad(set_to_none=True)
    with attention_kernel(attention):
        totals = _accumulate_gradients(model, images, micro_batch, mask, eps, generator, amp)
    params = [p for p in model.parameters() if p.grad is not None]
    totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    totals["finite"] = torch.isfinite(totals["grad_norm"])
    step_unless_non_finite(optimizer, totals["finite"])
    return totals


def _accumulate_gradients(
    model: torch.nn.Module,
    images: torch.Tensor,
    micro_batch: int,
    mask: torch.Tensor | None,
    eps: torch.Tensor | None,
    generator: torch.Generator | None,
    amp: bool,
) -> dict[str, torch.Tensor]:
    """Forward and backward of ``images`` ((B, C, H, W)) in micro-batches of
    ``micro_batch``, adding to the gradients (see :func:`train_step` for the arguments).

    Every micro-batch loss is a mean over the same number of tokens, divided by the number
    of micro-batches, so the accumulated gradient equals the full batch's. Under
    DistributedDataParallel, gradients are all-reduced once, on the last micro-batch.

    Returns:
        the batch's mean ``loss`` (and ``loss_y``/``loss_z``), detached 0-d tensors.
    """
    chunks = range(0, images.shape[0], micro_batch)
    accum = len(chunks)
    totals: dict[str, torch.Tensor] = {}
    for i, start in enumerate(chunks):
        part = slice(start, start + micro_batch)
        sync = contextlib.nullcontext()
        if isinstance(model, DistributedDataParallel) and i < accum - 1:
            sync = model.no_sync()
        with sync:  # no all-reduce until the last micro-batch's backward
            with autocast(images.device, amp):
                part_mask = None if mask is None else mask[part]
                part_eps = None if eps is None else eps[part]
                out = model(images[part], generator=generator, mask=part_mask, eps=part_eps)
            (out.loss / accum).backward()
        for name in ("loss", "loss_y", "loss_z"):
            value = getattr(out, name)
            if value is not None:
                totals[name] = totals.get(name, 0) + value.detach().float() / accum
    return totals


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
    return augment_batch(images[idx], corruption, size, mean, std)


def augment_batch(
    uint8: torch.Tensor,
    corruption: Corruption,
    size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """``uint8`` ((B, C, H, W), any device) moved to the device of ``corruption``, cropped
    and flipped as it says, resized to ``size`` and normalised by ``mean``/``std`` ((C,)):
    (B, C, size, size) float32."""
    uint8 = uint8.to(corruption.boxes.device, non_blocking=True)
    return augmented_batch(uint8, size, corruption.boxes, corruption.flips, mean, std)


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
    device: torch.device
    images: torch.Tensor  # (N, C, H, W) uint8, the pre-training split (a stream: a few of it)
    model: PretrainModel
    forward: torch.nn.Module  # the model as trained: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    flops_per_image: float
    compiled: bool
    run_id: str  # this run's, recorded in its checkpoints ("" on ranks that write nothing)
    start: dataclasses.InitVar[ResumePoint]  # sets resumed, step and last_checkpoint
    stream: ShardStream | None = None  # where the images come from, for a source of shards
    lock: Any = None  # the open lock file of the output folder (rank 0)
    monitor: Monitor | None = None  # made early where a time budget timed it (rank 0)
    last: dict[str, Any] = dataclasses.field(default_factory=dict)  # last metrics line
    last_save: float = dataclasses.field(default_factory=time.monotonic)
    resumed: bool = dataclasses.field(init=False)
    step: int = dataclasses.field(init=False)
    last_checkpoint: Path | None = dataclasses.field(init=False)  # newest written or resumed
    amp: bool = dataclasses.field(init=False)
    mean: torch.Tensor = dataclasses.field(init=False)  # (C,) normalisation, on the device
    std: torch.Tensor = dataclasses.field(init=False)
    health: StepHealth = dataclasses.field(init=False)

    def __post_init__(self, start: ResumePoint) -> None:
        self.resumed = start.state is not None
        self.step = start.step
        self.last_checkpoint = start.path
        self.amp = use_amp(self.device, self.cfg.train.amp)
        self.mean = torch.tensor(self.cfg.data.mean, device=self.device)
        self.std = torch.tensor(self.cfg.data.std, device=self.device)
        self.health = StepHealth(self.device)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def epoch_images(self) -> int:
        """The images of one epoch: the data set's, or ``data.samples_per_epoch`` of a stream."""
        per_epoch = self.cfg.data.samples_per_epoch
        return len(self.images) if self.stream is None or per_epoch is None else per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_images // self.cfg.train.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs


def _setup(cfg: Config, resume: str | None, force: bool, overwrite: bool) -> _Run:
    """Join the processes, lock the output folder, load the data, build the model,
    restore a checkpoint."""
    out = Path(cfg.out)
    proc, device = distributed.setup(cfg.train.device, cfg.train.dist_timeout_minutes)
    check_step_settings(device, cfg.train)  # before the folder is touched
    lock = None
    if proc.is_main:
        check_writable(out)
        lock = lock_folder(out)
    try:
        run = _build_run(cfg, resume, force, overwrite, proc, device)
    except BaseException:
        if lock is not None:
            lock.close()  # releases the folder
        raise
    run.lock = lock
    return run


def _build_run(
    cfg: Config,
    resume: str | None,
    force: bool,
    overwrite: bool,
    proc: distributed.Process,
    device: torch.device,
) -> _Run:
    """The run from where it starts (:func:`~dsmae.resume.resume_point`): the folder
    claimed, the data loaded, the model and optimizer built (and restored), the forward
    wrapped, ``config.yaml`` written."""
    out = Path(cfg.out)
    start = resume_point(cfg, out, resume, force)
    _check_stream_resume(start, proc, force)
    if start.state is not None:
        log.info("resuming from %s at step %d", start.path, start.step)
    elif resume is not None:
        log.info("no checkpoint in %s: starting from scratch", out)
    run_id = start.run_id
    if proc.is_main:
        run_id = start_run(out, overwrite, run_id)
        if start.state is not None:
            cut_metrics(out, start.step)
    stream, images, cfg = _pretraining_data(start.cfg, proc, device)
    model, optimizer = _model_and_optimizer(cfg, device, start)
    sample = eval_batch(images[:2], cfg.model.img_size, cfg.data.mean, cfg.data.std).to(device)
    flops = train_flops_per_image(model, sample)
    forward = distributed.wrap(model, proc, device)
    compiled = use_compile(device, cfg.train.compile)
    if compiled:
        forward = compile_model(forward, cfg.train)
    images = _placed(images, cfg.train, device)
    if proc.is_main:
        atomic_write_text(out / "config.yaml", cfg.to_yaml(), "config")
    run_id = run_id or ""
    return _Run(
        cfg, proc, device, images, model, forward, optimizer, flops, compiled, run_id, start, stream
    )


def _pretraining_data(
    cfg: Config, proc: distributed.Process, device: torch.device
) -> tuple[ShardStream | None, torch.Tensor, Config]:
    """Where the pre-training images come from: the data set in memory (no stream), or this
    process's stream of shards and a few of its images (for the FLOP count and the
    figure); and ``cfg`` with the normalisation measured where it is unset."""
    if not is_shard_source(cfg.data.source):
        if cfg.data.samples_per_epoch is not None:
            log.warning("data.samples_per_epoch ignored: an epoch is all of %s", cfg.data.source)
        return None, *_pretraining_images(cfg)
    stream = open_stream(cfg, proc.rank, proc.world_size, pin_memory=device.type == "cuda")
    if cfg.data.mean is not None and cfg.data.std is not None:
        return stream, stream.sample_images(PREVIEW_IMAGES), cfg
    sample = stream.sample_images(STATS_IMAGES, STATS_SHARDS)
    cfg = resolve_data_stats(cfg, sample)
    log.info(
        "data.mean %s and data.std %s measured on %d images, the first of %d shards spread "
        "over the list (set both to skip this)",
        [round(v, 4) for v in cfg.data.mean],
        [round(v, 4) for v in cfg.data.std],
        len(sample),
        min(STATS_SHARDS, len(stream.urls)),
    )
    return stream, sample[:PREVIEW_IMAGES], cfg


def _check_stream_resume(start: ResumePoint, proc: distributed.Process, force: bool) -> None:
    """A stream resumed in the middle of an epoch continues exactly when its shards are
    dealt as in the checkpoint's run (:mod:`dsmae.data.shards`); dealt otherwise (another
    number of processes), the rest of that epoch could repeat or leave out any of its
    images, so that is refused unless ``force``.

    Raises:
        ConfigError: naming both layouts and what to do.
    """
    cfg = start.cfg
    if start.state is None or not is_shard_source(cfg.data.source):
        return
    steps_per_epoch = max(1, (cfg.data.samples_per_epoch or 0) // cfg.train.batch_size)
    epoch, in_epoch = divmod(start.step, steps_per_epoch)
    saved, now = start.state.get("stream"), stream_layout(proc.world_size, cfg.data.workers)
    if in_epoch == 0 or saved == now:
        if in_epoch:
            log.info("the stream of epoch %d continues exactly at its step %d", epoch, in_epoch)
        return
    where = f"step {in_epoch} of epoch {epoch} of a stream dealt over {_layout(saved)}"
    if not force:
        raise ConfigError(
            f"{start.path} stopped at {where}; continuing it over {_layout(now)} could repeat "
            "or leave out any images of that epoch: resume with as many processes and the "
            "same data.workers, or add --force"
        )
    log.warning(
        "%s stopped at %s; its rest is dealt anew over %s (--force): it may repeat or leave "
        "out images of that epoch",
        start.path,
        where,
        _layout(now),
    )


def _layout(layout: dict[str, int] | None) -> str:
    """How a stream is dealt, in words."""
    if layout is None:
        return "an unknown layout"
    return f"{layout['processes']} process(es) with data.workers={layout['workers']}"


def _pretraining_images(cfg: Config) -> tuple[torch.Tensor, Config]:
    """The pre-training images ((N, C, H, W) uint8) and ``cfg`` with the normalisation
    measured on them where it is unset.

    Raises:
        ConfigError: fewer images than one batch.
    """
    t = cfg.train
    images = load_split(cfg.data, cfg.model, "pretrain").images
    if len(images) // t.batch_size == 0:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is larger than the {len(images)} pre-training images"
        )
    return images, resolve_data_stats(cfg, images)


def resolve_data_stats(cfg: Config, images: torch.Tensor) -> Config:
    """Fill ``data.mean``/``data.std`` from the pre-training images where they are None."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return cfg
    return fill_data_stats(cfg, *channel_stats(images))


def build_training_model(cfg: Config, device: torch.device) -> PretrainModel:
    """The model of ``cfg`` as a training step runs it, in train mode on ``device``: weights
    drawn after ``torch.manual_seed(train.seed)`` (identical on every process), gradient
    checkpointing, and the precision switches (``train.fast_norm``, ``train.bf16_residual``:
    :mod:`dsmae.models.precision`)."""
    t = cfg.train
    torch.manual_seed(t.seed)
    with fast_norms(t.fast_norm):
        model = build_model(cfg.model).to(device).train()
    if t.bf16_residual:
        keep_residual_in_autocast_dtype(model)
    if t.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    return model


def _model_and_optimizer(
    cfg: Config, device: torch.device, start: ResumePoint
) -> tuple[PretrainModel, torch.optim.Optimizer]:
    """The model, initialised from ``train.seed`` (identically on every process), and its
    optimizer; both restored from the resumed checkpoint, if any."""
    model = build_training_model(cfg, device)
    optimizer = build_optimizer(model, cfg.train, device)
    if start.state is not None:
        load_weights(model, start.state["model"], str(start.path))
        optimizer.load_state_dict(start.state["optimizer"])
    return model, optimizer


def _placed(images: torch.Tensor, t: TrainConfig, device: torch.device) -> torch.Tensor:
    """The data set where the steps gather from: on the GPU (``train.data_on_device``,
    default on CUDA), else in pinned memory on a CUDA machine, else as it is."""
    on_device = t.data_on_device if t.data_on_device is not None else device.type == "cuda"
    if on_device:
        return images.to(device)
    if device.type == "cuda":
        return images.pin_memory()
    return images


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any work."""
    why = unwritable_reason(out)
    if why is not None:
        raise ConfigError(f"out={str(out)!r} is not a writable folder: {why}", "out")


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
    folder that holds another run is refused (:mod:`dsmae.run_folder`). SIGTERM, SIGINT
    and SIGUSR1 stop the run after the current step with a checkpoint
    (:mod:`dsmae.preemption`).

    Args:
        resume: a checkpoint path, or "auto" for the newest one of ``cfg.out``'s run.
        force: resume even if the checkpoint was made with other settings.
        overwrite: start a fresh run in a folder that holds another run.
        until_epoch: stop after this epoch, with its checkpoint (the result's), as a
            preemption would: the schedules stay those of ``train.epochs``, and ``resume``
            continues the run. None: run all ``train.epochs``.

    Raises:
        Preempted: stopped by a signal, after writing a checkpoint. A signal after the
            last step (while ``last.pt`` is written) lets the run end: the result's
            ``stop_requested`` names it.
    """
    started = time.perf_counter()
    if until_epoch is not None and not 1 <= until_epoch <= cfg.train.epochs:
        raise ConfigError(f"until_epoch must be in [1, train.epochs={cfg.train.epochs}]")
    run = _setup(cfg, resume, force, overwrite)
    try:
        if run.cfg.train.time_budget is not None and not run.resumed:
            _fit_budget(run, started)
        with StopSignals() as signals:
            result = _train(run, started, signals, until_epoch)
        result.stop_requested = signals.received  # after the last step: all is saved
        return result
    finally:
        if run.lock is not None:
            run.lock.close()
        distributed.teardown()


BUDGET_WARMUP_STEPS = 3  # untimed steps before the timed ones: compilation happens here
BUDGET_TIMED_STEPS = 8
BUDGET_SAVE_TEST = ".budget-save-test.pt"


def _fit_budget(run: _Run, started: float) -> None:
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
    run.cfg = dataclasses.replace(run.cfg, train=dataclasses.replace(t, epochs=epochs))
    if run.proc.is_main:
        atomic_write_text(run.out / "config.yaml", run.cfg.to_yaml(), "config")
    log.info(
        "time budget %s (%.0f s): a step takes %.4f s (timed over %d steps, then undone), an "
        "epoch about %.1f s with its checkpoints and monitors, and %.1f s have passed: "
        "train.epochs=%d (at most %d)",
        t.time_budget, budget, step_s, steps, epoch_s, elapsed, epochs, t.epochs,
    )  # fmt: skip


def _epoch_seconds(run: _Run, step_s: float, save_s: float) -> float:
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


def _agreed_epochs(run: _Run, budget: float, elapsed: float, epoch_s: float, end_s: float) -> int:
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


def _time_steps(run: _Run) -> tuple[int, float]:
    """Take the run's first steps (warm-up ones, then timed ones; teacher updates
    included) and return how many were timed and the seconds a step took."""
    total = min(BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS, run.total_steps)
    warmup = min(BUDGET_WARMUP_STEPS, total - 1)
    synchronize(run.device)
    begun = time.perf_counter()
    with contextlib.closing(_steps(run, 0, total)) as steps:
        for taken in steps:
            if taken.step == warmup - 1:  # the timed steps start after this one
                synchronize(run.device)
                begun = time.perf_counter()
    synchronize(run.device)
    return total - warmup, (time.perf_counter() - begun) / (total - warmup)


def _time_save(run: _Run) -> float:
    """Seconds one checkpoint of the run takes to write (a test file, then removed)."""
    path = run.out / BUDGET_SAVE_TEST
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}
    begun = time.perf_counter()
    try:
        save_checkpoint(path, state)
    finally:
        path.unlink(missing_ok=True)
    return time.perf_counter() - begun


def _time_monitors(run: _Run) -> dict[str, tuple[float, int]]:
    """Seconds each monitor that will run takes once, with its period in epochs
    (``monitor.knn_every``, ``monitor.images_every``); the monitor is kept for the run."""
    mon = run.cfg.monitor
    run.monitor = Monitor(run.cfg, run.device)
    timed: dict[str, tuple[float, int]] = {}
    if mon.knn_every:
        run.monitor.health_images()  # loads the splits: a cost paid once, now
        begun = time.perf_counter()
        run.monitor.knn_top1(run.model)
        run.monitor.health(run.model)
        timed["knn"] = (time.perf_counter() - begun, mon.knn_every)
    if mon.images_every:
        begun = time.perf_counter()
        run.monitor.denoising_grid(run.model)
        timed["images"] = (time.perf_counter() - begun, mon.images_every)
    return timed


def _train(
    run: _Run, started: float, signals: StopSignals, until_epoch: int | None
) -> PretrainResult:
    """The steps from ``run.step`` to the end of epoch ``until_epoch`` (None: the run's
    last), then its checkpoint (the run's last one, ``last.pt``, after the last epoch)."""
    _log_start(run)
    epochs = run.cfg.train.epochs
    stop_step = run.steps_per_epoch * min(until_epoch or epochs, epochs)
    report = _Report(run, started)
    run.health.checked_step = run.step
    # closing the steps ends a stream's readers, however the loop ends
    with report.bar, contextlib.closing(_steps(run, run.step, stop_step)) as steps:
        for taken in steps:
            run.step = taken.step + 1
            report.stepped(run, taken.step)
            losses = taken.losses
            if run.step % run.cfg.train.log_every == 0 or run.step == run.total_steps:
                losses = report.metrics_line(run, taken.epoch, taken.lr, taken.momentum, losses)
            _end_epoch_or_save(run, taken.epoch, taken.in_epoch, losses, report)
            stop = _stop_requested(run, signals)  # after the epoch's teacher update
            if stop is not None:
                _stop(run, stop, report.metrics)
    if run.step < run.total_steps:
        return _pause(run, started, report.metrics)
    return _finish(run, started, report.metrics)


@dataclass
class _Taken:
    """One optimizer step just taken (:func:`_steps`): where it is, its learning rate and
    teacher momentum, its losses (0-d tensors on the device) and whether it stepped."""

    step: int
    epoch: int
    in_epoch: int
    lr: float
    momentum: float
    losses: dict[str, torch.Tensor]
    finite: torch.Tensor


def _steps(run: _Run, first: int, stop: int) -> Generator[_Taken, None, None]:
    """Take the steps ``first`` to ``stop - 1`` one by one, each when the next is asked
    for: its epoch's batches (opened at the epoch's first step), its learning rate, the
    step and the teacher's per-step update. Closing this closes the batches."""
    batches: Generator[torch.Tensor, None, None] | None = None
    try:
        for step in range(first, stop):
            epoch, in_epoch = divmod(step, run.steps_per_epoch)
            if batches is None or in_epoch == 0:
                _close(batches)
                batches = _epoch_batches(run, epoch, in_epoch)
            lr = _set_lr(run, step)
            losses, finite = _take_step(run, step, next(batches))
            momentum = _update_teacher(run, step, epoch, finite)
            yield _Taken(step, epoch, in_epoch, lr, momentum, losses, finite)
    finally:
        _close(batches)


def _close(batches: Generator[torch.Tensor, None, None] | None) -> None:
    """Close an epoch's batches (None: none yet)."""
    if batches is not None:
        batches.close()


def _log_start(run: _Run) -> None:
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


def _set_lr(run: _Run, step: int) -> float:
    """Set the learning rate of ``step`` (warm-up, then cosine) and return it."""
    t = run.cfg.train
    warmup_steps = run.steps_per_epoch * t.warmup_epochs
    lr = lr_at(step, run.total_steps, warmup_steps, t.lr, t.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def _take_step(
    run: _Run, step: int, uint8: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Optimizer step ``step`` on this process's images of it (``uint8``, from
    :func:`_epoch_batches`): its losses (and ``grad_norm``) and whether the optimizer
    stepped (a 0-d bool, counted in ``run.health``), on the device."""
    t = run.cfg.train
    images, corruption = _batch(run, step, uint8)
    mask, eps = corruption.mask, corruption.eps
    options = {"micro_batch": t.micro_batch, "amp": run.amp, "grad_clip": t.grad_clip,
               "attention": t.attention}  # fmt: skip
    losses = train_step(run.forward, run.optimizer, images, mask=mask, eps=eps, **options)
    finite = losses.pop("finite")
    run.health.record(finite)
    return losses, finite


def _epoch_batches(run: _Run, epoch: int, start: int) -> Generator[torch.Tensor, None, None]:
    """This process's uint8 images ((b / W, C, H, W): its share of the global batch) of
    each step of ``epoch`` from its step ``start`` on: read from the stream, or gathered
    from the data set in memory by the epoch's order."""
    stop = run.steps_per_epoch
    if run.stream is not None:
        return _streamed(run.stream, epoch, start, stop)
    return _gathered(run, epoch, start, stop)


def _streamed(
    stream: ShardStream, epoch: int, start: int, stop: int
) -> Generator[torch.Tensor, None, None]:
    """The steps ``start`` to ``stop - 1`` of ``epoch`` from the stream; closing this
    ends the epoch's readers."""
    with contextlib.closing(stream.epoch(epoch, start, stop)) as batches:
        for batch in batches:
            yield batch.images


def _gathered(run: _Run, epoch: int, start: int, stop: int) -> Generator[torch.Tensor, None, None]:
    """The steps ``start`` to ``stop - 1`` of ``epoch`` in memory: this process's rows of
    each global batch of the epoch's order.

    The order lives where the images do, so with the data set on the GPU the gather, the
    augmentation and the draws never wait for the device.
    """
    order = epoch_order(len(run.images), run.cfg.train.seed, epoch).to(run.images.device)
    b = run.cfg.train.batch_size
    mine = distributed.local_share(b, run.proc)
    for step in range(start, stop):
        yield run.images[order[step * b : (step + 1) * b][mine]]


def _batch(run: _Run, step: int, uint8: torch.Tensor) -> tuple[torch.Tensor, Corruption]:
    """This process's share of the global batch of ``step`` (``uint8``), augmented on the
    device, and its corruption (drawn for the global batch, then sliced)."""
    cfg = run.cfg
    mine = distributed.local_share(cfg.train.batch_size, run.proc)
    corruption = draw_step(run.model, cfg, step, run.device)[mine]
    images = augment_batch(uint8, corruption, cfg.model.img_size, run.mean, run.std)
    return images, corruption


def _update_teacher(run: _Run, step: int, epoch: int, finite: torch.Tensor) -> float:
    """The teacher's momentum for this step's metrics line. Per step (``train.ema_every``
    "step"), the momentum of ``step``, applied now unless the step was skipped; per epoch,
    the momentum of ``epoch``, applied at its end (:func:`_end_of_epoch`)."""
    t = run.cfg.train
    if t.ema_every != "step":
        return momentum_at(epoch, t.epochs, t.momentum_start, t.momentum_end)
    momentum = momentum_at(step, run.total_steps, t.momentum_start, t.momentum_end)
    run.model.update_teacher(momentum, apply=finite)
    return momentum


class _Report:
    """Where a run reports, on rank 0: metric lines (``metrics.jsonl`` and TensorBoard),
    the monitor and the progress bar; and the clock of the metric lines."""

    def __init__(self, run: _Run, started: float) -> None:
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

    def stepped(self, run: _Run, step: int) -> None:
        """Count step ``step`` (just taken) on the bar; when it was the first and it
        compiled, time it alone and leave it out of the throughput."""
        self.bar.update(run.cfg.train.batch_size)
        if step == self.first_step and run.compiled:
            synchronize(run.device)
            now = time.perf_counter()
            self.once["compile_s"] = now - self.since[0]
            log.info("first step (torch.compile included): %.1f s", self.once["compile_s"])
            self.since = (now, run.step)

    def metrics_line(
        self, run: _Run, epoch: int, lr: float, momentum: float, losses: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check the skipped steps (:class:`StepHealth`), then write ``run.last``, the
        metrics line of ``run.step``; returns ``losses`` averaged over the processes."""
        t = run.cfg.train
        skipped = run.health.check(run.step, losses, t.max_bad_steps, run.last_checkpoint)
        losses = distributed.mean_over_processes(losses, run.proc)
        run.last = {"step": run.step, "epoch": epoch, "lr": lr, "momentum": momentum}
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


def _end_epoch_or_save(
    run: _Run, epoch: int, in_epoch: int, losses: dict[str, torch.Tensor], report: _Report
) -> None:
    """After the last step of an epoch, end it; mid-epoch, save a checkpoint when
    ``train.checkpoint_minutes`` have passed. Either only after checking the skipped steps:
    never save nor move the teacher after divergence."""
    t = run.cfg.train
    end_of_epoch = in_epoch == run.steps_per_epoch - 1
    save_now = (
        not end_of_epoch
        and t.checkpoint_minutes
        and time.monotonic() - run.last_save > 60 * t.checkpoint_minutes
    )
    if end_of_epoch or save_now:
        run.health.check(run.step, losses, t.max_bad_steps, run.last_checkpoint)
    if end_of_epoch:
        _end_of_epoch(run, epoch, report)
    elif save_now:
        _save(run, run.out / f"checkpoint-{run.step:08d}.pt")


def _end_of_epoch(run: _Run, epoch: int, report: _Report) -> None:
    """Epoch-wise teacher update, monitoring, checkpoint and progress line."""
    t = run.cfg.train
    done = epoch + 1
    if t.ema_every == "epoch":
        run.model.update_teacher(momentum_at(epoch, t.epochs, t.momentum_start, t.momentum_end))
    elapsed = time.perf_counter() - report.started
    if report.monitor is not None and report.metrics is not None:
        flops = run.flops_per_image * run.step * t.batch_size
        report.monitor.after_epoch(run.model, done, run.step, elapsed, flops, report.metrics)
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
    if run.stream is not None:
        state["stream"] = run.stream.layout
    try:
        move_aside_if_foreign(path, run.run_id)
        save_checkpoint(path, state)
    except WriteError as err:
        raise WriteError(
            f"{err}. The last good checkpoint is {run.last_checkpoint or 'none yet'}: free some "
            "space (or fix the folder) and continue with --resume auto."
        ) from None
    run.last_checkpoint = path
    prune_checkpoints(run.out, run.run_id, run.cfg.train.keep_checkpoints)
    return path


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


def _pause(run: _Run, started: float, metrics: MetricsLog | None) -> PretrainResult:
    """Stop before the run's end with the checkpoint of this step (the epoch's own, if it
    was due); ``--resume`` continues from it."""
    checkpoint = run.out / f"checkpoint-{run.step:08d}.pt"
    if run.last_checkpoint != checkpoint:
        _save(run, checkpoint)
    if metrics is not None:
        metrics.close()
    distributed.barrier(run.proc)
    log.info("stopped after step %d of %d, as asked: %s", run.step, run.total_steps, checkpoint)
    return PretrainResult(run.out, checkpoint, run.cfg, run.last, time.perf_counter() - started)


def _finish(run: _Run, started: float, metrics: MetricsLog | None) -> PretrainResult:
    """Write ``last.pt`` and (rank 0) the denoising figure of the first 8 images."""
    cfg = run.cfg
    checkpoint = _save(run, run.out / "last.pt")
    if metrics is not None:
        shown = eval_batch(run.images[:8], cfg.model.img_size, cfg.data.mean, cfg.data.std)
        figure = run.out / "denoise.png"
        rng = generator(cfg.train.seed, run.device)
        save_denoise_figure(
            run.model, shown.to(run.device), figure, cfg.data.mean, cfg.data.std, rng
        )
        metrics.close()
    distributed.barrier(run.proc)
    seconds = time.perf_counter() - started
    log.info("pre-training done in %.0f s: %s", seconds, checkpoint)
    return PretrainResult(run.out, checkpoint, cfg, run.last, seconds)
