"""A grid's table, JSON and figure, from its cells' results."""

import json

from dsmae.experiments.grid import Cell, GridOutcome, GridSpec
from dsmae.experiments.grid_report import markdown, report, write_report

SPLIT = {"num_val": 10, "num_bank": 80, "num_test": 30, "val_fraction": 0.1}


def _cell(val: float, test: float, probe: float, seconds: float = 10.0) -> dict:
    return {"val_knn": val, "test_knn": test, "test_linprobe": probe, "pretrain_s": seconds,
            "img_per_s": 100.0, "split": SPLIT}  # fmt: skip


def test_the_table_shows_each_choice_with_its_candidates_and_the_seeds_spread(tmp_path):
    spec = GridSpec(vary=(("model.method", ("mae",)), ("train.base_lr", (1e-3, 2e-3))),
                    seeds=2, select="train.base_lr", preset="quickstart")  # fmt: skip
    low, high = (("model.method", "mae"), ("train.base_lr", 1e-3)), (
        ("model.method", "mae"), ("train.base_lr", 2e-3))  # fmt: skip
    cells = {
        Cell(low, 0): _cell(50.0, 99.0, 99.0),  # its test figures never choose
        Cell(high, 0): _cell(60.0, 40.0, 70.0),
        Cell(high, 1): _cell(62.0, 44.0, 74.0),
    }
    outcome = GridOutcome(spec, cells, {(("model.method", "mae"),): 2e-3}, _cell(30, 20, 25))
    data = report(outcome)
    (row,) = data["rows"]
    assert row["selected"] == {"train.base_lr": 2e-3} and row["seeds"] == [0, 1]
    assert row["test_knn"]["mean"] == 42.0 and round(row["test_knn"]["std"], 4) == 2.8284
    assert [c["value"] for c in row["candidates"]] == [1e-3, 2e-3]
    table = markdown(data, "lr")
    assert "| method | chosen base_lr | val k-NN of each candidate (seed 0) |" in table
    assert "| mae | 0.002 | 0.001: 50.00, **0.002: 60.00** | 61.00 ± 1.41 | 42.00 ± 2.83 |" in table
    assert "| random init |  |  | 30.00 | 20.00 | 25.00 | 1 | 0 |  |" in table
    assert "the test split chose nothing" in table
    paths = write_report(outcome, tmp_path, "lr", plot=True)
    assert [p.name for p in paths] == ["lr.md", "lr.json", "lr.png"]
    assert json.loads(paths[1].read_text())["rows"][0]["test_linprobe"]["mean"] == 72.0


def test_a_config_file_shows_below_the_working_folder_when_it_lies_there(tmp_path, monkeypatch):
    (tmp_path / "benchmarks" / "settings").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    below = f"{tmp_path}/benchmarks/study/../settings/a.yaml"
    spec = GridSpec(vary=(("model.lam", (0.5,)),), files=(below, "/elsewhere/b.yaml"))
    outcome = GridOutcome(spec, {Cell((("model.lam", 0.5),), 0): _cell(1, 2, 3)}, {}, None)
    table = markdown(report(outcome), "lam")
    assert "Every cell: config benchmarks/settings/a.yaml; config /elsewhere/b.yaml." in table
