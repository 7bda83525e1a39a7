"""``dsmae experiment grid``: a user's own grid, every choice made on a validation split,
resumable and shared cell by cell, refusing cells pre-trained with other settings."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tiny_grid import run_grid

from dsmae.cli import main
from dsmae.config import ConfigError, typed_value
from dsmae.experiments.grid import (
    Cell,
    GridSpec,
    cell_config,
    cell_folder,
    cell_identity,
    choose,
    combinations,
    parse_vary,
)


def test_vary_values_are_read_as_set_reads_them_and_typed():
    assert parse_vary("train.base_lr=1e-3,3e-3") == ("train.base_lr", (0.001, 0.003))
    assert parse_vary("model.method=mae,dsmae") == ("model.method", ("mae", "dsmae"))
    assert parse_vary("data.crop_scale=[0.2,1.0],[0.5,1]") == (
        "data.crop_scale", ([0.2, 1.0], [0.5, 1.0]))  # fmt: skip
    assert typed_value("model.lam", 1) == 1.0 and typed_value("out", "x") == "x"
    for text, message in (("train.base_lr", "not of the form"), ("model.nope=1,2", "unknown"),
                          ("train.epochs=1.5", "must be an integer")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            parse_vary(text)


@pytest.mark.parametrize(
    "spec,message",
    [
        (GridSpec(vary=()), "needs at least one --vary"),
        (GridSpec(vary=(("model.lam", (0.2,)), ("model.lam", (0.4,)))), "given twice"),
        (GridSpec(vary=(("model.lam", (0.2, 0.2)),)), "lists a value twice"),
        (GridSpec(vary=(("model.lam", (0.2,)),), select="train.base_lr"), "not a --vary key"),
        (GridSpec(vary=(("model.lam", (0.2,)),), seeds=0), "--seeds must be >= 1"),
        (GridSpec(vary=(("model.lam", (0.2,)),), val_fraction=1.0), "--val-fraction"),
        (GridSpec(vary=(("model.lam", (0.2,)),), overrides=(("model.lam", 0.5),)), "both varied"),
    ],
)
def test_impossible_grids_are_refused_naming_the_flag(spec, message):
    with pytest.raises(ConfigError, match=message):
        spec.validate()


def test_a_cell_is_named_by_what_makes_itsrun_grid(tmp_path):
    spec = GridSpec(vary=(("model.method", ("mae", "dsmae")), ("model.lam", (0.6, 0.4))),
                    preset="quickstart")  # fmt: skip
    first, second, *_ = (dict(c) for c in combinations(spec))
    assert first == {"model.method": "mae", "model.lam": 0.6}
    assert second == {"model.method": "mae", "model.lam": 0.4}
    cell = Cell((("model.method", "dsmae"), ("model.lam", 0.6)), seed=1)
    cfg = cell_config(spec, cell, tmp_path)
    assert cell.label == "method=dsmae,lam=0.6,seed=1"
    assert Path(cfg.out).parent == tmp_path / "cells" and Path(cfg.out).name.startswith(
        "dsmae-seed1-")  # fmt: skip
    identity = cell_identity(cfg)
    assert identity["train.seed"] == 1 and identity["data.source"] == "digits"
    assert "model.lam" not in identity  # the default value: the same run as not setting it
    assert not any(k.startswith(("monitor.", "probe.", "log.")) or k == "out" for k in identity)
    # the same run asked another way (another grid, the value set rather than varied, a
    # device or monitor of its own) is the same cell; another value is another
    same = GridSpec(vary=(("train.seed", (1,)),), preset="quickstart",
                    overrides=(("model.method", "dsmae"), ("monitor.knn_every", 3),
                               ("train.device", "cpu")))  # fmt: skip
    assert cell_config(same, Cell((("train.seed", 1),), 1), tmp_path).out == cfg.out
    other = cell_config(spec, Cell((("model.method", "dsmae"), ("model.lam", 0.4)), 1), tmp_path)
    assert other.out != cfg.out and cell_folder(tmp_path, other) == Path(other.out)


def test_the_choice_reads_the_validation_figure_alone():
    spec = GridSpec(vary=(("model.method", ("dsmae",)), ("train.base_lr", (1e-3, 2e-3, 4e-3))),
                    select="train.base_lr")  # fmt: skip
    seed0 = {
        1e-3: {"val_knn": 50.0, "test_knn": 99.0, "test_linprobe": 99.0},
        2e-3: {"val_knn": 60.0, "test_knn": 10.0, "test_linprobe": 10.0},
        4e-3: {"val_knn": 60.0, "test_knn": 90.0, "test_linprobe": 90.0},
    }
    group = (("model.method", "dsmae"),)
    assert choose(spec, group, seed0) == 2e-3  # the best validation; the first on a tie


def test_a_tuned_grid_runs_resumes_and_refuses_stale_cells(tmp_path, capsys, caplog):
    grid = ["--vary", "model.method=mae,dsmae", "--vary", "train.base_lr=1e-3,5e-3",
            "--select", "train.base_lr", "--seeds", "2", "--plot"]  # fmt: skip
    assert run_grid(tmp_path, *grid) == 0
    results = tmp_path / "results"
    table = (results / "grid.md").read_text()
    assert "| method | chosen base_lr | val k-NN of each candidate (seed 0) |" in table
    assert table.count("| mae |") == 1 and table.count("| dsmae |") == 1
    assert "| random init |" in table and "the test split chose nothing" in table
    assert (results / "grid.png").stat().st_size > 1000
    data = json.loads((results / "grid.json").read_text())
    assert len(data["cells"]) == 2 * 2 + 2  # every candidate on seed 0, each choice on seed 1
    assert data["split"]["num_val"] == 135 and data["split"]["val_fraction"] == 0.1
    for row in data["rows"]:
        chosen = row["selected"]["train.base_lr"]
        best = max(row["candidates"], key=lambda c: c["val_knn"])
        assert chosen == best["value"] and row["seeds"] == [0, 1]
        assert row["test_knn"]["std"] >= 0 and len(row["test_linprobe"]["values"]) == 2
    for cell in data["cells"]:
        assert cell["split"] == data["split"] and cell["pretrain_s"] > 0 and cell["img_per_s"] > 0
        assert {"val_knn", "test_knn", "test_linprobe", "identity", "settings"} <= set(cell)
    assert "table: " in capsys.readouterr().out

    caplog.set_level(logging.INFO)
    caplog.clear()
    assert run_grid(tmp_path, *grid) == 0  # everything done: nothing trained or evaluated again
    assert "pre-training" not in caplog.text and "validation k-NN" not in caplog.text.replace(
        "has the best validation k-NN", "")  # fmt: skip
    assert (results / "grid.md").read_text() == table

    # other evaluation settings: evaluated again, kept beside the first; no seed-0 cell is
    # pre-trained again (another validation split may choose another value for seed 1)
    caplog.clear()
    assert run_grid(tmp_path, *grid, "--val-fraction", "0.2") == 0
    assert "seed0" not in "".join(r.message for r in caplog.records if "pre-training" in r.message)
    folder = Path(data["cells"][0]["folder"])
    assert len(list(folder.glob("grid-eval-*.json"))) == 2

    # a cell folder holding a run of other settings stops the grid before any work
    checkpoint = folder / "last.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["model"]["noise_std"] = 0.5
    torch.save(state, checkpoint)
    capsys.readouterr()
    assert run_grid(tmp_path, *grid) == 2
    err = capsys.readouterr().err
    assert "pre-trained with other settings (model.noise_std: 0.5 -> 1.0)" in err
    assert "Traceback" not in err


def _labelled_folder(cifar_folder: Path, out: Path, poison_test: bool) -> Path:
    """A copy of the real CIFAR-10 sample; with ``poison_test`` every test image moved to
    the next class, so that every test label is wrong."""
    shutil.copytree(cifar_folder, out)
    if poison_test:
        classes = sorted(p.name for p in (out / "test").iterdir())
        moved = out / "moved"
        shutil.move(out / "test", moved)
        for i, name in enumerate(classes):
            shutil.move(moved / name, out / "test" / classes[(i + 1) % len(classes)])
        shutil.rmtree(moved)
    return out


def test_the_test_split_chooses_nothing(cifar_folder, tmp_path):
    """The same grid with every test label wrong makes the same choices from the same
    validation figures; only its test figures change."""
    tiny_cifar = ["--set", "model.img_size=32", "--set", "model.patch_size=8",
                  "--set", "model.in_chans=3", "--set", "data.hflip=true"]  # fmt: skip
    grid = ["--vary", "model.method=dsmae", "--vary", "train.base_lr=1e-3,1e-2",
            "--select", "train.base_lr", *tiny_cifar]  # fmt: skip
    outcomes = []
    for poison in (False, True):
        data = _labelled_folder(cifar_folder, tmp_path / f"data-{poison}", poison)
        assert run_grid(tmp_path, *grid, "--data", str(data), results=f"results-{poison}") == 0
        outcomes.append(json.loads((tmp_path / f"results-{poison}" / "grid.json").read_text()))
    clean, poisoned = outcomes
    assert clean["rows"][0]["candidates"] == poisoned["rows"][0]["candidates"]
    assert clean["rows"][0]["selected"] == poisoned["rows"][0]["selected"]
    assert clean["rows"][0]["test_knn"] != poisoned["rows"][0]["test_knn"]


def test_a_paper_sweep_tuned_on_the_validation_split(cifar_folder, tmp_path, capsys):
    command = [
        "experiment", "noise-ratio", "--datasets", "cifar10", "--archs", "vit_tiny",
        "--epochs", "1", "--subset", "64", "--probe-epochs", "2",
        "--data", f"cifar10={cifar_folder}", "--results", str(tmp_path / "results"),
        "--set", "model.depth=1", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
        "--set", "model.decoder_depth=1", "--set", "model.regressor_depth=1",
        "--set", "model.patch_size=8", "--set", "train.batch_size=32",
        "--set", "monitor.knn_every=0", "--set", "monitor.every=0",
        "--set", "monitor.images_every=0", "--device", "cpu",
        "--vary", "train.base_lr=1e-3,1e-2", "--select", "train.base_lr",
    ]  # fmt: skip
    assert main(command) == 0
    table = tmp_path / "results" / "noise-ratio" / "noise-ratio-cifar10-vit_tiny.md"
    text = table.read_text()
    assert "| noise_ratio | chosen base_lr |" in text
    for ratio in (0.75, 0.8, 0.85, 0.9, 0.95):
        assert f"| {ratio} |" in text
    assert str(table) in capsys.readouterr().out
    # --vary alone on a paper grid would drop its values: refused
    at = command.index("--select")
    assert main(command[:at]) == 2
    assert "add --select KEY" in capsys.readouterr().err
