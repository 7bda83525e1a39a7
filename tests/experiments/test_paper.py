"""``dsmae experiment``: grids, resumable cells, the paper's layout beside its numbers."""

import json
import logging
from pathlib import Path

import pytest

from dsmae.cli import main
from dsmae.config import ConfigError
from dsmae.experiments import (
    GridSettings,
    cell_config,
    draw_curve,
    grid_cells,
    table_markdown,
)


def test_grids_hold_the_papers_cells():
    table2 = grid_cells("table2", GridSettings())
    assert len(table2) == 12  # 6 data set x backbone columns, mae and dsmae each
    assert {c.protocols for c in table2 if c.method == "dsmae"} == {
        ("finetune", "linprobe", "scratch")
    }
    table3 = grid_cells("table3", GridSettings())
    assert [c.method for c in table3[:3]] == ["dsmae-ly", "dsmae-lz", "dsmae"]
    assert {c.arch for c in table3} == {"vit_small"}
    sweep = grid_cells("noise-ratio", GridSettings(datasets=["cifar10"]))
    assert [dict(c.changes)["model.noise_ratio"] for c in sweep] == [0.75, 0.8, 0.85, 0.9, 0.95]
    with pytest.raises(ConfigError, match="imagenet"):
        grid_cells("table2", GridSettings(datasets=["imagenet"]))
    with pytest.raises(ConfigError, match="unknown experiment"):
        grid_cells("table9", GridSettings())


def test_cell_configs_follow_the_presets_and_the_shrinking(tmp_path):
    settings = GridSettings(epochs=10, subset=500, data={"cifar10": "/data/c10"})
    mae, dsmae = grid_cells("table2", GridSettings(datasets=["cifar10"], archs=["vit_tiny"]))[:2]
    cfg = cell_config(mae, settings, tmp_path, "table2")
    assert (cfg.model.method, cfg.model.noise_ratio, cfg.model.patch_size) == ("mae", 0.75, 2)
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.data.subset) == (10, 1, 500)
    assert cfg.data.source == "/data/c10" and cfg.out == str(tmp_path / mae.name)
    assert cell_config(dsmae, GridSettings(), tmp_path, "table2").model.noise_ratio == 0.9
    ablation = grid_cells("table3", GridSettings(datasets=["stl10"]))[0]
    assert cell_config(ablation, GridSettings(), tmp_path, "table3").train.epochs == 300


def test_table2_layout_with_the_papers_numbers():
    results = [
        ("mae", "finetune", 80.0, 88.77),
        ("dsmae", "finetune", 81.5, 89.76),
        ("scratch", "finetune", 70.0, 73.88),
        ("mae", "linprobe", 50.0, 73.77),
    ]
    rows = [
        {"dataset": "cifar10", "arch": "vit_tiny", "method": m, "protocol": p, "top1": v,
         "top1_cls": v - 5 if p == "linprobe" else None, "paper": paper}
        for m, p, v, paper in results
    ]  # fmt: skip
    from dsmae.config import build_config

    text = table_markdown("table2", rows, build_config("cifar10-vit-tiny"), GridSettings())
    assert "| method | protocol | C10 T | C10 T [CLS] |" in text  # the default, then [CLS]
    assert "| scratch | finetune | 70.00 (73.88) |  |" in text
    assert "| dsmae | finetune | 81.50 (89.76) |  |" in text
    assert "| mae | linprobe | 50.00 (73.77) | 45.00 |" in text
    assert "avg-pooled features" in text and "[CLS]: the same linear probe" in text
    assert text.index("scratch | finetune") < text.index("mae | finetune")
    assert "pre-training 500 epochs" in text and "Changed from the paper: none" in text


def test_curve_of_a_sweep(tmp_path):
    rows = [{"dataset": "cifar10", "arch": "vit_small", "lam": lam, "top1": 80 + lam}
            for lam in (0.0, 0.6, 1.0)]  # fmt: skip
    assert draw_curve("lambda", rows, tmp_path / "lambda.png").stat().st_size > 1000


