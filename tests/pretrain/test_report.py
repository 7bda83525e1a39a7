"""The run's reports (dsmae.pretrain.report): its epoch lines."""

import logging
import math

from dsmae.config import build_config
from dsmae.pretrain import pretrain


def test_an_epoch_line_reports_its_own_steps_however_few(tmp_path, caplog, tiny_run):
    """4 steps an epoch, a metrics line every 10: each epoch line still has its mean loss
    and rate (not the last metrics line's, which there is none of)."""
    overrides = {**tiny_run.overrides, "train.log_every": 10, "out": str(tmp_path)}
    caplog.set_level(logging.INFO, logger="dsmae.pretrain.report")
    pretrain(build_config(tiny_run.preset, overrides=overrides))
    lines = [r.message for r in caplog.records if r.message.startswith("epoch ")]
    assert len(lines) == 2
    for line in lines:
        loss = float(line.split("loss ")[1].split(",")[0])
        rate = float(line.split(", ")[1].split(" img/s")[0])
        assert math.isfinite(loss) and loss > 0 and rate > 0, line
