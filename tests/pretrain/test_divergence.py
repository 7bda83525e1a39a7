"""Non-finite steps skipped and counted, and a run that diverged stopped
(``dsmae.pretrain.divergence``)."""

import math

import torch

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main
from dsmae.metrics import read_metrics
from dsmae.pretrain import step as pretrain_step


def _nan_noise_at(monkeypatch, bad_steps) -> None:
    """Make the noise of the given optimizer steps (0-based) NaN: a NaN loss and gradient."""
    real = pretrain_step.draw_step

    def draw_step(model, cfg, step, device):
        corruption = real(model, cfg, step, device)
        if step in bad_steps:
            corruption.eps = torch.full_like(corruption.eps, math.nan)
        return corruption

    monkeypatch.setattr(pretrain_step, "draw_step", draw_step)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, caplog, run_args):
    _nan_noise_at(monkeypatch, {2, 5})
    out = tmp_path / "run"
    assert main([*run_args, "--out", str(out)]) == 0
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in lines] == [0, 0, 1, 1, 1, 2] + [2] * 6
    assert math.isnan(lines[2]["loss"]) and math.isfinite(lines[3]["loss"])
    assert "step 3 skipped: non-finite gradient" in caplog.text
    weights = load_checkpoint(out / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys, run_args):
    _nan_noise_at(monkeypatch, set(range(5, 12)))  # from step 6 on
    out = tmp_path / "run"
    assert main([*run_args, "--out", str(out), "--set", "train.max_bad_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 8: 3 steps in a row had a non-finite loss or gradient" in err
    assert f"last good checkpoint is {out / 'checkpoint-00000004.pt'}" in err
    assert "Traceback" not in err
    assert not (out / "last.pt").exists()
    assert load_checkpoint(out / "checkpoint-00000004.pt")["step"] == 4
