"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow.

The ``log`` config section turns them on (``log.wandb=true``, ``log.mlflow=URI``), and
:class:`~dsmae.metrics.MetricsLog` hands each of them what it gives TensorBoard: every
finite scalar under the same ``<prefix>/<key>`` tag at the same step, and every image. The
resolved config goes once, when a tracker opens its run: W&B's run config; MLflow params
(dotted keys, ``model.depth``) and a ``config.yaml`` artifact. Both are optional extras,
imported only when turned on; a missing one is a :class:`~dsmae.config.ConfigError`
naming its pip command.

A tracker never costs training time, nor the run: its server (for MLflow, its API) must
answer within seconds when the run starts (else a :class:`~dsmae.config.ConfigError`),
the MLflow client's retries and timeouts are bounded (:data:`MLFLOW_CLIENT_BOUNDS`), and
then each tracker is given its calls on a thread of its own (:class:`Sender`). One that
fails or stalls mid-run is warned about once and given nothing more; when the run ends, a
warning says what it was not sent (``metrics.jsonl`` and TensorBoard hold everything).

The trackers' run ids are kept in ``<run folder>/loggers.json``, so a resumed pre-training
continues the same W&B and MLflow runs. The steps a killed process logged after its last
checkpoint are logged again by the resumed one: ``metrics.jsonl`` and TensorBoard drop the
first copies; W&B keeps its steps increasing and ignores the repeats (the first copies
stay); MLflow keeps both. Its params keep their first values (MLflow never changes a
param); ``config.yaml`` is replaced by the resumed run's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from dsmae.config import Config, ConfigError, flat_config
from dsmae.writes import WriteError, atomic_write_text

log = logging.getLogger(__name__)

IDS_FILE = "loggers.json"  # tracker name -> the id of its run, in the run folder
MLFLOW_PARAMS_PER_BATCH = 100  # MLflow's limit of params in one log_batch


class Tracker(Protocol):
    """A run of an experiment tracker that mirrors TensorBoard."""

    name: str  # its key in ``loggers.json`` and in the ``log`` section
    run_id: str

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log ``values`` (tag -> finite number) at ``step``."""

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an (H, W, C) uint8 image under ``tag`` at ``step``."""

    def close(self) -> None:
        """End the run (everything logged is flushed)."""


def open_trackers(cfg: Config, folder: Path, resume: bool) -> list[Tracker]:
    """The trackers ``cfg.log`` turns on, each with its run started and ``cfg`` logged;
    with ``resume``, the runs named in ``folder/loggers.json`` continue where it has them.
    The ids of their runs are written there.

    Raises:
        ConfigError: a tracker's package is missing (the message names the pip command),
            or its run cannot start (no W&B login, an MLflow store that refuses it).
    """
    # both imported and reached before either run starts: a failure leaves no run behind
    wandb = _imported("wandb", "log.wandb") if cfg.log.wandb else None
    if wandb is not None and _wandb_online():
        check_reachable(os.environ.get("WANDB_BASE_URL", WANDB_SERVER), "W&B", "log.wandb")
    if cfg.log.mlflow is not None:
        _imported("mlflow", "log.mlflow")
        if cfg.log.mlflow.startswith(("http://", "https://")):
            check_reachable(cfg.log.mlflow, "MLflow tracking", "log.mlflow")
            check_mlflow_api(cfg.log.mlflow, cfg.log.mlflow_experiment)
    ids = _read_ids(folder) if resume else {}
    trackers: list[Tracker] = []
    try:
        if wandb is not None:
            trackers.append(Sender(WandbTracker(wandb, cfg, folder, ids.get("wandb"))))
        if cfg.log.mlflow is not None:
            mlflow = MlflowTracker(cfg, folder, ids.get("mlflow"))
            trackers.append(Sender(mlflow, f"MLflow at {mlflow.uri}"))
        _write_ids(folder, {**ids, **{t.name: t.run_id for t in trackers}})
    except BaseException:
        close_trackers(trackers)
        raise
    return trackers


