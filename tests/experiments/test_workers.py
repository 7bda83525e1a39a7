"""Cells side by side in worker processes of their own."""

import json
import logging
import os

import pytest
from tiny_grid import run_grid

from dsmae.experiments.workers import CellPool


def test_cells_run_side_by_side_in_worker_processes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    grid = ["--vary", "model.method=mae,dsmae-ly", "--workers", "2"]
    assert run_grid(tmp_path, *grid) == 0
    data = json.loads((tmp_path / "results" / "grid.json").read_text())
    assert [row["values"]["model.method"] for row in data["rows"]] == ["mae", "dsmae-ly"]
    assert "2 workers side by side" in caplog.text
    logs = sorted(p.name for p in (tmp_path / "results" / "logs").glob("worker-*.log"))
    assert logs == ["worker-0.log", "worker-1.log"]
    threads = {cell["threads"] for cell in data["cells"]}
    assert threads == {max(1, (os.cpu_count() or 1) // 2)}


def _square(x: int) -> int:
    return x * x


def _fail(x: int) -> int:
    raise ValueError(f"cell {x} failed")


def test_a_worker_gets_a_cell_only_when_it_is_free(tmp_path):
    seen = []
    with CellPool(2, tmp_path / "logs") as pool:
        for i in range(5):
            pool.submit(i, _square, i)
        for key, result in pool.results():
            assert len(pool._pending) <= 2  # never more cells handed out than workers
            seen.append((key, result))
            if key == 0:
                pool.submit(9, _square, 9)  # a cell that follows from a result
    assert sorted(seen) == [(i, i * i) for i in (0, 1, 2, 3, 4, 9)]


def test_an_error_in_a_cell_stops_the_pool_at_once(tmp_path):
    ran = []
    with pytest.raises(ValueError, match="cell 0 failed"), CellPool(2, tmp_path / "logs") as pool:
        pool.submit(0, _fail, 0)
        for i in range(1, 6):
            pool.submit(i, _square, i)
        for key, _ in pool.results():
            ran.append(key)
    # the cell beside the failed one may have ended (and one more started); the rest never
    assert len(ran) <= 2 and len(pool._waiting) >= 3
