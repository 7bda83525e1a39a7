"""Weights & Biases and MLflow beside TensorBoard (``log.wandb``, ``log.mlflow``): the same
scalars, images and config, read back from W&B's offline run files and from an MLflow
file store; a missing extra is one line naming its pip command, and so is a tracker server
that does not answer when the run starts. A tracker that fails or stalls mid-run (fakes
fed through :class:`~dsmae.loggers.Sender`) is warned about and never holds up training."""

import io
import json
import logging
import math
import re
import socket
import struct
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsmae.cli import main
from dsmae.config import ConfigError, LogConfig, build_config
from dsmae.loggers import IDS_FILE, Sender, check_reachable, flat_config
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


@pytest.fixture
def closed_url(monkeypatch: pytest.MonkeyPatch) -> str:
    """An http://127.0.0.1 address where nothing listens (a port the system has just handed
    out and taken back), asked directly, never through a proxy."""
    _no_proxy(monkeypatch)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local requests go straight to their port (a proxy would answer for a closed one)."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


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


# ------------------------------------------------------------ a server that does not answer


def _refusal(folder: Path, overrides: dict[str, Any]) -> str:
    """The message of the :class:`ConfigError` that opening the metrics log of ``overrides``
    raises, within seconds; nothing is left in ``folder``."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as refusal:
        MetricsLog(folder, config=build_config(overrides=overrides))
    assert time.monotonic() - started < 15
    assert list(folder.iterdir()) == []  # no metrics, no TensorBoard, no run ids
    return str(refusal.value)


def test_an_mlflow_server_that_does_not_answer_is_refused_within_seconds(tmp_path, closed_url):
    message = _refusal(tmp_path / "run", {"log.mlflow": closed_url})
    assert message.startswith("log.mlflow: ") and "cannot be reached" in message
    assert closed_url in message


def test_a_wandb_server_that_does_not_answer_is_refused_within_seconds(
    tmp_path, monkeypatch, closed_url
):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", closed_url)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    message = _refusal(tmp_path / "run", {"log.wandb": True})
    assert message.startswith("log.wandb: ") and "cannot be reached" in message
    assert closed_url in message


def test_the_command_refuses_an_unreachable_tracker_in_one_line_before_the_first_step(
    tmp_path, closed_url, capsys
):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out), "--set", f"log.mlflow={closed_url}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsmae pretrain: error: log.mlflow") and err.count("\n") == 1
    assert "cannot be reached" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() and list(out.glob("*.pt")) == []


@contextmanager
def _local_server(status: int, api: str = "same") -> Iterator[str]:
    """An http://127.0.0.1 server that answers every request with ``status``; its address.
    ``api``: what it does on ``/api/...`` paths (an MLflow server's API): "same", "fail"
    (HTTP 500) or "hang" (takes the request and never answers)."""
    release = threading.Event()

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status
            if self.path.startswith("/api/") and api != "same":
                if api == "hang":
                    release.wait(60)
                    return
                code = 500
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_server_that_answers_is_reachable_even_with_an_error_status(monkeypatch):
    _no_proxy(monkeypatch)
    for status in (200, 404, 500):
        with _local_server(status) as url:
            check_reachable(url, "MLflow tracking", "log.mlflow", timeout=5)
    for status in (502, 503, 504):  # a proxy's answer for a server it cannot reach
        with _local_server(status) as url, pytest.raises(ConfigError, match=f"HTTP {status}"):
            check_reachable(url, "MLflow tracking", "log.mlflow", timeout=5)


def test_a_server_that_takes_the_connection_but_never_answers_is_refused_in_time(monkeypatch):
    _no_proxy(monkeypatch)
    with socket.socket() as silent:  # listens, so connections open, but never reads
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"log\.mlflow: the MLflow tracking server at"):
            check_reachable(url, "MLflow tracking", "log.mlflow", timeout=0.5)
        assert time.monotonic() - started < 2.5


# ------------------------------------------------------------ a tracker that fails or stalls

HOLD_SECONDS = 30.0  # the most a held fake call waits: a Sender that blocked fails, not hangs


class _FakeTracker:
    """A tracker that keeps its calls; with ``hold``, each call waits until it is set (a
    slow or stalled server); with ``fail_from``, ``scalars`` raises from that call on."""

    name = "fake"
    run_id = "run-1"

    def __init__(self, hold: threading.Event | None = None, fail_from: int | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.hold, self.fail_from = hold, fail_from
        self.waiting = threading.Event()  # set when a call waits on `hold`

    def _called(self, *call: Any) -> None:
        self.calls.append(call)
        if self.hold is not None:
            self.waiting.set()
            self.hold.wait(HOLD_SECONDS)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self._called("scalars", values, step)
        made = sum(call[0] == "scalars" for call in self.calls)
        if self.fail_from is not None and made >= self.fail_from:
            raise RuntimeError("server gone")

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._called("image", tag, image, step)

    def close(self) -> None:
        self._called("close")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "dsmae.loggers" and r.levelno == logging.WARNING]  # fmt: skip


def test_a_sender_makes_the_calls_in_order_while_the_caller_goes_on(caplog):
    go = threading.Event()
    tracker = _FakeTracker(hold=go)
    sender = Sender(tracker)
    assert (sender.name, sender.run_id) == ("fake", "run-1")
    values, image = {"pretrain/loss": 2.0}, np.zeros((4, 4, 3), np.uint8)
    sender.scalars(values, 1)
    assert tracker.waiting.wait(5)  # the tracker holds its first call ...
    started = time.monotonic()
    sender.image("pretrain/denoise", image, 1)
    sender.scalars({"pretrain/loss": 1.0}, 2)
    assert time.monotonic() - started < 1  # ... and the caller goes on
    values["pretrain/loss"], image[:] = -1.0, 255  # the caller reuses its objects
    go.set()
    sender.close()

    assert [call[0] for call in tracker.calls] == ["scalars", "image", "scalars", "close"]
    first, (_, tag, sent, at), second, _ = tracker.calls
    assert first == ("scalars", {"pretrain/loss": 2.0}, 1)  # as they were when given
    assert (tag, at) == ("pretrain/denoise", 1) and not sent.any()
    assert second == ("scalars", {"pretrain/loss": 1.0}, 2)
    assert _warnings(caplog) == []


def test_a_failing_tracker_is_warned_about_once_and_given_nothing_more(caplog):
    tracker = _FakeTracker(fail_from=3)
    sender = Sender(tracker, "the fake server")
    for step in range(1, 7):
        sender.scalars({"pretrain/loss": 1 / step}, step)
        if step == 4:
            sender.image("pretrain/denoise", np.zeros((4, 4, 3), np.uint8), step)
    sender.close()

    assert [(call[0], call[-1]) for call in tracker.calls] == [("scalars", s) for s in (1, 2, 3)]
    failed, unsent = _warnings(caplog)
    assert failed.startswith("the fake server failed (server gone): training goes on")
    assert unsent.startswith("not sent to the fake server (run run-1): ")
    assert re.search(r"4 scalar lines and 1 images?, steps 3 to 6", unsent), unsent


@pytest.mark.parametrize(
    ("steps", "why"),
    [(10, "3 calls waiting: it does not keep up"), (2, "no answer within 0.5 s")],
    ids=["queue-full", "no-answer-at-close"],
)
def test_a_stalled_tracker_never_holds_up_the_caller_nor_the_end_of_the_run(
    steps, why, caplog, monkeypatch
):
    monkeypatch.setattr("dsmae.loggers.MAX_PENDING", 3)
    monkeypatch.setattr("dsmae.loggers.CLOSE_SECONDS", 0.5)
    stall = threading.Event()
    tracker = _FakeTracker(hold=stall)
    sender = Sender(tracker, "the stalled server")
    try:
        sender.scalars({"pretrain/loss": 1.0}, 1)
        assert tracker.waiting.wait(5)  # the server never answers the first call
        started = time.monotonic()
        for step in range(2, steps + 1):
            sender.scalars({"pretrain/loss": 1 / step}, step)
        sender.image("pretrain/denoise", np.zeros((4, 4, 3), np.uint8), steps)
        assert time.monotonic() - started < 1
        started = time.monotonic()
        sender.close()
        assert time.monotonic() - started < 0.5 + 1
        assert [call[-1] for call in tracker.calls] == [1]  # nothing after the stalled call
    finally:
        stall.set()

    failed, unsent = _warnings(caplog)
    assert failed.startswith(f"the stalled server failed ({why}")
    pattern = r"not sent to the stalled server \(run run-1\): (\d+) scalar lines and 1 images?, "
    found = re.match(pattern + rf"steps ([12]) to {steps};", unsent)
    assert found and int(found[1]) in (steps - 1, steps), unsent  # the stalled one may count


def test_a_tracker_failing_mid_run_never_stops_the_pretraining(
    tmp_path, mlflow_store, monkeypatch, caplog
):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dsmae.loggers import MlflowTracker

    scalars, made = MlflowTracker.scalars, []

    def gone_after_two(self: MlflowTracker, values: Mapping[str, float], step: int) -> None:
        made.append(step)
        if len(made) > 2:
            raise MlflowException("connection refused")
        scalars(self, values, step)

    monkeypatch.setattr(MlflowTracker, "scalars", gone_after_two)
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out), "--set", f"log.mlflow={mlflow_store}"]) == 0
    assert (out / "last.pt").is_file()
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # every step's line
    assert "knn_top1" in records[-1]

    history = MlflowClient(mlflow_store).get_metric_history(_ids(out)["mlflow"], "pretrain/loss")
    assert [m.step for m in history] == [1, 2]  # what it took before it failed
    label = f"MLflow at {mlflow_store}"
    failed, unsent = _warnings(caplog)
    assert failed.startswith(f"{label} failed (connection refused): training goes on")
    assert unsent.startswith(f"not sent to {label} (run {_ids(out)['mlflow']}): ")
    assert f"{len(records) - 2} scalar lines" in unsent


@pytest.mark.parametrize("api", ["fail", "hang"])
def test_an_mlflow_server_whose_api_fails_or_hangs_stops_the_run_within_seconds(
    tmp_path, monkeypatch, capsys, api
):
    pytest.importorskip("mlflow")
    _no_proxy(monkeypatch)
    with _local_server(200, api) as url:  # its front page answers
        check_reachable(url, "MLflow tracking", "log.mlflow", timeout=5)
        out = tmp_path / "run"
        started = time.monotonic()
        assert main([*TINY, "--out", str(out), "--set", f"log.mlflow={url}"]) == 2
        assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith("dsmae pretrain: error: log.mlflow") and err.count("\n") == 1
    assert "answers, but its API does not" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() and list(out.glob("*.pt")) == []
