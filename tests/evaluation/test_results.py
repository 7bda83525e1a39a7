"""The contract every evaluation protocol shares: its config, its splits, its result."""

import dataclasses
import json

import pytest
import torch

from dsmae.config import ConfigError, FinetuneConfig, ProbeConfig, build_config
from dsmae.data.images import DataError, ImageTensors
from dsmae.evaluation.finetune import FinetuneResult
from dsmae.evaluation.knn import KnnResult
from dsmae.evaluation.linprobe import ProbeResult
from dsmae.evaluation.results import (
    EvalResult,
    best_epoch,
    evaluation_settings,
    find_result,
    labelled_splits,
    result_path,
)

RESULTS = (KnnResult, ProbeResult, FinetuneResult)
# the JSON objects every result file held before the results shared one base class
JSON_KEYS = {
    KnnResult: ["top1", "k", "temperature", "pool", "num_train", "num_test", "num_classes",
                "data", "random_init", "checkpoint"],
    ProbeResult: ["top1", "best_top1", "best_epoch", "epochs", "pool", "recipe", "num_train",
                  "num_test", "num_classes", "data", "random_init", "checkpoint", "settings"],
    FinetuneResult: ["top1", "best_top1", "best_epoch", "epochs", "num_train", "num_test",
                     "num_classes", "data", "random_init", "checkpoint", "pool", "settings",
                     "history"],
}  # fmt: skip


@pytest.mark.parametrize("cls", RESULTS)
def test_every_result_writes_every_field_once_in_its_order(cls):
    assert issubclass(cls, EvalResult)
    assert list(cls.keys) == JSON_KEYS[cls]
    # every field it is made with; ``saved`` (where it was written, if it was) is no result
    made_with = [f.name for f in dataclasses.fields(cls) if f.init]
    assert sorted(cls.keys) == sorted(made_with)
    assert [f.name for f in dataclasses.fields(cls) if not f.init] == ["saved"]


def _knn(tmp_path, **changes) -> KnnResult:
    fields = dict(top1=50.0, k=20, temperature=0.07, pool="avg", num_train=8, num_test=4,
                  num_classes=2, data="digits", random_init=False,
                  checkpoint=str(tmp_path / "last.pt"))  # fmt: skip
    return KnnResult(**{**fields, **changes})


def test_a_result_is_saved_beside_its_checkpoint(tmp_path):
    result = _knn(tmp_path)
    assert result.save() == result.path == tmp_path / "last.knn.json"
    text = result.path.read_text()
    assert text.endswith("}\n") and list(json.loads(text)) == JSON_KEYS[KnnResult]
    assert json.loads(text) == result.to_dict() and result.saved == result.path
    variant = _knn(tmp_path, pool="cls", random_init=True)
    assert variant.save() == tmp_path / "last.knn-cls-random-init.json"


def test_results_of_other_settings_are_kept_beside_each_other(tmp_path):
    first = _knn(tmp_path)
    assert first.save() == tmp_path / "last.knn.json"
    again = _knn(tmp_path, top1=51.0)  # the same evaluation made again: replaces it
    assert again.save() == first.path and json.loads(first.path.read_text())["top1"] == 51.0
    other = _knn(tmp_path, k=5, top1=40.0)  # another vote: beside it, never over it
    beside = other.save()
    assert beside != first.path and beside.name.startswith("last.knn.")
    assert json.loads(first.path.read_text())["k"] == 20
    assert json.loads(beside.read_text())["k"] == 5
    assert _knn(tmp_path, k=5, top1=41.0).save() == beside  # and found there again
    assert find_result(first.path, other.identity())["top1"] == 41.0
    assert find_result(first.path, _knn(tmp_path, k=9).identity()) is None
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_result_paths():
    assert str(result_path("runs/a/last.pt", "linprobe")) == "runs/a/last.linprobe.json"
    path = result_path("x/ck.pt", "finetune", random_init=True, pool="cls")
    assert path.name == "ck.finetune-cls-random-init.json"
    assert result_path("ck.pt", "knn", pool="avg").name == "ck.knn.json"


def test_the_last_epoch_is_the_result_and_the_first_best_is_beside_it():
    assert best_epoch([10.0, 30.0, 20.0, 30.0]) == (30.0, 2)
    fields = ProbeResult.trained_fields([10.0, 30.0, 20.0], ProbeConfig(epochs=3), "digits")
    assert fields == {"top1": 20.0, "best_top1": 30.0, "best_epoch": 2, "epochs": 3,
                      "settings": evaluation_settings(ProbeConfig(epochs=3), "digits")}  # fmt: skip


def test_settings_leave_out_how_and_when_an_evaluation_runs():
    probe = evaluation_settings(ProbeConfig(epochs=7), "digits")
    assert probe["epochs"] == 7 and probe["data"] == "digits"
    assert "after_pretrain" not in probe and "random_baseline" not in probe
    finetune = evaluation_settings(FinetuneConfig(workers=3), "/data/x")
    assert "workers" not in finetune and finetune["pool"] == "avg"


