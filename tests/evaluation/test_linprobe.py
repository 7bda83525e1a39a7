import dataclasses
import importlib
import json
import shutil

import pytest
import timm.optim
import torch
from saved_results import latest_result

from dsmae.checkpoint import Checkpoint
from dsmae.cli import main
from dsmae.config import ConfigError, ProbeConfig, build_config
from dsmae.evaluation.linprobe import ProbeResult, linprobe, train_linear_probe
from dsmae.evaluation.results import evaluation_settings

# the module itself (``dsmae.evaluation`` exports its ``linprobe`` function under that name)
linprobe_module = importlib.import_module("dsmae.evaluation.linprobe")


def _probe(path, probe: ProbeConfig, seed: int = 0, random_init: bool = False) -> ProbeResult:
    """``linprobe`` of the checkpoint at ``path`` with ``probe``, on the checkpoint's data,
    seeded by ``seed``."""
    checkpoint = Checkpoint.read(path)
    changes = {"train.device": "auto", "train.seed": seed}
    cfg = build_config(base=checkpoint.config, overrides=changes)
    return linprobe(checkpoint, dataclasses.replace(cfg, probe=probe), random_init=random_init)


def test_probe_learns_separable_features_and_reports_the_last_epoch():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    labels = torch.arange(300) % 3
    feats = centres[labels] + torch.randn(300, 16, generator=g)
    probe = ProbeConfig(epochs=10, warmup_epochs=1, batch_size=32)
    top1, history = train_linear_probe(
        feats[:200], labels[:200], feats[200:], labels[200:], 3, probe
    )
    assert len(history) == 10 and top1 == history[-1]
    assert top1 > 95


def test_probe_cannot_beat_chance_on_random_labels():
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(400, 8, generator=g), torch.randint(0, 4, (400,), generator=g)
    top1, _ = train_linear_probe(
        feats[:300],
        labels[:300],
        feats[300:],
        labels[300:],
        4,
        ProbeConfig(epochs=5, warmup_epochs=1, batch_size=64),
    )
    assert top1 < 45


@pytest.fixture(scope="module")
def tiny_checkpoint(digits_run):
    return digits_run / "last.pt"


def test_linprobe_writes_json_beside_the_checkpoint(tiny_checkpoint):
    probe = ProbeConfig(epochs=3, warmup_epochs=1)
    trained = _probe(tiny_checkpoint, probe)
    baseline = _probe(tiny_checkpoint, probe, random_init=True)
    saved = latest_result(tiny_checkpoint.parent, "last.linprobe")
    assert saved["top1"] == trained.top1 and saved["num_test"] == 449 and not saved["random_init"]
    assert saved["recipe"] == "fast"
    assert saved["settings"] == evaluation_settings(probe, "digits")
    assert "after_pretrain" not in saved["settings"]
    saved = json.loads(tiny_checkpoint.with_name("last.linprobe-random-init.json").read_text())
    assert saved["random_init"] and saved["top1"] == baseline.top1
    assert 10 < trained.top1 <= 100


@pytest.fixture
def own_checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint, so that the results written beside it stay this test's."""
    return shutil.copy(tiny_checkpoint, tmp_path / "last.pt")


@pytest.fixture
def lars_made(monkeypatch):
    """Every optimizer the probe builds as ``Lars``, recorded (still timm's LARS)."""
    made = []

    class SpyLars(timm.optim.Lars):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(linprobe_module, "Lars", SpyLars)
    return made


@pytest.fixture
def encoder_seen(monkeypatch):
    """The encoder the probe loads, a copy of its weights then, and every input (B, C, H, W)
    it is given."""
    seen = {"inputs": []}
    real = Checkpoint.encoder

    def spy(*args, **kwargs):
        encoder = real(*args, **kwargs)
        seen["encoder"] = encoder
        seen["weights"] = {k: v.clone() for k, v in encoder.state_dict().items()}
        forward = encoder.forward_features

        def record(x):
            seen["inputs"].append(x.detach().clone())
            return forward(x)

        encoder.forward_features = record
        return encoder

    monkeypatch.setattr(Checkpoint, "encoder", spy)
    return seen


