"""metrics.jsonl and TensorBoard: what MetricsLog writes, and how read_metrics reads it back."""

import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsmae.metrics import MetricsLog, read_metrics


def test_records_go_to_jsonl_and_numbers_to_tensorboard(tmp_path):
    with MetricsLog(tmp_path, prefix="probe") as log:
        log.write({"step": 1, "loss": 0.5, "note": "text", "bad": math.nan})
        log.write({"step": 2, "loss": 0.25})
        log.add_image("grid", np.zeros((4, 6, 3), dtype=np.uint8), 2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["note"] == "text"
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    tags = board.Tags()
    assert tags["scalars"] == ["probe/loss"]  # strings and NaN are not scalars
    assert [e.value for e in board.Scalars("probe/loss")] == [0.5, 0.25]
    assert tags["images"] == ["probe/grid"]


def test_close_twice_is_harmless_and_a_reopened_log_appends(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    log.close()
    with MetricsLog(tmp_path) as again:
        again.write({"step": 2, "loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_cut_last_line_is_left_out_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert "cut short" in caplog.text


def test_a_damaged_middle_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        read_metrics(path)
