"""Presets, YAML files and --set assignments as the layers a config is read from."""

import pytest

from dsmae.config import (
    ConfigError,
    available_presets,
    build_config,
    parse_assignment,
)


def test_presets_are_listed_and_unknown_ones_refused():
    assert "quickstart" in available_presets()
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*quickstart"):
        build_config("nope")


def test_unknown_key_in_a_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  noise_raito: 0.8\n")
    with pytest.raises(ConfigError, match=r"model\.noise_raito"):
        build_config(files=[bad])


def test_parse_assignment():
    assert parse_assignment("train.epochs=100") == ("train.epochs", 100)
    assert parse_assignment("data.crop_scale=[0.3, 1.0]") == ("data.crop_scale", [0.3, 1.0])
    with pytest.raises(ConfigError):
        parse_assignment("train.epochs")
