"""A run fitted to its wall-clock budget (dsmae.pretrain.time_budget)."""

import logging
from pathlib import Path

import pytest
from tiny_runs import assert_identical, tiny_config

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main
from dsmae.config import Config
from dsmae.metrics import read_metrics
from dsmae.pretrain import pretrain, time_budget


def _step_time(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make a budget's timed steps (still taken, and undone) report ``seconds`` a step."""
    real = time_budget._time_steps

    def timed(run):
        steps, _ = real(run)
        return steps, seconds

    monkeypatch.setattr(time_budget, "_time_steps", timed)


def _budgeted(tiny: dict, out: Path, budget: str = "10s", epochs: int = 100) -> Config:
    return tiny_config(tiny, out, **{"train.time_budget": budget, "train.epochs": epochs})


def test_a_budgeted_run_is_the_run_of_the_epochs_it_chose(tmp_path, tiny, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dsmae.pretrain")
    _step_time(monkeypatch, 0.05)  # 4 steps an epoch: about 0.2 s an epoch of the 10 s
    result = pretrain(_budgeted(tiny, tmp_path / "budget"))
    epochs = result.config.train.epochs
    assert 2 <= epochs < 100 and "time budget 10s (10 s): a step takes 0.0500 s" in caplog.text
    assert f"train.epochs={epochs} (at most 100)" in caplog.text
    # recorded where a run records its settings
    saved = Path(result.out) / "config.yaml"
    assert f"  epochs: {epochs}\n" in saved.read_text()
    assert load_checkpoint(result.checkpoint)["config"]["train"]["epochs"] == epochs
    assert read_metrics(Path(result.out) / "metrics.jsonl")[-1]["step"] == 4 * epochs
    assert not list(Path(result.out).glob(".budget*"))  # the timed save left nothing
    # the timed steps were undone: weights, teacher and optimizer are those of the same
    # run of that many epochs without a budget
    plain = tiny_config(tiny, tmp_path / "plain", **{"train.epochs": epochs})
    pretrain(plain)
    assert_identical(result.checkpoint, Path(plain.out) / "last.pt")


def test_a_resumed_budgeted_run_keeps_its_epochs_and_ends_as_an_uninterrupted_one(
    tmp_path, tiny, monkeypatch
):
    _step_time(monkeypatch, 0.05)
    broken = _budgeted(tiny, tmp_path / "broken")
    first = pretrain(broken, until_epoch=1)  # stopped after its first epoch
    epochs = first.config.train.epochs
    _step_time(monkeypatch, 1.0)  # were it timed again, this resume would choose 2 or so
    resumed = pretrain(broken, resume="auto")
    assert resumed.config.train.epochs == epochs
    plain = tiny_config(tiny, tmp_path / "plain", **{"train.epochs": epochs})
    pretrain(plain)
    assert_identical(Path(plain.out) / "last.pt", resumed.checkpoint)


def test_a_budget_gives_at_most_the_epochs_asked_for(tmp_path, tiny, monkeypatch):
    _step_time(monkeypatch, 0.01)
    assert pretrain(_budgeted(tiny, tmp_path / "run", "1h", epochs=3)).config.train.epochs == 3


def test_a_budget_is_kept_on_the_quickstart(tmp_path, capsys):
    # the quickstart on 512 digits (8 steps an epoch, about 1.5 s here), as many epochs as
    # fit 40 s; its monitors (k-NN, health, images every 20 epochs) included. The promise
    # is the upper bound (at most a tenth over); the estimate from a few timed steps may
    # leave some of the budget unused (31-40 s measured over runs on a 2-core machine)
    argv = ["pretrain", "--preset", "quickstart", "--time-budget", "40s", "--epochs", "1000",
            "--set", "data.subset=512", "--set", "probe.after_pretrain=false",
            "--out", str(tmp_path / "qs")]  # fmt: skip
    assert main(argv) == 0
    took = float(capsys.readouterr().out.split("pre-training took ")[1].split(" s")[0])
    assert 24 <= took <= 44, took


@pytest.mark.parametrize(
    "budget,message",
    [
        ("10x", "write a duration such as 90s, 10m, 2h or 1h30m, got '10x' (set by --time-b"),
        ("0s", "train.time_budget: must be a positive duration, got '0s' (set by --time-budget)"),
        ("0.001s", "train.time_budget: 0.001 s fits no epoch: the set-up took"),
    ],
)
def test_a_budget_that_cannot_be_is_one_line_naming_the_flag(
    tmp_path, tiny_run, capsys, budget, message
):
    out = tmp_path / "run"
    assert main([*tiny_run.args("--time-budget", budget, "--out", str(out))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(out.glob("*.pt"))