def test_mae_recipe_writes_its_result_and_settings(own_checkpoint, lars_made):
    probe = ProbeConfig(epochs=2, warmup_epochs=1, batch_size=128, recipe="mae")
    result = _probe(own_checkpoint, probe)
    saved = latest_result(own_checkpoint.parent, "last.linprobe")
    assert saved["recipe"] == "mae" and saved["pool"] == "avg" and saved["epochs"] == 2
    assert saved["settings"] == evaluation_settings(probe, "digits")
    assert "after_pretrain" not in saved["settings"]
    assert saved["top1"] == result.top1 and 0 <= result.top1 <= 100
    assert saved["num_train"] == 1348 and saved["num_test"] == 449
    assert 1 <= saved["best_epoch"] <= 2 and saved["best_top1"] >= saved["top1"]
    (lars,) = lars_made
    assert isinstance(lars, timm.optim.Lars)
    assert lars.defaults["lr"] == pytest.approx(0.1 * 128 / 256)
    assert lars.defaults["momentum"] == 0.9
    weight, bias = lars.param_groups
    assert weight["always_adapt"] and weight["params"][0].dim() == 2
    assert bias["params"][0].dim() == 1 and bias["weight_decay"] == 0


def test_mae_recipe_augments_every_epoch_and_keeps_the_encoder_frozen(own_checkpoint, encoder_seen):
    probe = ProbeConfig(epochs=2, warmup_epochs=1, batch_size=2048, recipe="mae", pool="cls")
    result = _probe(own_checkpoint, probe)
    assert result.pool == "cls" and result.recipe == "mae"
    # the batch holds the whole train split: one step, one encoder call per epoch
    train = [x for x in encoder_seen["inputs"] if len(x) == result.num_train]
    assert len(train) == 2 and train[0].shape[-1] == 8

    def signature(x):  # per-image sums, sorted: blind to the order of the images
        return x.flatten(1).sum(dim=1).sort().values

    assert not torch.allclose(signature(train[0]), signature(train[1]))
    encoder = encoder_seen["encoder"]
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, encoder_seen["weights"][name]), name


def test_mae_recipe_is_repeatable_from_its_seed(own_checkpoint):
    probe = ProbeConfig(epochs=2, warmup_epochs=1, batch_size=256, recipe="mae")
    first = _probe(own_checkpoint, probe, seed=3)
    again = _probe(own_checkpoint, probe, seed=3)
    assert (first.top1, first.best_top1) == (again.top1, again.best_top1)


def test_unknown_recipe_is_refused(own_checkpoint):
    checkpoint = Checkpoint.read(own_checkpoint)
    with pytest.raises(ConfigError, match=r"probe\.recipe"):
        build_config(base=checkpoint.config, overrides={"probe.recipe": "sgd"})
    sgd = dataclasses.replace(checkpoint.config.probe, recipe="sgd")  # not built: not validated
    with pytest.raises(ConfigError, match=r"probe\.recipe='sgd' is not one of: fast, mae"):
        linprobe(checkpoint, dataclasses.replace(checkpoint.config, probe=sgd))


def test_recipe_flag_reaches_the_probe(own_checkpoint, lars_made, capsys):
    args = ["linprobe", "--checkpoint", str(own_checkpoint), "--epochs", "1"]
    assert main([*args, "--batch-size", "256", "--recipe", "mae"]) == 0
    assert "[mae recipe]" in capsys.readouterr().out
    saved = latest_result(own_checkpoint.parent, "last.linprobe")
    assert saved["recipe"] == "mae" and saved["settings"]["recipe"] == "mae"
    assert saved["settings"]["batch_size"] == 256 and len(lars_made) == 1
