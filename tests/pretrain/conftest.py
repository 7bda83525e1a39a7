"""Fixtures of the pre-training tests."""

import pytest


@pytest.fixture
def run_args(tiny_run) -> list[str]:
    """The tiny run for 3 epochs with a checkpoint after each: checkpoint-00000004.pt,
    checkpoint-00000008.pt, last.pt (step 12)."""
    return tiny_run.args("--epochs", "3", checkpoints=True)
