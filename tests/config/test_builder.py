"""The config builder: layers applied in order, values derived from others following them,
an architecture named over a preset giving its own shape."""

import logging

import pytest

from dsmae.cli import main
from dsmae.config import (
    Config,
    ConfigError,
    build_config,
)


def test_an_arch_over_a_preset_gives_that_architectures_shape(caplog, capsys):
    caplog.set_level(logging.WARNING, logger="dsmae.config.builder")
    m = build_config("quickstart", overrides={"model.arch": "vit_small"}).model
    assert (m.depth, m.embed_dim, m.num_heads, m.decoder_dim) == (12, 384, 6, 384)
    assert "model.arch=vit_small gives its own shape (depth 12, width 384, 6 heads)" in caplog.text
    assert "in place of model.depth=4, model.embed_dim=96 of an earlier layer" in caplog.text
    # what the same layer sets stays; no warning where nothing of another layer is replaced
    m = build_config("quickstart", overrides={"model.arch": "vit_small", "model.depth": 4}).model
    assert (m.depth, m.embed_dim, m.num_heads) == (4, 384, 6)
    caplog.clear()
    m = build_config(overrides={"model.arch": "vit_small"}).model
    assert (m.depth, m.embed_dim, m.num_heads) == (12, 384, 6) and not caplog.text
    # the command says the same
    assert (
        main(["pretrain", "--preset", "quickstart", "--arch", "vit_small", "--print-config"]) == 0
    )
    printed = capsys.readouterr().out
    assert "  depth: 12\n" in printed and "  embed_dim: 384\n" in printed


def test_layers_apply_in_order(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("train:\n  epochs: 7\n  base_lr: 1e-3\nmodel:\n  lam: 0.3\n")
    cfg = build_config("quickstart", [user], {"model.lam": 0.5})
    assert cfg.data.source == "digits"  # from the preset
    assert cfg.train.epochs == 7 and cfg.train.base_lr == 1e-3  # from the file ("1e-3" is str)
    assert cfg.model.lam == 0.5  # the override wins


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


def _saved(tmp_path, cfg: Config) -> str:
    """``cfg`` saved as a run saves it (``config.yaml``: every value resolved)."""
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    return str(path)
