import dataclasses

import pytest
import yaml

from dsmae.config import (
    Config,
    ConfigError,
    available_presets,
    build_config,
    config_from_dict,
    parse_assignment,
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


def test_layers_apply_in_order(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("train:\n  epochs: 7\n  base_lr: 1e-3\nmodel:\n  lam: 0.3\n")
    cfg = build_config("quickstart", [user], {"model.lam": 0.5})
    assert cfg.data.source == "digits"  # from the preset
    assert cfg.train.epochs == 7 and cfg.train.base_lr == 1e-3  # from the file ("1e-3" is str)
    assert cfg.model.lam == 0.5  # the override wins


def test_resolved_config_round_trips_through_yaml():
    cfg = build_config("quickstart")
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_presets_are_listed_and_unknown_ones_refused():
    assert "quickstart" in available_presets()
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*quickstart"):
        build_config("nope")


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


def test_unknown_key_in_a_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  noise_raito: 0.8\n")
    with pytest.raises(ConfigError, match=r"model\.noise_raito"):
        build_config(files=[bad])


def test_parse_assignment():
    assert parse_assignment("train.epochs=100") == ("train.epochs", 100)
    assert parse_assignment("data.crop_scale=[0.3, 1.0]") == ("data.crop_scale", [0.3, 1.0])
    with pytest.raises(ConfigError):
        parse_assignment("train.epochs")


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


def test_only_empty_output_folders_are_refused_outside_the_sections():
    with pytest.raises(ConfigError, match="out: must name a folder"):
        build_config(overrides={"out": "  "})


def test_a_probe_after_pretraining_on_shards_is_refused_before_any_work():
    shards = {"data.source": "shards/train-{000000..000009}.tar", "data.samples_per_epoch": 64}
    with pytest.raises(ConfigError, match=r"probe\.after_pretrain: .* stream of WebDataset shards"):
        build_config(overrides={**shards, "probe.after_pretrain": True})
    assert not build_config(overrides=shards).probe.after_pretrain  # the default is fine


# ----------------------------------------------------------------- resolved values follow


def _saved(tmp_path, cfg: Config) -> str:
    """``cfg`` saved as a run saves it (``config.yaml``: every value resolved)."""
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    return str(path)


def test_a_saved_configs_lr_follows_a_new_batch_and_base_lr(tmp_path):
    quickstart = build_config("quickstart")  # batch 64, base_lr 8e-3 -> lr 2e-3
    saved = _saved(tmp_path, quickstart)
    cfg = build_config(files=[saved], overrides={"train.batch_size": 128, "train.base_lr": 0.01})
    assert cfg.train.lr == 0.01 * 128 / 256 and cfg.train.micro_batch == 128
    assert build_config(files=[saved], overrides={"train.batch_size": 32}).train.lr == (
        quickstart.train.base_lr * 32 / 256
    )
    unchanged = build_config(files=[saved])
    assert unchanged == build_config("quickstart")  # a saved config gives back its run's


def test_a_base_lr_that_would_change_nothing_is_refused_with_the_reason(tmp_path):
    # an lr of the user's own: not the quickstart's derived 8e-3 * 64 / 256 = 0.002
    own_lr = _saved(tmp_path, build_config("quickstart", overrides={"train.lr": 0.004}))
    with pytest.raises(ConfigError, match=r"train\.base_lr: changing it does nothing while "
                       r"train\.lr=0\.004 is set") as refused:  # fmt: skip
        build_config(files=[own_lr], overrides={"train.base_lr": 0.01})
    assert refused.value.key == "train.base_lr"
    # the user's own lr stays with a new batch; and can be derived again on request
    assert build_config(files=[own_lr], overrides={"train.batch_size": 32}).train.lr == 0.004
    again = build_config(files=[own_lr], overrides={"train.base_lr": 0.01, "train.lr": None})
    assert again.train.lr == 0.01 * 64 / 256


def test_the_model_a_saved_config_derives_follows_a_new_arch_and_method(tmp_path):
    saved = _saved(tmp_path, build_config())  # vit_tiny, dsmae
    small = build_config(files=[saved], overrides={"model.arch": "vit_small"})
    m = small.model
    assert (m.depth, m.embed_dim, m.num_heads, m.decoder_dim, m.decoder_heads) == (
        12, 384, 6, 384, 6,
    )  # fmt: skip
    assert build_config(files=[saved], overrides={"model.method": "mae"}).model.noise_ratio == 0.75
    custom = _saved(tmp_path, build_config(overrides={"model.decoder_dim": 96}))  # the user's
    assert (
        build_config(files=[custom], overrides={"model.arch": "vit_small"}).model.decoder_dim == 96
    )


def test_the_measured_normalisation_is_measured_again_on_new_data(tmp_path):
    saved = _saved(tmp_path, build_config("quickstart", overrides={"data.mean": [0.3],
                                                                   "data.std": [0.4]}))  # fmt: skip
    assert build_config(files=[saved]).data.mean == [0.3]
    for change in ({"data.subset": 100}, {"data.source": str(tmp_path)}):
        moved = build_config(files=[saved], overrides=change)
        assert (moved.data.mean, moved.data.std) == (None, None)  # measured when the run starts
    kept = build_config(files=[saved], overrides={"data.subset": 100, "data.mean": [0.5]})
    assert (kept.data.mean, kept.data.std) == ([0.5], None)


def test_a_checkpoints_finetune_lr_follows_its_base_lr_and_batch():
    cfg = build_config("quickstart")  # as a checkpoint holds it: finetune.lr resolved
    assert cfg.finetune.lr == 1e-3 * 128 / 256
    changed = build_config(overrides={"finetune.base_lr": 0.5}, base=cfg)
    assert (changed.finetune.base_lr, changed.finetune.lr) == (0.5, 0.5 * 128 / 256)
    halved = build_config(overrides={"finetune.batch_size": 64}, base=cfg)
    assert halved.finetune.lr == 1e-3 * 64 / 256
    assert build_config(overrides={"data.source": "cifar10"}, base=cfg).data.mean == cfg.data.mean
    for key in ("finetune.base_lr", "train.base_lr", "probe.base_lr"):
        with pytest.raises(ConfigError, match=rf"{key}: must be positive, got -0.5"):
            build_config(overrides={key: -0.5}, base=cfg)
