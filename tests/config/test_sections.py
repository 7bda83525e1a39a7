"""The config sections: the paper's defaults, and each section refusing its impossible
values by key."""

import dataclasses

import pytest

from dsmae.config import (
    Config,
    ConfigError,
    build_config,
)


def test_defaults_are_the_papers_cifar_setting():
    cfg = build_config()
    m, t = cfg.model, cfg.train
    assert (m.method, m.arch, m.img_size, m.patch_size) == ("dsmae", "vit_tiny", 32, 2)
    assert (m.depth, m.embed_dim, m.num_heads, m.mlp_ratio) == (12, 192, 3, 4.0)
    assert (m.noise_ratio, m.lam, m.decoder_depth, m.regressor_depth) == (0.9, 0.6, 4, 2)
    assert (m.decoder_dim, m.decoder_heads) == (192, 3)
    assert (t.batch_size, t.epochs, t.warmup_epochs, t.base_lr) == (2048, 500, 20, 1.5e-4)
    assert t.lr == pytest.approx(1.5e-4 * 2048 / 256)
    assert (t.betas, t.weight_decay, t.momentum_start, t.momentum_end) == (
        [0.9, 0.95],
        0.05,
        0.96,
        0.99,
    )
    assert cfg.data.crop_scale == [0.2, 1.0] and cfg.data.hflip


def test_mae_defaults_to_masking_three_quarters():
    assert build_config(overrides={"model.method": "mae"}).model.noise_ratio == 0.75


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"train.epoch": 3}, "train.epoch"),
        ({"trainer.epochs": 3}, "trainer"),
        ({"model.patch_size": 5}, "model.patch_size"),
        ({"model.noise_ratio": 0}, "model.noise_ratio"),
        ({"model.noise_ratio": 1.01}, "model.noise_ratio"),
        ({"model.lam": -0.1}, "model.lam"),
        ({"train.momentum_end": 1.0}, "train.momentum_end"),
        ({"model.method": "simclr"}, "model.method"),
        ({"model.arch": "vit_giant"}, "model.arch"),
        ({"model.in_chans": 2}, "model.in_chans"),
        ({"train.epochs": "many"}, "train.epochs"),
        ({"train.micro_batch": 3}, "train.micro_batch"),
        ({"train.ema_every": "hour"}, "train.ema_every"),
        ({"model.noise_mode": "blur"}, "model.noise_mode"),
        ({"data.crop_scale": [0.5, 0.2]}, "data.crop_scale"),
        ({"probe.pool": "max"}, "probe.pool"),
        ({"model.img_size": 30, "model.patch_size": 4}, "model.patch_size"),
        ({"model.lam": 1.5}, "model.lam"),
        ({"train.momentum_start": -0.1}, "train.momentum_start"),
        ({"train.grad_clip": -1}, "train.grad_clip"),
        ({"train.max_bad_steps": -1}, "train.max_bad_steps"),
        ({"data.source": ".", "data.download": True}, "data.download"),
    ],
)
def test_impossible_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(overrides=overrides)


@pytest.mark.parametrize(
    "overrides,allowed",
    [
        ({"model.method": "simclr"}, "dsmae, dsmae-ly, dsmae-lz, mae"),
        ({"model.arch": "vit_giant"}, "vit_tiny, vit_small, vit_base"),
        ({"model.noise_ratio": 0}, "(0, 1]"),
        ({"model.lam": 1.5}, "[0, 1]"),
        ({"train.momentum_end": 1.0}, "[0, 1)"),
        ({"model.img_size": 30, "model.patch_size": 4}, "does not divide model.img_size=30"),
    ],
)
def test_refusals_say_what_is_allowed(overrides, allowed):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=overrides)
    assert allowed in str(err.value)


def test_config_dataclass_defaults_need_no_resolution_to_serialise():
    assert "model" in Config().to_dict()


def test_each_section_validates_itself():
    cfg = build_config()
    cfg.model.validate()
    cfg.train.validate(world_size=1)
    with pytest.raises(ConfigError, match=r"train\.micro_batch: must divide the per-device batch"):
        cfg.train.validate(world_size=2)  # micro_batch 2048 of a per-device 1024
    with pytest.raises(ConfigError, match=r"finetune\.batch_size: .* 2 x 3 processes"):
        cfg.finetune.validate(world_size=3)
    with pytest.raises(ConfigError, match=r"data\.mean: needs one value per channel \(1\)"):
        dataclasses.replace(cfg.data, mean=[0.5, 0.5, 0.5]).validate(in_chans=1)
    with pytest.raises(ConfigError, match=r"monitor\.knn_k: must be >= 1, got 0"):
        dataclasses.replace(cfg.monitor, knn_k=0).validate()
    with pytest.raises(ConfigError, match=r"probe\.recipe='slow' is not one of: fast, mae"):
        dataclasses.replace(cfg.probe, recipe="slow").validate()
