"""The pre-training loop (``dsmae.pretrain``): what a run writes, its schedules, teacher,
resumption and monitors, and what a fault costs: non-finite steps are skipped, counted and
stop a diverging run; a full disk and an unwritable folder are messages."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import assert_identical, tiny_config

import dsmae
from dsmae.checkpoint import load_checkpoint
from dsmae.config import build_config
from dsmae.models import DSMAE
from dsmae.pretrain import pretrain
from dsmae.schedules import lr_at, momentum_at


def test_pretrain_writes_checkpoint_metrics_config_and_figure(tmp_path, tiny):
    cfg = tiny_config(tiny, tmp_path, **{"train.checkpoint_every": 1})
    result = pretrain(cfg)
    out = result.out
    assert result.checkpoint == out / "last.pt"
    assert (out / "config.yaml").is_file() and (out / "denoise.png").is_file()
    assert (out / "checkpoint-00000004.pt").is_file()  # after epoch 1 = step 4
    assert any((out / "tensorboard").iterdir())
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 8 and set(state) >= {"config", "model", "optimizer", "epoch"}
    prefixes = {k.split(".")[0] for k in state["model"]}
    assert prefixes == {"encoder", "teacher", "decoder", "regressor"}
    assert state["config"]["data"]["mean"] is not None  # measured and recorded
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    keys = {"step", "epoch", "lr", "momentum", "loss", "loss_y", "loss_z", "img_per_s", "grad_norm"}
    assert keys <= set(records[0])
    peak = cfg.train.lr
    for r in records:  # schedules: lr of the step taken, momentum of its epoch (SdAE's rhythm)
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 8, 4, peak))
        assert r["momentum"] == pytest.approx(momentum_at(r["epoch"], 2))


def test_per_step_teacher_momentum_follows_the_steps(tmp_path, tiny):
    pretrain(tiny_config(tiny, tmp_path, **{"train.ema_every": "step"}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["momentum"] for r in records] == pytest.approx(
        [momentum_at(r["step"] - 1, 8) for r in records]
    )


def test_teacher_updated_once_per_epoch_in_epoch_mode(tmp_path, tiny):
    cfg = tiny_config(tiny, tmp_path, **{"train.ema_every": "epoch", "train.epochs": 1})
    pretrain(cfg)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    torch.manual_seed(cfg.train.seed)
    initial = DSMAE(cfg.model).encoder.state_dict()
    m = momentum_at(0, 1)  # one epoch: a single update with the first momentum
    for name, start in initial.items():
        expected = m * start + (1 - m) * state[f"encoder.{name}"]
        assert torch.allclose(state[f"teacher.{name}"], expected, atol=1e-6), name


@pytest.mark.parametrize("ema_every", ["epoch", "step"])
def test_resume_from_the_middle_of_an_epoch_is_exact(tmp_path, ema_every, tiny):
    straight = tiny_config(
        tiny, tmp_path / "a", **{"train.epochs": 3, "train.ema_every": ema_every}
    )
    pretrain(straight)
    # the same run, checkpointing after every step; then go back to step 6 of 12 (the
    # middle of epoch 2: with the per-epoch rhythm the teacher has moved once)
    broken = tiny_config(
        tiny,
        tmp_path / "b",
        **{"train.epochs": 3, "train.checkpoint_minutes": 1e-9, "train.keep_checkpoints": 0,
           "train.ema_every": ema_every},
    )  # fmt: skip
    pretrain(broken)
    out = Path(broken.out)
    assert (out / "checkpoint-00000006.pt").is_file()
    for path in out.glob("*.pt"):
        if path.name in ("last.pt", "checkpoint-00000007.pt") or path.name > "checkpoint-00000007":
            path.unlink()
    pretrain(broken, resume="auto")
    assert_identical(Path(straight.out) / "last.pt", out / "last.pt")


def test_monitors_knn_images_and_flops_are_logged(tmp_path, tiny):
    cfg = tiny_config(tiny, tmp_path, **{"monitor.knn_every": 1, "monitor.images_every": 1})
    pretrain(cfg)
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").open()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [1, 2]
    assert all(0 <= r["knn_top1"] <= 100 and r["wall_s"] > 0 for r in knn)
    assert knn[1]["flops"] == pytest.approx(2 * knn[0]["flops"])  # twice the images seen
    board = EventAccumulator(str(Path(cfg.out) / "tensorboard"))
    board.Reload()
    assert "pretrain/denoise" in board.Tags()["images"]  # the Fig. 2 grid, every epoch
    assert {"pretrain/loss", "pretrain/grad_norm", "pretrain/knn_top1"} <= set(
        board.Tags()["scalars"]
    )


# ------------------------------------------------------------------ faults


# ------------------------------------------------------------------ a time budget


def test_until_epoch_is_a_whole_epoch_not_behind_the_run(tmp_path, tiny_run):
    cfg = build_config(tiny_run.preset, overrides={**tiny_run.overrides, "out": str(tmp_path)})
    for bad in (2.5, 0, 3, True):
        with pytest.raises(dsmae.ConfigError, match="until_epoch must be a whole number"):
            pretrain(cfg, until_epoch=bad)
    assert not (tmp_path / "config.yaml").exists()  # refused before the folder was claimed
    pretrain(cfg, until_epoch=2)  # the whole run
    with pytest.raises(dsmae.ConfigError, match="has done 2 epochs already"):
        pretrain(cfg, resume="auto", until_epoch=1)
    again = pretrain(cfg, resume="auto", until_epoch=2)  # where it is: its checkpoint
    assert again.checkpoint.name == "last.pt"
