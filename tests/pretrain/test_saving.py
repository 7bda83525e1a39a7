"""Checkpoint names (one function for saving, pruning and resume), and when a save is due."""

from pathlib import Path

import pytest
from tiny_runs import tiny_config

import dsmae
from dsmae.config import TrainConfig
from dsmae.pretrain import pretrain, saving
from dsmae.pretrain.saving import Checkpointer, checkpoint_path, checkpoint_step, checkpoints_in


def test_a_checkpoint_name_holds_its_step_and_is_read_back(tmp_path):
    path = checkpoint_path(tmp_path, 1234)
    assert path == tmp_path / "checkpoint-00001234.pt"
    assert checkpoint_step(path) == 1234
    assert checkpoint_step(checkpoint_path(tmp_path, 123456789)) == 123456789  # over 8 digits
    for other in ("last.pt", "checkpoint-00000008.run-abc.pt", "checkpoint-.pt", "x.pt"):
        assert checkpoint_step(Path(other)) is None


def test_checkpoints_in_lists_the_periodic_ones_oldest_first(tmp_path):
    for step in (12, 4, 100):
        checkpoint_path(tmp_path, step).touch()
    for other in ("last.pt", "checkpoint-00000008.run-abc.pt"):
        (tmp_path / other).touch()
    assert checkpoints_in(tmp_path) == [(s, checkpoint_path(tmp_path, s)) for s in (4, 12, 100)]


def test_a_save_is_due_every_so_many_epochs_but_the_last_and_every_so_many_minutes(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(saving.time, "monotonic", lambda: clock[0])
    train = TrainConfig(epochs=6, checkpoint_every=2, checkpoint_minutes=1.0)
    saver = Checkpointer(train)
    assert [e for e in range(1, 7) if saver.due_after_epoch(e)] == [2, 4]  # 6 is last.pt
    assert not saver.due_mid_epoch()
    clock[0] += 61
    assert saver.due_mid_epoch() and saver.due_after_epoch(3) and not saver.due_after_epoch(6)
    off = Checkpointer(TrainConfig(epochs=6, checkpoint_every=0, checkpoint_minutes=0.0))
    assert not any(off.due_after_epoch(e) for e in range(1, 7)) and not off.due_mid_epoch()


def test_dsmae_pretrain_is_the_package_and_the_function():
    from dsmae.pretrain.loop import pretrain

    assert callable(dsmae.pretrain) and dsmae.pretrain.loop.pretrain is pretrain
    with pytest.raises(TypeError):
        dsmae.pretrain()  # the function's own signature: a config is required


def test_only_the_newest_checkpoints_are_kept(tmp_path, tiny):
    cfg = tiny_config(
        tiny,
        tmp_path,
        **{
            "train.epochs": 4,
            "train.checkpoint_every": 1,
            "train.checkpoint_minutes": 0,
            "train.keep_checkpoints": 2,
        },
    )
    pretrain(cfg)
    names = sorted(p.name for p in Path(cfg.out).glob("checkpoint-*.pt"))
    assert names == ["checkpoint-00000008.pt", "checkpoint-00000012.pt"]
