"""The tiny grid of the grid tests: the tiny run's model on 8x8 digits, one epoch, a probe
of two epochs: seconds a cell."""

from __future__ import annotations

from pathlib import Path

from dsmae.cli import main

# the tiny run's model (one block of width 32 on 4x4 patches: 4 tokens) and recipe
SETTINGS = {
    "model.depth": 1,
    "model.embed_dim": 32,
    "model.num_heads": 2,
    "model.decoder_depth": 1,
    "model.regressor_depth": 1,
    "model.patch_size": 4,
    "train.batch_size": 32,
    "train.warmup_epochs": 1,
    "probe.epochs": 2,
    "monitor.knn_every": 0,
    "monitor.every": 0,
    "monitor.images_every": 0,
}
TINY_GRID = ["--preset", "quickstart", "--epochs", "1", "--subset", "128"]
TINY_GRID += [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]


def run_grid(tmp_path: Path, *extra: str, results: str = "results") -> int:
    """``dsmae experiment grid`` of :data:`TINY_GRID` and ``extra`` into
    ``tmp_path/results``; its exit status."""
    return main(["experiment", "grid", *TINY_GRID, "--results", str(tmp_path / results), *extra])
