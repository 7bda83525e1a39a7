"""``benchmarks/behaviour_check``: its normalisation (what varies from run to run goes,
what a change of behaviour shows stays) and its comparison of two snapshots. The
snapshots themselves (subprocess runs of the whole command) are not run here."""

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check_module():
    """The package ``benchmarks/behaviour_check``, imported as its ``__main__`` imports it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("behaviour_check")


check = _check_module()
PLACES = {"/tmp/snap": "<OUT>", "/tmp/snap/src": "<SRC>"}


def test_timing_keys_are_the_durations_rates_and_memory_peaks():
    for key in ("wall_s", "img_per_s", "setup_s", "compile_s", "peak_mem_mb", "step_ms", "mfu",
                "matmul_peaks", "pretrain_s"):  # fmt: skip
        assert check.is_timing_key(key), key
    for key in ("loss", "step", "flops", "gflop_per_img", "skipped_steps", "time_budget",
                "knn_top1", "host_syncs_per_step"):  # fmt: skip
        assert not check.is_timing_key(key), key


def test_a_log_line_keeps_its_message_and_level_but_not_its_clock_logger_or_durations():
    line = ("12:01:02 INFO dsmae.engine: epoch 1/3: loss 0.7729, 1506 img/s, 1 s elapsed, "
            "ETA 3 s")  # fmt: skip
    assert check.normalise_line(line, PLACES) == (
        "INFO: epoch 1/3: loss 0.7729, <t>, <t> elapsed, ETA <t>"
    )
    # a module that moves changes no line; sizes, counts and percentages stay
    moved = "06:07:01 INFO dsmae.pretrain.loop: pretrain split of digits: 256 images of (1, 8, 8)"
    assert check.normalise_line(moved, PLACES) == (
        "INFO: pretrain split of digits: 256 images of (1, 8, 8)"
    )
    probe = "linear probe top-1, pre-trained encoder: 25.61%"
    assert check.normalise_line(probe, PLACES) == probe
    assert check.normalise_line("pre-training took 12 s", PLACES) == "pre-training took <t>"
    assert check.normalise_line("WARNING dsmae.x: done in 0.5 ms", PLACES) == "WARNING: done in <t>"


def test_paths_of_the_snapshot_become_marks_the_longest_first():
    line = "checkpoint: /tmp/snap/runs/dsmae/last.pt (code /tmp/snap/src/dsmae/cli.py)"
    assert check.normalise_line(line, PLACES) == (
        "checkpoint: <OUT>/runs/dsmae/last.pt (code <SRC>/dsmae/cli.py)"
    )


def test_progress_bars_go_and_json_lines_lose_their_timing_keys():
    text = "\r 10%|#   | 1/10\r100%|####| 10/10\nkept line\n" + json.dumps(
        {"method": "dsmae", "step_ms": 11.2, "img_per_s": 715.0, "gflop_per_img": 0.007}
    )
    assert check.normalise_lines(text, PLACES) == [
        "kept line",
        '{"gflop_per_img": 0.007, "method": "dsmae"}',
    ]


def test_json_values_lose_timing_keys_at_any_depth_and_their_run_id():
    raw = {"run_id": "f55232d4e6da", "step": 8, "wall_s": 1.5, "checkpoint": "/tmp/snap/a.pt",
           "records": [{"loss": 0.5, "img_per_s": 10.0}],
           "parts": {"setup_s": 2.0, "x": 1}}  # fmt: skip
    assert check.normalise_json(raw, PLACES) == {
        "run_id": "<run_id>", "step": 8, "checkpoint": "<OUT>/a.pt",
        "records": [{"loss": 0.5}], "parts": {"x": 1},
    }  # fmt: skip


def test_the_plotted_copy_of_a_run_has_fixed_timing_values():
    records = [{"step": 5, "loss": 0.7, "img_per_s": 1506.3, "wall_s": 1.5, "skipped_steps": 0},
               {"step": 8, "knn_top1": 55.0, "wall_s": 1.6}]  # fmt: skip
    assert check.freeze_timings(records) == [
        {"step": 5, "loss": 0.7, "img_per_s": 1005.0, "wall_s": 1005.0, "skipped_steps": 0},
        {"step": 8, "knn_top1": 55.0, "wall_s": 1008.0},
    ]


def test_differences_name_the_key_path_and_both_values():
    before = {"steps": {"a": {"returncode": 0, "files": {"m": [{"loss": 1.0}, {"loss": 2.0}]}}}}
    after = {"steps": {"a": {"returncode": 0, "files": {"m": [{"loss": 1.0}, {"loss": 2.5}]}},
                       "b": {"returncode": 0}}}  # fmt: skip
    found = check.differences(before, after)
    assert [(d.path, d.before, d.after) for d in found] == [
        ("steps/a/files/m[1]/loss", 2.0, 2.5),
        ("steps/b", check.MISSING, {"returncode": 0}),
    ]
    assert check.differences(before, json.loads(json.dumps(before))) == []
    assert check.differences({"x": math.nan}, {"x": math.nan}) == []  # NaN is NaN
    assert check.differences([1, 2], [1]) == [check.Difference("[1]", 2, check.MISSING)]


def test_printed_lines_are_compared_as_a_diff():
    before = {"stdout": ["a", "b", "c", "d"]}
    after = {"stdout": ["a", "x", "b", "c"]}
    found = check.differences(before, after)
    assert [(d.path, d.before, d.after) for d in found] == [
        ("stdout[1:1]", [], ["x"]),
        ("stdout[3:4]", ["d"], []),
    ]


def test_counts_per_kind_and_allowed_prefixes():
    snapshot = {
        "steps": {
            "print-config/quickstart": {"command": ["pretrain"], "returncode": 0,
                                        "stdout": ["model:", "  depth: 4"], "stderr": []},
            "dsmae/pretrain": {"command": ["pretrain", "--out", "runs/dsmae"], "returncode": 0,
                               "stdout": ["done"], "stderr": [],
                               "files": {"runs/dsmae": {"kind": "folder", "data": {
                                   "metrics.jsonl": {"kind": "metrics",
                                                     "data": [{"step": 1, "loss": 0.5}]},
                                   "denoise.png": {"kind": "sha256", "data": "ab"}}}}},
        }
    }  # fmt: skip
    counts = check.count_items(snapshot)
    assert counts["print-config lines"] == 2 and counts["printed lines"] == 1
    assert counts["metrics"] == 2 and counts["sha256"] == 1 and counts["returncode"] == 2
    difference = check.Difference("steps/print-config/quickstart/stdout[1:2]", [], [])
    assert check.allowed(difference, ["steps/print-config/quickstart"])
    assert not check.allowed(difference, ["steps/print-config/cifar10"])


def test_compare_fails_on_a_difference_unless_it_is_allowed(tmp_path, capsys):
    before = {"steps": {"print-config/quickstart": {"stdout": ["epochs: 40"]}}}
    after = {"steps": {"print-config/quickstart": {"stdout": ["epochs: 30"]}}}
    for name, value in (("before", before), ("after", after)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "behaviour.json").write_text(json.dumps(value))
    assert check.compare(tmp_path / "before", tmp_path / "after", []) == 1
    out = capsys.readouterr().out
    assert "steps/print-config/quickstart/stdout[0:1]" in out and '["epochs: 30"]' in out
    assert check.compare(tmp_path / "before", tmp_path / "after",
                         ["steps/print-config/quickstart"]) == 0  # fmt: skip
    assert "no difference (1 allowed)" in capsys.readouterr().out
    assert check.compare(tmp_path / "before", tmp_path / "before/behaviour.json", []) == 0


def test_a_resumed_run_is_compared_from_its_step_on():
    def folder(steps, last):
        return {"metrics.jsonl": {"kind": "metrics",
                                  "data": [{"step": s, "loss": s / 10} for s in steps]},
                "last.pt": {"kind": "checkpoint", "data": {"model": {"w": last}}}}  # fmt: skip

    uninterrupted = folder([5, 8, 12], "sha256:1")
    uninterrupted["checkpoint-00000004.pt"] = {"kind": "checkpoint", "data": {}}
    assert check.resumed_differences(uninterrupted, folder([5, 8, 12], "sha256:1"), 4) == []
    assert check.resumed_differences(uninterrupted, folder([8, 12], "sha256:1"), 4) != []
    found = check.resumed_differences(uninterrupted, folder([5, 8, 12], "sha256:2"), 4)
    assert [d.path for d in found] == ["last.pt/data/model/w"]
    assert check.resumed_differences(uninterrupted, folder([5, 8, 12], "sha256:1"), 12) != []


def test_every_method_is_pre_trained_and_two_are_evaluated_by_every_command():
    steps = check.snapshot_steps(["quickstart", "cifar10-vit-tiny"], onnx=True)
    names = [s.name for s in steps]
    assert len(names) == len(set(names))
    assert names[:3] == ["print-config/(none)", "print-config/quickstart",
                         "print-config/cifar10-vit-tiny"]  # fmt: skip
    for method in check.METHODS:
        assert f"{method}/pretrain" in names
    for method in ("dsmae", "mae"):
        for command in ("linprobe-fast", "linprobe-mae", "knn", "finetune", "denoise",
                        "export", "export-onnx", "features", "plot"):  # fmt: skip
            assert f"{method}/{command}" in names
    plot = steps[names.index("dsmae/plot")]
    assert plot.frozen_run == ("runs/dsmae", "plot-runs/dsmae") and "plot-runs/dsmae" in plot.args
    mae_knn = steps[names.index("mae/knn")]
    assert mae_knn.args[:3] == ("knn", "--checkpoint", "runs/mae/last.pt")
    assert "export-onnx" not in str(check.snapshot_steps([], onnx=False))
