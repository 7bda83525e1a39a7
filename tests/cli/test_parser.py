"""The dsmae command's parsers: their help answers at once, and --print-config."""

import subprocess
import sys

import pytest
import yaml

from dsmae.cli import main


def test_print_config(capsys):
    assert main(["pretrain", "--preset", "quickstart", "--lam", "0.4", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["lam"] == 0.4 and cfg["data"]["source"] == "digits"


@pytest.mark.parametrize("command", [[], ["pretrain"], ["shards"]])
def test_help_imports_neither_torch_nor_timm(command):
    """``dsmae --help`` answers without waiting for torch: nothing imports it before the
    arguments are parsed (read from the interpreter's own import log)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dsmae", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "usage: dsmae" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "dsmae.cli" in imported and "dsmae.config" in imported
    assert not {name.split(".")[0] for name in imported} & {"torch", "timm", "matplotlib"}
