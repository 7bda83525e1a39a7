"""Every config value finite and bounded, every document plain: refused in one line that
names the key (and the flag that set it), before any folder is claimed or data read."""

import time

import pytest
import yaml

from dsmae.cli import main
from dsmae.config import (
    ConfigError,
    build_config,
    config_from_dict,
    typed_value,
)
from dsmae.config.checks import parse_duration, shown


def _refused(capsys, tmp_path, *args: str) -> str:
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "quickstart", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # refused before the folder was claimed
    return err


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("train.weight_decay=.nan", "train.weight_decay must be a finite number, got nan"),
        ("data.mean=[.nan]", "data.mean must be a finite number, got nan"),
        ("data.std=[.inf]", "data.std must be a finite number, got inf"),
        ("model.noise_std=.inf", "model.noise_std must be a finite number, got inf"),
        ("model.mlp_ratio=.inf", "model.mlp_ratio must be a finite number"),
        ("model.mlp_ratio=1e30", "model.mlp_ratio: must be in (0, 64]"),
        ("train.seed=100000000000000000000000", "train.seed must fit in 64 bits"),
        ("train.base_lr=1e400", "train.base_lr must be a finite number"),
    ],
)
def test_non_finite_and_unbounded_numbers_are_refused(capsys, tmp_path, assignment, message):
    assert message in _refused(capsys, tmp_path, "--set", assignment)


def test_a_time_budget_beyond_a_year_is_refused(capsys, tmp_path):
    err = _refused(capsys, tmp_path, "--time-budget", "9" * 400 + "h")
    assert "train.time_budget: must be at most a year" in err and "(set by --time-budget)" in err
    assert parse_duration("8760h") == 8760 * 3600.0
    with pytest.raises(ConfigError, match="at most a year"):
        parse_duration("9000h")


def test_documents_that_expand_or_hold_themselves_are_refused_at_once(capsys, tmp_path):
    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for depth in range(1, 10):  # 9 ** 10 values once expanded
        previous = "a" if depth == 1 else f"l{depth - 1}"
        laughs.append(f"l{depth}: &l{depth} [{', '.join(['*' + previous] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(laughs) + "\nmodel:\n  depth: *l9\n")
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("data:\n  mean: &m [*m]\n")
    for document in (bomb, recursive):
        started = time.perf_counter()
        err = _refused(capsys, tmp_path, "--config", str(document))
        assert time.perf_counter() - started < 5  # well under a second when alone
        assert "aliases (*name) are not read in a config" in err


def test_messages_quote_only_the_start_of_a_value(capsys, tmp_path):
    long = "[" + ", ".join(f"word{i}" for i in range(10_000)) + "]"
    err = _refused(capsys, tmp_path, "--set", f"model.depth={long}")
    assert "model.depth must be an integer, got ['word0', 'word1'" in err and len(err) < 300
    assert len(shown("x" * 10_000)) < 80 and shown([1, 2]) == "[1, 2]"


def test_values_are_typed_as_their_fields():
    assert typed_value("train.base_lr", "1e-3") == 0.001  # YAML 1.1 reads it as a string
    assert typed_value("model.lam", 1) == 1.0
    for key, value, message in (
        ("model.nope", 1, "unknown config key"),
        ("nope.lam", 1, "no section 'nope'"),
        ("train.epochs", 1.5, "must be an integer"),
        ("model.lam", float("nan"), "must be a finite number"),
    ):
        with pytest.raises(ConfigError, match=message):
            typed_value(key, value)
    assert build_config(overrides={"train.base_lr": "1e-3"}).train.base_lr == 0.001


def test_resolved_config_round_trips_through_yaml():
    cfg = build_config("quickstart")
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
