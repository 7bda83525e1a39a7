"""Which checkpoint a run resumes from (the newest readable one: a kill while a checkpoint
is written costs nothing), and which settings may change when it does."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from dsmae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dsmae.cli import main
from dsmae.config import ConfigError, build_config, config_from_dict
from dsmae.pretrain import pretrain, resume
from dsmae.pretrain.resume import (
    RESUMABLE_CHANGES,
    ResumePoint,
    config_differences,
    resume_point,
    settings_differences,
)

# What may differ between a run and its resumption: where and how it runs, not what it learns.
RESUMABLE = {
    "out", "data.root", "data.download", "train.device", "train.micro_batch", "train.compile",
    "train.compile_scope", "train.compile_backend", "train.compile_mode", "train.attention",
    "train.grad_checkpointing", "train.data_on_device",
    "train.checkpoint_every", "train.checkpoint_minutes", "train.keep_checkpoints",
    "train.log_every", "train.max_bad_steps", "train.dist_timeout_minutes",
    "train.time_budget",  # a budgeted run's epochs are fixed when it starts, and kept
    "monitor", "probe", "finetune", "log",
}  # fmt: skip


def test_the_resumable_keys_are_those_marked_in_the_config():
    assert len(RESUMABLE_CHANGES) == len(RESUMABLE)
    assert set(RESUMABLE_CHANGES) == RESUMABLE


def test_config_differences_name_nested_keys():
    a = {"model": {"lam": 0.6, "depth": 2}, "out": "a"}
    b = {"model": {"lam": 0.5, "depth": 2}, "out": "b", "extra": 1}
    assert config_differences(a, b) == [
        "extra: None -> 1",
        "model.lam: 0.6 -> 0.5",
        "out: 'a' -> 'b'",
    ]
    assert config_differences(a, a) == []


def test_settings_differences_leave_out_what_may_change_on_a_resume():
    saved = build_config("quickstart")
    resumable = {"out": "elsewhere", "train.device": "cuda", "train.log_every": 1,
                 "probe.epochs": 3, "monitor.knn_every": 0, "finetune.epochs": 2}  # fmt: skip
    current = build_config("quickstart", overrides=resumable)
    assert settings_differences(saved, current) == []
    other = build_config("quickstart", overrides={**resumable, "model.lam": 0.5, "train.seed": 1})
    assert settings_differences(saved, other) == ["model.lam: 0.6 -> 0.5", "train.seed: 0 -> 1"]


def _checkpoint(folder, step=4):
    """A checkpoint of a quickstart run, as resume reads it (no weights needed)."""
    measured = {"out": str(folder), "data.mean": [0.3], "data.std": [0.2]}
    cfg = build_config("quickstart", overrides=measured)
    state = {"config": cfg.to_dict(), "model": {}, "optimizer": {"state": {}}, "step": step,
             "run_id": "0123456789ab"}  # fmt: skip
    save_checkpoint(folder / f"checkpoint-{step:08d}.pt", state)


def test_a_fresh_run_and_an_empty_folder_start_from_scratch(tmp_path):
    cfg = build_config("quickstart", overrides={"out": str(tmp_path)})
    assert resume_point(cfg, tmp_path, None, force=False) == ResumePoint(cfg)
    assert resume_point(cfg, tmp_path, "auto", force=False) == ResumePoint(cfg)
    assert ResumePoint(cfg).step == 0


def test_a_resumed_run_takes_the_checkpoints_step_normalisation_and_run_id(tmp_path):
    _checkpoint(tmp_path, step=4)
    _checkpoint(tmp_path, step=8)  # the newest
    cfg = build_config("quickstart", overrides={"out": str(tmp_path), "train.device": "auto"})
    start = resume_point(cfg, tmp_path, "auto", force=False)
    assert (start.step, start.path) == (8, tmp_path / "checkpoint-00000008.pt")
    assert (start.cfg.data.mean, start.cfg.data.std) == ([0.3], [0.2])  # as the run measured
    assert start.run_id == "0123456789ab"
    assert start.state["step"] == 8
    given = resume_point(cfg, tmp_path, str(tmp_path / "checkpoint-00000004.pt"), force=False)
    assert given.step == 4


def test_other_settings_are_refused_unless_forced(tmp_path):
    _checkpoint(tmp_path)
    cfg = build_config("quickstart", overrides={"out": str(tmp_path), "model.lam": 0.5})
    with pytest.raises(
        ConfigError, match=r"other settings \(add --force.*model\.lam: 0\.6 -> 0\.5"
    ):
        resume_point(cfg, tmp_path, "auto", force=False)
    assert resume_point(cfg, tmp_path, "auto", force=True).cfg.model.lam == 0.5


def test_a_checkpoint_without_training_state_is_refused(tmp_path):
    cfg = build_config("quickstart", overrides={"out": str(tmp_path)})
    save_checkpoint(tmp_path / "last.pt", {"config": cfg.to_dict(), "model": {}, "step": 3})
    with pytest.raises(CheckpointError, match="no optimizer state"):
        resume_point(cfg, tmp_path, "auto", force=False)


def test_resume_with_other_settings_is_refused_unless_forced(tmp_path, tiny_digits_run):
    run = tiny_digits_run(tmp_path / "run")
    cfg = config_from_dict(load_checkpoint(run / "last.pt")["config"])
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lam=0.5))
    with pytest.raises(ConfigError, match=r"model\.lam: 0\.6 -> 0\.5"):
        pretrain(changed, resume="auto")
    pretrain(changed, resume="auto", force=True)  # nothing left to do, but allowed


def _same_weights(a, b) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    for name, tensor in wa.items():
        assert torch.equal(tensor, wb[name]), name


def test_killed_while_writing_a_checkpoint_resumes_from_the_one_before(
    tmp_path, tiny_run, fault_driver
):
    run = tiny_run.args("--epochs", "3", checkpoints=True)
    assert main([*run, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    # the second checkpoint write dies half-way: some bytes on disk, then SIGKILL
    driver = fault_driver(
        """
        real_save, calls = torch.save, []
        def dying_save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                f.write(b"PK half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
        """,
    )
    # the child computes with as many threads as this process, for bit-identical sums
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, driver, *run, "--out", str(out)], env=env, capture_output=True
    )
    assert done.returncode == -9
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".tmp"))
    assert len(names) == 2 and names[1] == "checkpoint-00000004.pt"
    assert names[0].startswith(".checkpoint-00000008.pt.") and names[0].endswith(".tmp")
    assert load_checkpoint(out / "checkpoint-00000004.pt")["step"] == 4

    assert main([*run, "--out", str(out), "--resume", "auto"]) == 0
    _same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


def test_an_unreadable_newest_checkpoint_is_skipped(tmp_path, caplog, tiny_run):
    out = tmp_path / "run"
    run = tiny_run.args("--epochs", "3", checkpoints=True)
    assert main([*run, "--out", str(out)]) == 0
    (out / "last.pt").unlink()
    newest = out / "checkpoint-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy that was cut short
    assert resume.find_resume_checkpoint(out) == out / "checkpoint-00000004.pt"
    assert "skipping an unreadable checkpoint" in caplog.text and newest.name in caplog.text


def test_resume_picks_the_newest_readable_checkpoint(tmp_path):
    def write(name, step):
        save_checkpoint(tmp_path / name, {"config": {}, "model": {}, "step": step})

    write("checkpoint-00000004.pt", 4)
    write("last.pt", 8)
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "last.pt"
    write("checkpoint-00000008.pt", 8)  # same step: last.pt wins
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "last.pt"
    write("checkpoint-00000012.pt", 12)  # a resumed, longer run went past last.pt
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-00000012.pt"
    (tmp_path / "checkpoint-00000012.pt").write_bytes(b"cut")
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "last.pt").write_bytes(b"cut")
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-00000008.pt"
