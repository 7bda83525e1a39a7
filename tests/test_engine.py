import json

import pytest
import torch
from conftest import TINY

import dsmae
from dsmae.checkpoint import load_checkpoint
from dsmae.config import build_config
from dsmae.engine import build_optimizer, pretrain, train_step
from dsmae.models import DSMAE
from dsmae.schedules import lr_at, momentum_at


def _tiny_run(tmp_path, **overrides):
    base = {f"model.{k}": v for k, v in TINY.items()}
    base.update(
        {
            "model.in_chans": 1,
            "data.source": "digits",
            "data.subset": 256,
            "train.epochs": 2,
            "train.warmup_epochs": 1,
            "train.batch_size": 64,
            "train.log_every": 1,
            "train.device": "cpu",
            "out": str(tmp_path / "run"),
        }
    )
    base.update(overrides)
    return build_config(overrides=base)


def test_gradient_accumulation_equals_the_full_batch():
    # all patches corrupted with zero noise: the forward pass is deterministic
    options = dict(noise_ratio=1.0, noise_std=0.0, **TINY)
    images = torch.randn(8, 3, 16, 16)
    params = []
    losses = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = dsmae.build("dsmae", **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        losses.append(train_step(model, optimizer, images, accum_steps=accum)["loss"])
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_weight_decay_only_on_weight_matrices():
    model = dsmae.build("mae", **TINY)
    optimizer = build_optimizer(model, build_config().train, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups}
    assert "encoder.cls_token" in decay[0.0] and "decoder.mask_token" in decay[0.0]
    assert "encoder.blocks.0.norm1.weight" in decay[0.0]
    assert "encoder.blocks.0.attn.qkv.bias" in decay[0.0]
    assert "encoder.blocks.0.attn.qkv.weight" in decay[0.05]
    assert "encoder.patch_embed.proj.weight" in decay[0.05]
    trained = {n for group in decay.values() for n in group}
    assert "encoder.pos_embed" not in trained  # fixed sin-cos


def test_pretrain_writes_checkpoint_metrics_config_and_figure(tmp_path):
    cfg = _tiny_run(tmp_path, **{"train.checkpoint_every": 1})
    result = pretrain(cfg)
    out = result.out
    assert result.checkpoint == out / "last.pt"
    assert (out / "config.yaml").is_file() and (out / "denoise.png").is_file()
    assert (out / "checkpoint-epoch0001.pt").is_file()
    assert any((out / "tensorboard").iterdir())
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 8 and set(state) >= {"config", "model", "optimizer", "epoch"}
    prefixes = {k.split(".")[0] for k in state["model"]}
    assert prefixes == {"encoder", "teacher", "decoder", "regressor"}
    assert state["config"]["data"]["mean"] is not None  # measured and recorded
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    keys = {"step", "epoch", "lr", "momentum", "loss", "loss_y", "loss_z", "img_per_s"}
    assert keys <= set(records[0])
    peak = cfg.train.lr
    for r in records:  # schedules: lr and momentum of the step that was taken
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 8, 4, peak))
        assert r["momentum"] == pytest.approx(momentum_at(r["step"] - 1, 8))


def test_teacher_updated_once_per_epoch_in_epoch_mode(tmp_path):
    cfg = _tiny_run(tmp_path, **{"train.ema_every": "epoch", "train.epochs": 1})
    pretrain(cfg)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    torch.manual_seed(cfg.train.seed)
    initial = DSMAE(cfg.model).encoder.state_dict()
    m = momentum_at(0, 1)  # one epoch: a single update with the first momentum
    for name, start in initial.items():
        expected = m * start + (1 - m) * state[f"encoder.{name}"]
        assert torch.allclose(state[f"teacher.{name}"], expected, atol=1e-6), name


def test_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(dsmae.ConfigError, match=r"train\.batch_size"):
        pretrain(_tiny_run(tmp_path, **{"train.batch_size": 512}))
