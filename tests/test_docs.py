"""The documentation: the README a front page, the site built with ``mkdocs build
--strict`` (a broken link or a docstring that does not resolve fails), every command on a
page of its navigation."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from dsmae.cli.parser import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 210
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    for heading in ("## Set-up: two commands", "## What to expect", "## Commands"):
        assert sum(h.startswith(heading) for h in headings) == 1, heading
    assert "docs/" in readme  # the guides are linked


def test_every_command_has_its_page_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    titles = " ".join(str(entry) for entry in config["nav"])
    commands = [add.__name__.removeprefix("_add_") for add in SUBCOMMANDS]
    assert len(commands) == 11
    for command in commands:
        assert re.search(rf"\b{command}\b", titles), command


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "index.html").is_file() and (tmp_path / "reference" / "index.html").is_file()
