"""Setting a pre-training run up: the processes joined, the output folder locked and
claimed, where it starts (a checkpoint to resume, or none), the data set in memory or a
stream of shards, the model and optimizer (restored where resumed), and the step as the
run takes it: DDP-wrapped under ``torchrun``, compiled where ``train.compile`` says.
``dsmae bench`` builds its step here too (:func:`build_training_model`,
:func:`build_optimizer`, :func:`training_step`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay

from dsmae import distributed
from dsmae.checkpoint import load_weights
from dsmae.config import Config, ConfigError, TrainConfig, fill_data_stats
from dsmae.data.pipeline import channel_stats, eval_batch, load_split
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
from dsmae.models import PretrainModel, build_model
from dsmae.models.precision import fast_norms, keep_residual_in_autocast_dtype
from dsmae.pretrain.resume import ResumePoint, resume_point
from dsmae.pretrain.run_folder import cut_metrics, lock_folder, start_run
from dsmae.pretrain.schedule import Schedule
from dsmae.pretrain.state import Run, images_per_epoch
from dsmae.pretrain.step import Batches, PretrainStep
from dsmae.runtime import check_step_settings, compile_model, use_compile
from dsmae.writes import atomic_write_text, unwritable_reason

log = logging.getLogger(__name__)


def set_up(cfg: Config, resume: str | None, force: bool, overwrite: bool) -> Run:
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
) -> Run:
    """The run from where it starts (:func:`~dsmae.pretrain.resume.resume_point`): the
    folder claimed, the data loaded, the model and optimizer built (and restored), the
    step built, ``config.yaml`` written."""
    out = Path(cfg.out)
    start = resume_point(cfg, out, resume, force)
    _check_stream_resume(start, proc, force)
    if start.state is not None:
        log.info("resuming from %s at step %d", start.path, start.step)
    elif resume is not None:
        log.info("no checkpoint in %s: starting from scratch", out)
    run_id = start.run_id
    if proc.is_main:
        run_id = start_run(out, overwrite, run_id, resume)
        if start.state is not None:
            cut_metrics(out, start.step)
    stream, images, cfg = _pretraining_data(start.cfg, proc, device)
    model, optimizer = _model_and_optimizer(cfg, device, start)
    sample = eval_batch(images[:2], cfg.model.img_size, cfg.data.mean, cfg.data.std).to(device)
    flops = train_flops_per_image(model, sample)
    images = _placed(images, cfg.train, device)
    batches = Batches(images, cfg, distributed.local_share(cfg.train.batch_size, proc), stream)
    steps_per_epoch = images_per_epoch(cfg, images, stream) // cfg.train.batch_size
    step, compiled = training_step(cfg, model, optimizer, proc, device, steps_per_epoch)
    if proc.is_main:
        atomic_write_text(out / "config.yaml", cfg.to_yaml(), "config")
    return Run(
        cfg=cfg,
        proc=proc,
        device=device,
        images=images,
        batches=batches,
        model=model,
        optimizer=optimizer,
        take_step=step,
        flops_per_image=flops,
        compiled=compiled,
        run_id=run_id or "",
        start=start,
        stream=stream,
    )


def training_step(
    cfg: Config,
    model: PretrainModel,
    optimizer: torch.optim.Optimizer,
    proc: distributed.Process,
    device: torch.device,
    steps_per_epoch: int,
) -> tuple[PretrainStep, bool]:
    """The step of a run of ``steps_per_epoch`` steps an epoch, and whether it is
    compiled: ``model`` DDP-wrapped under torchrun, then compiled where ``train.compile``
    says (:func:`~dsmae.runtime.compile_model`)."""
    forward = distributed.wrap(model, proc, device)
    compiled = use_compile(device, cfg.train.compile)
    if compiled:
        forward = compile_model(forward, cfg.train)
    schedule = Schedule(cfg.train, steps_per_epoch)
    share = distributed.local_share(cfg.train.batch_size, proc)
    return PretrainStep(model, forward, optimizer, cfg, schedule, device, share), compiled


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