def test_a_checkpoints_config_takes_dotted_keys_and_refuses_impossible_ones():
    cfg = build_config("quickstart")
    changes = {"probe.epochs": 5, "data.source": "/x", "train.seed": 3}
    changed = build_config(base=cfg, overrides=changes)
    assert (changed.probe.epochs, changed.data.source, changed.train.seed) == (5, "/x", 3)
    assert changed.data.mean == cfg.data.mean and changed.model == cfg.model
    assert cfg.probe.epochs != 5 and cfg.data.source == "digits"  # the original is untouched
    assert build_config(base=cfg, overrides={}) == cfg
    for changes, key in (({"probe.epochs": 0}, "probe.epochs"), ({"monitor.knn_k": -1},
                         "monitor.knn_k"), ({"probe.base_lr": -0.1}, "probe.base_lr")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^{key}: must be") as refused:
            build_config(base=cfg, overrides=changes)
        assert refused.value.key == key  # for the command line to name its flag
    with pytest.raises(ConfigError, match=r"unknown config key 'probe\.epoch'"):
        build_config(base=cfg, overrides={"probe.epoch": 3})
    with pytest.raises(ConfigError, match=r"model\.depth: fixed by the checkpoint"):
        build_config(base=cfg, overrides={"model.depth": 3})


def test_labelled_splits_count_what_a_result_was_measured_on(tmp_path):
    cfg = build_config("quickstart")
    splits = labelled_splits(cfg.data, cfg.model, "a test")
    assert (len(splits.train), len(splits.test), splits.data) == (1348, 449, "digits")

    class Read:
        path = tmp_path / "last.pt"

    measured = splits.measured_on(Read(), random_init=True)
    assert measured == {"num_train": 1348, "num_test": 449, "num_classes": 10,
                        "data": "digits", "random_init": True,
                        "checkpoint": str(tmp_path / "last.pt")}  # fmt: skip


def test_splits_without_labels_are_refused(tmp_path, monkeypatch):
    import dsmae.evaluation.results as results

    unlabelled = ImageTensors(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, -1]), ())
    monkeypatch.setattr(results, "load_split", lambda *args: unlabelled)
    cfg = build_config("quickstart")
    with pytest.raises(DataError, match="the train split of digits has unlabelled images; a "):
        labelled_splits(cfg.data, cfg.model, "a test")


def test_a_result_that_cannot_be_written_is_printed_and_said_before_any_work(
    digits_run, small_file_system
):
    # the checkpoint on a real read-only file system: nothing can be written beside it
    done = small_file_system(f"""
        cp {digits_run / "last.pt"} "$MNT/last.pt" && mount -o remount,ro "$MNT" || exit 97
        "$PYTHON" -m dsmae knn --checkpoint "$MNT/last.pt" --device cpu; echo "knn: $?"
        "$PYTHON" -m dsmae linprobe --checkpoint "$MNT/last.pt" --device cpu --epochs 2
        echo "linprobe: $?"
        "$PYTHON" -m dsmae finetune --checkpoint "$MNT/last.pt" --device cpu --epochs 1 \
            --batch-size 32 --set finetune.workers=0; echo "finetune: $?"
    """, size="16m")  # fmt: skip
    out, err = done.stdout, done.stderr
    assert "knn: 0" in out and "linprobe: 0" in out and "finetune: 0" in out, (out, err[-3000:])
    assert "Traceback" not in err
    logged_at_the_end = {"knn": "k-NN top-1", "linprobe": "linear probe (fast recipe)",
                         "finetune": "fine-tune"}  # fmt: skip
    for protocol, logged in logged_at_the_end.items():
        said = f"the result cannot be written to $MNT/last.{protocol}.json"
        warning = err.index(f"last.{protocol}.json (Read-only file system): it will be printed")
        assert warning < err.index(logged), said  # said before the work, not after it
        printed = next(line for line in out.splitlines() if f"last.{protocol}.json):" in line)
        result = json.loads(printed.split("): ", 1)[1])
        assert result["top1"] > 0 and result["checkpoint"].endswith("last.pt")
    assert out.index("k-NN top-1") < out.index("last.knn.json):")  # the usual line first


def test_a_result_whose_write_fails_at_the_end_is_printed_whole(digits_run, monkeypatch, capsys):
    import errno
    import os

    import dsmae.evaluation.results as results
    from dsmae.cli import main

    def disk_full(path, text, what="file"):
        raise results.WriteError(f"could not write {what} {path}: {os.strerror(errno.ENOSPC)}")

    monkeypatch.setattr(results, "atomic_write_text", disk_full)
    checkpoint = str(digits_run / "last.pt")
    assert main(["knn", "--checkpoint", checkpoint, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("result (not saved"))
    assert json.loads(line.split("): ", 1)[1])["k"] == 20
