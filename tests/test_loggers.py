"""Weights & Biases and MLflow beside TensorBoard (``log.wandb``, ``log.mlflow``): the same
scalars, images and config, read back from W&B's offline run files and from an MLflow
file store; a missing extra is one line naming its pip command."""

import io
import json
import math
import re
import struct
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsmae.cli import main
from dsmae.config import ConfigError, LogConfig, build_config
from dsmae.loggers import IDS_FILE, flat_config
from dsmae.metrics import MetricsLog, read_metrics

# a tiny pre-training: 128 real digits, a 1-block ViT, one epoch of 4 steps, every step
# logged, the k-NN, health and image monitors after the epoch
TINY = [
    "pretrain", "--preset", "quickstart", "--patch-size", "4", "--batch-size", "32",
    "--set", "data.subset=128", "--set", "model.depth=1", "--set", "model.embed_dim=32",
    "--set", "model.num_heads=2", "--set", "model.decoder_depth=1",
    "--set", "model.regressor_depth=1", "--epochs", "1", "--set", "probe.after_pretrain=false",
    "--device", "cpu", "--set", "train.log_every=1", "--set", "monitor.knn_every=1",
    "--set", "monitor.images_every=1",
]  # fmt: skip


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B in offline mode, its files under the returned folder; its server address a
    closed local port, so that nothing could reach the network even if it tried."""
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return folder


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tracking URI of an MLflow file store in the test's folder (MLflow 3 wants
    ``MLFLOW_ALLOW_FILE_STORE`` for one)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file:{tmp_path / 'mlruns'}"


def _scalars(records: list[dict[str, Any]], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard gets of ``metrics.jsonl``'s records: tag -> [(step, value)]."""
    tags = defaultdict(list)
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                tags[f"{prefix}/{key}"].append((record["step"], value))
    return dict(tags)


def _ids(folder: Path) -> dict[str, str]:
    return json.loads((folder / IDS_FILE).read_text())


# ------------------------------------------------------------ reading W&B's offline files


def _wandb_records(path: Path) -> Any:
    """The protobuf records of a W&B run file (``run-ID.wandb``): a LevelDB-style log, a
    7-byte header (``:W&B``, magic 0xBEE1, version) then 32 KiB blocks of chunks, each with
    a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B run file"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _wandb_run(folder: Path, run_id: str) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The config and the history rows (step -> tag -> value) of the offline run ``run_id``,
    over every process that wrote a part of it (one folder each). W&B's service writes the
    files behind the runs' ``finish()``: its teardown waits for them."""
    import wandb

    wandb.teardown()
    config: dict[str, Any] = {}
    rows: dict[int, dict[str, Any]] = defaultdict(dict)
    for run_file in sorted(folder.glob(f"wandb/offline-run-*/run-{run_id}.wandb")):
        for record in _wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind in ("run", "config"):
                items = record.run.config.update if kind == "run" else record.config.update
                config.update({item.key: json.loads(item.value_json) for item in items})
            elif kind == "history":
                _add_history(rows[record.history.step.num], record.history.item)
    return config, dict(rows)


def _add_history(row: dict[str, Any], items: Any) -> None:
    """The items of a W&B history record into ``row``; an image's fields (its nested keys)
    as a dict under its tag."""
    for item in items:
        *parents, leaf = [item.key] if item.key else item.nested_key
        node = row
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(item.value_json)


def _tensorboard_image(out: Path, tag: str) -> np.ndarray:
    """The one image TensorBoard holds under ``tag``, as (H, W, 3) uint8."""
    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    board.Reload()
    (event,) = board.Images(tag)
    return _pixels(io.BytesIO(event.encoded_image_string))


def _pixels(png: Any) -> np.ndarray:
    return np.asarray(Image.open(png).convert("RGB"))


# ------------------------------------------------------------ the log section


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"log.wandb": "yes"}, "log.wandb must be true or false, got 'yes'"),
        ({"log.wandb_project": "team/dsmae"}, "log.wandb_project: must be a name without"),
        ({"log.mlflow": " "}, "log.mlflow: must be a tracking URI such as http://host:5000"),
        ({"log.mlflow": True}, "log.mlflow must be a string, got True"),
        ({"log.mlflow_experiment": ""}, "log.mlflow_experiment: must name an experiment"),
    ],
)
def test_impossible_log_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(overrides=overrides)


def test_the_trackers_are_off_by_default_and_a_uri_is_read_as_given():
    assert build_config().log == LogConfig(wandb=False, mlflow=None)
    cfg = build_config(overrides={"log.mlflow": "http://host:5000", "log.wandb": True})
    assert cfg.log.mlflow == "http://host:5000" and cfg.log.wandb


