"""A resolved configuration: every ``None`` that has a derived default filled in (the
architecture's shape, the method's noise ratio, the learning rates from their base, the
micro-batch), and every section validated; the normalisation measured on the images."""

from __future__ import annotations

import dataclasses
import os
import typing

from dsmae.config.checks import ConfigError, check_choice, require
from dsmae.config.choices import ARCHS, DEFAULT_NOISE_RATIO, METHODS
from dsmae.config.sections import Config, ModelConfig
from dsmae.schedules import scaled_lr


def world_size_from_env() -> int:
    """The number of processes of this run (torchrun's ``WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve(cfg: Config, world_size: int | None = None) -> Config:
    """Fill every ``None`` that has a derived default, then validate; returns a new Config.

    ``world_size`` (default: from the environment) sets the per-device micro-batch.
    """
    t = cfg.train
    world = world_size or world_size_from_env()
    per_device, rest = divmod(t.batch_size, world)
    if rest:
        raise ConfigError(f"train.batch_size={t.batch_size} does not split over {world} processes")
    train = dataclasses.replace(
        t,
        lr=t.lr if t.lr is not None else scaled_lr(t.base_lr, t.batch_size),
        micro_batch=t.micro_batch if t.micro_batch is not None else per_device,
    )
    f = cfg.finetune
    finetune = dataclasses.replace(
        f, lr=f.lr if f.lr is not None else scaled_lr(f.base_lr, f.batch_size)
    )
    out = dataclasses.replace(cfg, model=resolve_model(cfg.model), train=train, finetune=finetune)
    validate(out, world)
    return out


def resolve_model(m: ModelConfig) -> ModelConfig:
    """Fill the architecture's depth/width/heads, the method's noise ratio and the decoder
    width/heads where they are ``None``, then validate; returns a new ModelConfig."""
    check_choice("model.method", m.method, METHODS)
    check_choice("model.arch", m.arch, tuple(ARCHS))
    depth, width, heads = ARCHS[m.arch]
    embed_dim = m.embed_dim if m.embed_dim is not None else width
    num_heads = m.num_heads if m.num_heads is not None else heads
    m = dataclasses.replace(
        m,
        depth=m.depth if m.depth is not None else depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        noise_ratio=m.noise_ratio if m.noise_ratio is not None else DEFAULT_NOISE_RATIO[m.method],
        decoder_dim=m.decoder_dim if m.decoder_dim is not None else embed_dim,
        decoder_heads=m.decoder_heads if m.decoder_heads is not None else num_heads,
    )
    m.validate()
    return m


def fill_data_stats(
    cfg: Config, mean: typing.Sequence[float] | None, std: typing.Sequence[float] | None
) -> Config:
    """``cfg`` with ``data.mean``/``data.std`` set to ``mean``/``std`` where they are None
    (measured ones, or a checkpoint's)."""
    data = dataclasses.replace(
        cfg.data,
        mean=cfg.data.mean if cfg.data.mean is not None else mean,
        std=cfg.data.std if cfg.data.std is not None else std,
    )
    return dataclasses.replace(cfg, data=data)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Refuse impossible settings anywhere in a resolved Config, section by section."""
    cfg.model.validate()
    cfg.data.validate(cfg.model.in_chans)
    cfg.train.validate(world_size)
    require(bool(cfg.out.strip()), "out", "must name a folder, got an empty string")
    cfg.monitor.validate()
    cfg.probe.validate()
    cfg.finetune.validate(world_size)
    cfg.log.validate()
    if cfg.probe.after_pretrain:
        from dsmae.data.sources import is_shard_source  # imports torch: kept out of `--help`

        require(
            not is_shard_source(cfg.data.source),
            "probe.after_pretrain",
            f"data.source={cfg.data.source!r} is a stream of WebDataset shards, without the "
            "labelled test split a probe needs: set probe.after_pretrain=false and probe the "
            "checkpoint with dsmae linprobe --data (a data set or a labelled folder)",
        )
