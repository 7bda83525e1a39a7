"""``benchmarks/gap_curves``: the curves study's whole flow, shrunk (its ``smoke``
setting), with two worker processes sharing one queue: every pre-training and evaluation
once, the table, the JSON and the figure; run again, it redoes nothing."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _study(folder: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks/gap_curves"), "run", "--setting",
               "smoke", "--data", str(folder), "--out", str(out), "--epochs", "4",
               "--checkpoints", "2", "4", "--spread-epoch", "2", "--seeds", "2",
               "--figure", str(out / "copy.png")]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _started(out: Path) -> int:
    """How many tasks the workers of the study in ``out`` have started, in all."""
    lines = [line for p in out.glob("worker-*.log") for line in p.read_text().splitlines()]
    return sum(line.endswith(": start") for line in lines)


def test_the_study_runs_each_task_once_and_reports_every_number(cifar_folder, tmp_path):
    out = tmp_path / "study"
    done = _study(cifar_folder, out)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    variants = ["mae", "dsmae-ly", "dsmae-lz", "dsmae", "dsmae-step"]
    assert list(report["curves"]) == variants and list(report["spread"]) == variants
    for variant in variants:
        curve = report["curves"][variant]
        assert [p["epoch"] for p in curve] == [2, 4]
        assert curve[0]["pretrain_s"] < curve[1]["pretrain_s"]  # wall time grows
        assert curve[1]["images_seen"] == 2 * curve[0]["images_seen"] == 4 * 64
        assert len(report["spread"][variant]["linprobe"]["values"]) == 2  # two seeds
    assert report["random_init"]["epoch"] == 0
    # the per-step teacher is another run than the per-epoch one
    configs = [(out / f"runs/{v}-seed0/config.yaml").read_text() for v in ("dsmae", "dsmae-step")]
    assert "ema_every: epoch" in configs[0] and "ema_every: step" in configs[1]
    # seed 1 stopped at the spread epoch of the same 4-epoch schedules
    seed1 = json.loads((out / "done/train-dsmae-seed1-epoch2.json").read_text())
    assert seed1["checkpoint"].endswith("checkpoint-00000004.pt")
    assert (out / "gap_curves.png").stat().st_size > 10_000 and (out / "copy.png").is_file()
    assert "| dsmae-step |" in (out / "results.md").read_text()
    assert _started(out) == 26  # 10 pre-trainings, 16 evaluations, in 2 workers
    again = _study(cifar_folder, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _started(out) == 26  # nothing was done twice
    assert json.loads((out / "results.json").read_text()) == report
