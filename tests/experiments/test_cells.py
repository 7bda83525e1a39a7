"""What every grid's cells share: the wall time of a pre-training from its metric lines."""

import json

from dsmae.experiments.cells import pretraining_seconds


def test_pretraining_seconds_by_hand(tmp_path):
    """Batch 10: 4 steps at 20 img/s (2 s), 4 more at 40 img/s (1 s); a monitor line (no
    rate) in between; a line past the step asked for counts pro rata."""
    lines = [
        {"step": 4, "img_per_s": 20.0},
        {"step": 4, "epoch": 1, "knn_top1": 50.0},
        {"step": 8, "img_per_s": 40.0},
        {"step": 12, "img_per_s": 10.0},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert pretraining_seconds(metrics, 8, batch=10) == 2.0 + 1.0
    assert pretraining_seconds(metrics, 10, batch=10) == 2.0 + 1.0 + 2 * 10 / 10.0
