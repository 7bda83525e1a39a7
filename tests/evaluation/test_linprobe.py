import json

import pytest
import torch

from dsmae.config import ProbeConfig
from dsmae.evaluation.frozen import extract_features
from dsmae.evaluation.linprobe import linprobe, train_linear_probe
from dsmae.export import encoder_from_checkpoint


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


def test_features_are_frozen_encoder_outputs(tiny_checkpoint):
    encoder, cfg = encoder_from_checkpoint(tiny_checkpoint)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    size = cfg.model.img_size
    token = extract_features(encoder, images, size=size, mean=cfg.data.mean, std=cfg.data.std)
    avg = extract_features(
        encoder, images, size=size, mean=cfg.data.mean, std=cfg.data.std, pool="avg", batch_size=2
    )
    assert token.shape == avg.shape == (5, 32) and not torch.allclose(token, avg)


def test_linprobe_writes_json_beside_the_checkpoint(tiny_checkpoint):
    probe = ProbeConfig(epochs=3, warmup_epochs=1)
    trained = linprobe(tiny_checkpoint, probe=probe)
    baseline = linprobe(tiny_checkpoint, probe=probe, random_init=True)
    saved = json.loads(tiny_checkpoint.with_name("last.linprobe.json").read_text())
    assert saved["top1"] == trained.top1 and saved["num_test"] == 449 and not saved["random_init"]
    saved = json.loads(tiny_checkpoint.with_name("last.linprobe-random-init.json").read_text())
    assert saved["random_init"] and saved["top1"] == baseline.top1
    assert 10 < trained.top1 <= 100


def test_random_init_ignores_the_weights_but_keeps_the_architecture(tiny_checkpoint):
    trained, _ = encoder_from_checkpoint(tiny_checkpoint)
    fresh, _ = encoder_from_checkpoint(tiny_checkpoint, random_init=True)
    assert trained.state_dict().keys() == fresh.state_dict().keys()
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(trained.state_dict()[w], fresh.state_dict()[w])
