"""The contract every evaluation protocol shares: its config, its splits, its result."""

import dataclasses
import json

import pytest
import torch

from dsmae.config import FinetuneConfig, ProbeConfig, build_config
from dsmae.data.sources import DataError, ImageTensors
from dsmae.evaluation.finetune import FinetuneResult
from dsmae.evaluation.knn import KnnResult
from dsmae.evaluation.linprobe import ProbeResult
from dsmae.evaluation.results import (
    EvalResult,
    best_epoch,
    evaluation_config,
    evaluation_settings,
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
    assert sorted(cls.keys) == sorted(f.name for f in dataclasses.fields(cls))


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
    assert json.loads(text) == dataclasses.asdict(result)
    variant = _knn(tmp_path, pool="cls", random_init=True)
    assert variant.save() == tmp_path / "last.knn-cls-random-init.json"


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


def test_evaluation_config_sets_dotted_keys_as_given():
    cfg = build_config("quickstart")
    changed = evaluation_config(cfg, {"probe.epochs": 0, "data.source": "/x", "train.seed": 3})
    assert (changed.probe.epochs, changed.data.source, changed.train.seed) == (0, "/x", 3)
    assert changed.data.mean == cfg.data.mean and changed.model == cfg.model
    assert cfg.probe.epochs != 0 and cfg.data.source == "digits"  # the original is untouched
    assert evaluation_config(cfg, {}) == cfg
    with pytest.raises(TypeError):
        evaluation_config(cfg, {"probe.epoch": 3})


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
