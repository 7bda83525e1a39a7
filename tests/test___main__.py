"""python -m dsmae is the dsmae command."""

import subprocess
import sys


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "dsmae", "pretrain", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in (
        "--method",
        "--arch",
        "--data",
        "--img-size",
        "--patch-size",
        "--epochs",
        "--batch-size",
        "--noise-ratio",
        "--lam",
        "--out",
        "--device",
        "--seed",
    ):
        assert flag in done.stdout