@pytest.mark.parametrize(
    ("package", "overrides"), [("wandb", {"log.wandb": True}), ("mlflow", {"log.mlflow": "x"})]
)
def test_a_missing_extra_names_its_pip_command_before_anything_starts(
    package, overrides, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` fails as if absent
    cfg = build_config(overrides=overrides)
    message = f'log.{package} needs the {package} package: pip install "dsmae[{package}]"'
    with pytest.raises(ConfigError, match=re.escape(message)):
        MetricsLog(tmp_path, config=cfg)
    assert list(tmp_path.iterdir()) == []  # no metrics, no TensorBoard, no run ids


def test_the_command_reports_a_missing_extra_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main([*TINY, "--set", "log.wandb=true", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    line = 'dsmae pretrain: error: log.wandb needs the wandb package: pip install "dsmae[wandb]"'
    assert line in err.splitlines() and "Traceback" not in err


# ------------------------------------------------------------ W&B, offline


def test_wandb_offline_run_holds_the_scalars_images_and_config(tmp_path, wandb_offline):
    out = tmp_path / "run"
    assert main([*TINY, "--set", "log.wandb=true", "--out", str(out)]) == 0
    records = read_metrics(out / "metrics.jsonl")
    run_id = _ids(out)["wandb"]
    config, rows = _wandb_run(wandb_offline, run_id)

    expected: dict[int, dict[str, float]] = defaultdict(dict)  # rows at one step merge
    for tag, points in _scalars(records, "pretrain").items():
        for step, value in points:
            expected[step][tag] = value
    logged = {step: {k: v for k, v in row.items() if k.startswith("pretrain/")}
              for step, row in rows.items()}  # fmt: skip
    image = logged[4].pop("pretrain/denoise")
    assert logged == expected
    assert [row["pretrain/loss"] for row in logged.values()] == [r["loss"] for r in records[:4]]
    assert len(records) == 5 and "knn_top1" in records[-1]  # 4 steps, then the monitor

    assert image["_type"] == "image-file"
    (png,) = wandb_offline.glob(f"wandb/offline-run-*/files/{image['path']}")
    assert np.array_equal(_pixels(png), _tensorboard_image(out, "pretrain/denoise"))

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert {key: config[key] for key in saved} == saved
    assert config["log"]["wandb"] is True and config["model"]["depth"] == 1


# ------------------------------------------------------------ MLflow, file store


def test_mlflow_run_holds_the_scalars_images_and_config(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    assert main([*TINY, "--set", f"log.mlflow={mlflow_store}", "--out", str(out)]) == 0
    records = read_metrics(out / "metrics.jsonl")
    client = MlflowClient(mlflow_store)
    run = client.get_run(_ids(out)["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "dsmae"

    losses = client.get_metric_history(run.info.run_id, "pretrain/loss")
    assert [(m.step, m.value) for m in losses] == [(r["step"], r["loss"]) for r in records[:4]]
    scalars = _scalars(records, "pretrain")
    assert set(run.data.metrics) == set(scalars)
    for tag, points in scalars.items():
        history = client.get_metric_history(run.info.run_id, tag)
        assert sorted((m.step, m.value) for m in history) == sorted(points), tag

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert run.data.params == {key: str(value) for key, value in flat_config(saved).items()}
    assert run.data.params["model.depth"] == "1" and run.data.params["log.mlflow"] == mlflow_store
    artifact = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert Path(artifact).read_text() == (out / "config.yaml").read_text()
    images = client.list_artifacts(run.info.run_id, "images")
    (png,) = [a.path for a in images if a.path.endswith(".png")]
    assert png.startswith("images/pretrain~denoise+step+4+")  # MLflow's tag~name+step+N+...
    png = client.download_artifacts(run.info.run_id, png, str(tmp_path))
    assert np.array_equal(_pixels(png), _tensorboard_image(out, "pretrain/denoise"))

    # fine-tuning the checkpoint logs to a run of its own, by the checkpoint's log section
    tune = ["finetune", "--checkpoint", str(out / "last.pt"), "--epochs", "1", "--batch-size",
            "64", "--set", "finetune.warmup_epochs=0", "--set", "finetune.workers=0",
            "--device", "cpu", "--out", str(tmp_path / "ft")]  # fmt: skip
    assert main(tune) == 0
    tuned = _ids(tmp_path / "ft")["mlflow"]
    assert tuned != run.info.run_id
    (line,) = read_metrics(tmp_path / "ft" / "metrics.jsonl")
    (top1,) = client.get_metric_history(tuned, "finetune/top1")
    assert (top1.step, top1.value) == (line["step"], line["top1"])


# ------------------------------------------------------------ resuming


def test_a_resumed_run_continues_the_trackers_runs_and_a_fresh_one_starts_new_ones(
    tmp_path, wandb_offline, mlflow_store
):
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "run"
    both = {"log.wandb": True, "log.mlflow": mlflow_store}
    with MetricsLog(folder, config=build_config(overrides=both)) as metrics:
        metrics.write({"step": 1, "loss": 2.0})
    first = _ids(folder)
    changed = build_config(overrides={**both, "train.log_every": 1})  # resumable
    with MetricsLog(folder, purge_step=2, config=changed) as metrics:
        metrics.write({"step": 2, "loss": 1.0})
    assert _ids(folder) == first

    client = MlflowClient(mlflow_store)
    run = client.get_run(first["mlflow"])
    history = client.get_metric_history(first["mlflow"], "pretrain/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.log_every"] == "10"  # MLflow keeps a param's first value
    artifact = client.download_artifacts(first["mlflow"], "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(artifact).read_text())["train"]["log_every"] == 1
    parts = list(wandb_offline.glob(f"wandb/offline-run-*/run-{first['wandb']}.wandb"))
    assert len(parts) == 2  # offline, each resumption writes its own part (for `wandb sync`)
    rows = _wandb_run(wandb_offline, first["wandb"])[1]
    assert {step: row["pretrain/loss"] for step, row in rows.items()} == {1: 2.0, 2: 1.0}

    with MetricsLog(folder, config=changed):
        fresh = _ids(folder)
    assert fresh.keys() == first.keys() and not set(fresh.values()) & set(first.values())
    with MetricsLog(folder, config=build_config()):
        pass
    assert not (folder / IDS_FILE).exists()