def test_a_reduced_table3_runs_and_resumes(cifar_folder, tmp_path, capsys, caplog, tiny_run):
    command = [
        "experiment", "table3", "--datasets", "cifar10", "--archs", "vit_tiny",
        "--epochs", "1", "--subset", "64", "--probe-epochs", "2",
        "--data", f"cifar10={cifar_folder}", "--results", str(tmp_path / "results"),
        *tiny_run.model_args, "--set", "model.patch_size=8", "--set", "train.batch_size=32",
        "--set", "monitor.knn_every=0", "--set", "monitor.images_every=0", "--device", "cpu",
    ]  # fmt: skip
    assert main(command) == 0
    table = (tmp_path / "results" / "table3.md").read_text()
    for method in ("dsmae-ly", "dsmae-lz", "dsmae"):
        assert f"| {method} | linprobe |" in table
    assert "epochs=1; subset=64" in table and "pre-training 1 epochs" in table
    csv_lines = (tmp_path / "results" / "table3.csv").read_text().splitlines()
    assert csv_lines[0] == "dataset,arch,method,protocol,top1,top1_cls,paper"
    assert len(csv_lines) == 4
    assert "| C10 T | C10 T [CLS] |" in table
    run = tmp_path / "results" / "table3" / "cifar10-vit_tiny-dsmae"
    assert json.loads((run / "last.linprobe.json").read_text())["pool"] == "avg"
    assert json.loads((run / "last.linprobe-cls.json").read_text())["pool"] == "cls"
    capsys.readouterr()

    caplog.clear()
    caplog.set_level(logging.INFO)
    assert main(command) == 0  # everything done: nothing is trained again
    assert caplog.text.count("pre-training already done") == 3
    assert "pre-training dsmae" not in caplog.text
    assert Path(tmp_path / "results" / "table3.md").read_text() == table

    # other evaluation settings: the probes run again, the pre-training does not, and the
    # first results stay, the new ones beside them
    caplog.clear()
    at = command.index("--probe-epochs") + 1
    probe3 = [*command[:at], "3", *command[at + 1 :]]
    assert main(probe3) == 0
    assert caplog.text.count("pre-training already done") == 3
    folder = tmp_path / "results" / "table3" / "cifar10-vit_tiny-dsmae"
    probe = folder / "last.linprobe.json"
    assert json.loads(probe.read_text())["epochs"] == 2
    probes = [json.loads(p.read_text()) for p in sorted(folder.glob("last.linprobe.*.json"))]
    assert [p["epochs"] for p in probes] == [3] and probes[0]["pool"] == "avg"
    assert caplog.text.count("other evaluation settings: evaluating again") == 6
    caplog.clear()
    assert main(probe3) == 0  # found beside the first: not run again
    assert "evaluating again" not in caplog.text

    # any other probe setting (here its learning rate) is a different evaluation too
    caplog.clear()
    assert main([*probe3, "--set", "probe.base_lr=0.05"]) == 0
    assert caplog.text.count("other evaluation settings: evaluating again") == 6
    rates = {
        json.loads(p.read_text())["settings"]["base_lr"] for p in folder.glob("last.linprobe*")
    }
    assert 0.05 in rates and len(list(folder.glob("last.linprobe*.json"))) == 3 * 2

    # another model is another experiment: the grid stops, naming what differs
    capsys.readouterr()
    assert main([*command, "--set", "model.depth=2"]) == 2
    err = capsys.readouterr().err
    assert "pre-trained with other settings (model.depth: 1 -> 2)" in err
    assert "Traceback" not in err


def test_every_data_set_is_checked_before_the_first_cell(tmp_path, capsys):
    results = tmp_path / "results"
    command = ["experiment", "table3", "--archs", "vit_tiny", "--datasets", "cifar10", "stl10",
               "--data", f"cifar10={tmp_path}", "--set", f"data.root={tmp_path / 'none'}",
               "--results", str(results), "--device", "cpu"]  # fmt: skip
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "STL-10 was not found under" in err and "Traceback" not in err
    assert not results.exists()  # nothing ran