def close_trackers(trackers: list[Tracker]) -> None:
    """End every tracker's run."""
    for tracker in trackers:
        tracker.close()


WANDB_SERVER = "https://api.wandb.ai"  # W&B's, unless WANDB_BASE_URL names another
REACH_SECONDS = 5.0  # a tracker's server must answer within this when a run starts
# the MLflow client's retries and timeout (its defaults: 7 retries, 120 s each, so minutes
# on a failing server), set in the environment where it reads them, unless set already
MLFLOW_CLIENT_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def _wandb_online() -> bool:
    """Whether W&B will talk to its server (not ``WANDB_MODE`` offline or disabled)."""
    mode = os.environ.get("WANDB_MODE", "online").lower()
    disabled = os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1")
    return mode not in ("offline", "dryrun", "disabled") and not disabled


def _answer(url: str, timeout: float) -> tuple[int | None, str]:
    """The HTTP status a server gives ``url`` within ``timeout`` seconds (name resolution
    aside), or None and why there is none. A TLS certificate this check cannot verify
    counts as an answer (200): a server is there, and the tracker's own client, with its
    own certificate settings, decides on it."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as err:
        return err.code, f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            return 200, ""
        return None, getattr(err.reason, "strerror", None) or str(err.reason)
    except (OSError, ValueError) as err:
        return None, getattr(err, "strerror", None) or str(err)


def check_reachable(url: str, what: str, key: str, timeout: float = REACH_SECONDS) -> None:
    """Refuse, within ``timeout`` seconds (name resolution aside), a tracker server at
    ``url`` that does not answer. Any HTTP answer counts, an error status included, but a
    proxy's 502, 503 or 504 for a server it cannot reach.

    Raises:
        ConfigError: naming ``key``, the address and why.
    """
    status, why = _answer(url, timeout)
    if status is not None and status not in (502, 503, 504):
        return
    raise ConfigError(
        f"{key}: the {what} server at {url} cannot be reached ({why or 'no answer'}; waited "
        f"at most {timeout:g} s): start it, fix the address, or turn {key} off",
        key,
    )


def check_mlflow_api(uri: str, experiment: str, timeout: float = REACH_SECONDS) -> None:
    """Refuse, within ``timeout`` seconds, an MLflow server whose REST API fails or hangs
    on the first call a run makes (the look-up of ``experiment``; "not found" is a good
    answer), though its front page answers.

    Raises:
        ConfigError: naming ``log.mlflow``, the address and why.
    """
    from urllib.parse import quote

    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name="
    status, why = _answer(url + quote(experiment), timeout)
    if status is not None and status < 500:
        return
    raise ConfigError(
        f"log.mlflow: the MLflow tracking server at {uri} answers, but its API does not "
        f"({why or 'no answer'} to the experiment look-up; waited at most {timeout:g} s): "
        "check the server's log, or turn log.mlflow off",
        "log.mlflow",
    )


class Sender:
    """A tracker's run, fed from a thread of its own, so that training never waits on the
    tracker's server.

    Calls are queued (at most :data:`MAX_PENDING`); a call that fails (a server gone, a
    full disk) or a queue left full by a stalled server is warned about once, and nothing
    more is sent. :meth:`close` ends the run within :data:`CLOSE_SECONDS` and warns of
    every scalar line and image not sent, with their steps: ``metrics.jsonl`` and
    TensorBoard have them. A tracker that failed is not closed (its server is gone).
    """

    def __init__(self, tracker: Tracker, label: str | None = None) -> None:
        self.tracker, self.name, self.run_id = tracker, tracker.name, tracker.run_id
        self.label = label or tracker.name
        self.failure: str | None = None
        self._unsent = {"scalar line": 0, "image": 0}
        self._steps: tuple[int, int] | None = None  # the first and last step not sent
        self._calling: tuple[str, int] | None = None  # the call being made: kind, step
        self._closed = False
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, Callable[..., None], tuple, int] | None]
        self._queue = queue.Queue(maxsize=MAX_PENDING)
        self._thread = threading.Thread(target=self._send, name=f"dsmae-{self.name}", daemon=True)
        self._thread.start()

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self._put("scalar line", self.tracker.scalars, (dict(values), step), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._put("image", self.tracker.image, (tag, image.copy(), step), step)

    def close(self) -> None:
        """End the tracker's run (unless it failed), waiting at most :data:`CLOSE_SECONDS`
        in all; then warn of what it was not sent. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + CLOSE_SECONDS
        self._put("closing", self.tracker.close, (), -1)
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._fail(f"no answer within {CLOSE_SECONDS:g} s while the run ended")
            with self._lock:
                calling = self._calling
            if calling is not None:
                self._count(*calling)  # the call it hangs in was not sent either
            self._drop_queued()
        self._report()

    def _put(self, kind: str, call: Callable[..., None], args: tuple, step: int) -> None:
        if self.failure is None:
            try:
                self._queue.put_nowait((kind, call, args, step))
                return
            except queue.Full:
                self._fail(f"{MAX_PENDING} calls waiting: it does not keep up, or hangs")
        self._count(kind, step)

    def _send(self) -> None:
        """The thread: make the queued calls in order until ``None``."""
        while (item := self._queue.get()) is not None:
            kind, call, args, step = item
            if self.failure is not None:
                self._count(kind, step)
                continue
            with self._lock:
                self._calling = (kind, step)
            try:
                call(*args)
            except Exception as err:  # a tracker raises many types; none may stop training
                self._fail(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
                self._count(kind, step)
            with self._lock:
                self._calling = None

    def _fail(self, why: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = why
        log.warning(
            "%s failed (%s): training goes on, and nothing more is sent to it; "
            "metrics.jsonl and TensorBoard keep every metric",
            self.label,
            why,
        )

    def _count(self, kind: str, step: int) -> None:
        if kind not in self._unsent:
            return  # the end of the run, not a metric
        with self._lock:
            self._unsent[kind] += 1
            if step >= 0:
                first, last = self._steps or (step, step)
                self._steps = (min(first, step), max(last, step))

    def _drop_queued(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._queue.get_nowait()
                if item is not None:
                    self._count(item[0], item[3])

    def _report(self) -> None:
        """Warn of what was not sent, if anything."""
        lost = [f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in self._unsent.items() if n]
        if not lost:
            return
        steps = f", steps {self._steps[0]} to {self._steps[1]}" if self._steps else ""
        log.warning(
            "not sent to %s (run %s): %s%s; metrics.jsonl and TensorBoard in the run folder "
            "have them",
            self.label,
            self.run_id,
            " and ".join(lost),
            steps,
        )


MAX_PENDING = 10_000  # calls a tracker may have waiting before it counts as failed
CLOSE_SECONDS = 30.0  # the most a tracker may take to end its run


def _imported(module: str, key: str) -> ModuleType:
    """``import module``, or a :class:`ConfigError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise  # the package is there but broken: its own error says how
        extra = key.removeprefix("log.")
        raise ConfigError(
            f'{key} needs the {module} package: pip install "dsmae[{extra}]"'
        ) from None


def _read_ids(folder: Path) -> dict[str, str]:
    """The tracker run ids of ``folder`` (none where ``loggers.json`` is absent or unreadable)."""
    try:
        ids = json.loads((folder / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _write_ids(folder: Path, ids: dict[str, str]) -> None:
    """Keep ``ids`` in ``folder/loggers.json``; none: the file goes (a fresh run never
    continues the trackers' runs of another run that used the folder before)."""
    path = folder / IDS_FILE
    if ids:
        atomic_write_text(path, json.dumps(ids, sort_keys=True) + "\n", "tracker run ids")
    else:
        path.unlink(missing_ok=True)


class WandbTracker:
    """A Weights & Biases run: scalars and images through ``run.log`` at their step, the
    config as the run's config, the run folder's name as the run's. Its local files go to
    ``$WANDB_DIR/wandb`` or else the run folder's ``wandb/``. Owns its run: a W&B run of
    the caller's stays as it is (``reinit="create_new"``)."""

    name = "wandb"

    def __init__(self, wandb: ModuleType, cfg: Config, folder: Path, run_id: str | None) -> None:
        self._image = wandb.Image
        try:
            self._run = wandb.init(
                project=cfg.log.wandb_project,
                entity=cfg.log.wandb_entity,
                name=folder.resolve().name,
                id=run_id,
                resume="allow" if run_id else None,
                dir=os.environ.get("WANDB_DIR") or str(folder),
                config=cfg.to_dict(),
                reinit="create_new",
            )
        except wandb.Error as err:
            raise ConfigError(f"log.wandb: cannot start a W&B run: {err}") from None
        self.run_id: str = self._run.id

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self._run.log(dict(values), step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self._run.log({tag: self._image(image)}, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """An MLflow run at ``log.mlflow`` in experiment ``log.mlflow_experiment``: scalars by
    ``log_batch`` at their step, images by ``log_image`` with their step (the MLflow UI's
    image slider), the config as params and the ``config.yaml`` artifact. A failed call is
    a :class:`~dsmae.writes.WriteError` naming the tracking URI."""

    name = "mlflow"

    def __init__(self, cfg: Config, folder: Path, run_id: str | None) -> None:
        for variable, bound in MLFLOW_CLIENT_BOUNDS.items():  # unless the user set them
            os.environ.setdefault(variable, bound)
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._metric, self._param, self._error = Metric, Param, MlflowException
        self.uri = str(cfg.log.mlflow)
        try:
            self._client = MlflowClient(self.uri)
            self.run_id = self._start(cfg.log.mlflow_experiment, folder.resolve().name, run_id)
            self._log_config(cfg)
        except MlflowException as err:
            raise ConfigError(
                f"log.mlflow={self.uri!r}: cannot start an MLflow run: {err.message}"
            ) from None

    def _start(self, experiment: str, run_name: str, run_id: str | None) -> str:
        """Continue run ``run_id`` where the store has it, else start one in ``experiment``
        (created if needed); returns its id."""
        if run_id is not None:
            try:
                self._client.update_run(run_id, status="RUNNING")
                return run_id
            except self._error as err:
                log.warning("MLflow run %s cannot continue (%s): starting a new one", run_id, err)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        return self._client.create_run(experiment_id, run_name=run_name).info.run_id

    def _log_config(self, cfg: Config) -> None:
        """The config as params (dotted keys; a continued run gets only the keys it lacks)
        and as the artifact ``config.yaml`` (replaced)."""
        logged = self._client.get_run(self.run_id).data.params
        flat = flat_config(cfg.to_dict())
        params = [self._param(key, str(value)) for key, value in flat.items() if key not in logged]
        for start in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            batch = params[start : start + MLFLOW_PARAMS_PER_BATCH]
            self._client.log_batch(self.run_id, params=batch)
        self._client.log_text(self.run_id, cfg.to_yaml(), "config.yaml")

    @contextlib.contextmanager
    def _written(self) -> Iterator[None]:
        """A failed MLflow call (a server gone, a full disk) as a :class:`WriteError`."""
        try:
            yield
        except (self._error, OSError) as err:
            raise WriteError(
                f"could not log to MLflow at {self.uri} (run {self.run_id}): {err}"
            ) from err

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(tag, float(v), now, step) for tag, v in values.items()]
        with self._written():
            self._client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        with self._written():
            self._client.log_image(self.run_id, image, key=tag, step=step)

    def close(self) -> None:
        with self._written():
            self._client.set_terminated(self.run_id)
