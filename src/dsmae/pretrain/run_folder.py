"""The output folder of a pre-training run: one writer at a time, and one run per folder.

- **Lock.** While a run writes into ``--out`` it holds an exclusive ``fcntl`` lock on
  ``<out>/.lock``, which holds its PID (wiped when the run ends). A second writer is
  refused with a message naming the folder and that PID. The kernel drops the lock of a
  process that died, so a lock file left by a killed run is stale and simply taken over;
  a link in its place is refused, never followed.
- **Run id.** A fresh run gets an id, written to ``<out>/run.json`` and into each of its
  checkpoints. ``--resume auto`` and the pruning of old checkpoints only ever consider the
  checkpoints of the folder's run, never those of another run that used the folder before.
- **One run per folder.** A fresh run into a folder that holds another run's checkpoints,
  or files a run writes (``config.yaml``, ``metrics.jsonl``, ``tensorboard/``) that are
  not those of a run of this folder killed before its first checkpoint, is refused
  unless ``--resume`` (continue it) or ``--overwrite`` (start over: its metrics and
  TensorBoard logs are replaced; its checkpoints are left alone and never resumed).
- **Metrics after a resume.** ``metrics.jsonl`` is cut back to the resumed step, so the
  steps taken again after a kill are not logged twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import IO

from dsmae.config import ConfigError
from dsmae.pretrain.saving import checkpoints_in
from dsmae.writes import WriteError, atomic_write_text, unwritable_reason, written

log = logging.getLogger(__name__)

LOCK_FILE, RUN_FILE = ".lock", "run.json"


class RunFolderError(ConfigError):
    """The output folder is in use by another process, or holds another run."""


class FolderLock:
    """The open lock file of a run folder: :meth:`close` wipes the PID it holds, then
    releases the lock, so that the next run into the folder finds no stale lock."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def close(self) -> None:
        if self._handle.closed:
            return
        with contextlib.suppress(OSError):
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
        self._handle.close()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_folder(out: Path) -> FolderLock:
    """Take the exclusive lock of ``out`` (created if needed) for this process; keep the
    returned lock for as long as the run writes (closing it releases the lock).

    Raises:
        RunFolderError: another live process holds it, or ``.lock`` is a link (a run
            never writes through one).
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise RunFolderError(
            f"{path} is a link: a run writes its own lock file, never through a link; "
            "remove it or give this run another --out"
        ) from None
    handle = os.fdopen(fd, "r+")  # held open for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunFolderError(
            f"{out} is in use by another dsmae run (process {holder}); wait for it to end, "
            "or give this run another --out"
        ) from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous and previous != str(os.getpid()):
        log.warning("took over the stale lock of %s (process %s is gone)", out, previous)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return FolderLock(handle)


def run_id_of(out: Path) -> str | None:
    """The id of the run that owns ``out`` (from ``run.json``); None for a folder without
    one (new, or written by a dsmae that predates run ids)."""
    try:
        return json.loads((out / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# what a run writes into its folder besides checkpoints, which a fresh run replaces
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "tensorboard")


def start_run(
    out: Path, overwrite: bool, run_id: str | None = None, resume: str | None = None
) -> str:
    """Make ``out`` the folder of a new run (or of the resumed run ``run_id``) and return
    its id.

    Raises:
        RunFolderError: a fresh run (``run_id`` None) without ``overwrite`` into a folder
            holding checkpoints of another run, or files a run writes
            (:data:`RUN_OUTPUTS`) but for those of a run of this folder killed before its
            first checkpoint, which ``resume="auto"`` starts over.
    """
    if run_id is None:
        others = [p.name for _, p in checkpoints_in(out)] + (
            ["last.pt"] if (out / "last.pt").is_file() else []
        )
        written_before = [name for name in RUN_OUTPUTS if (out / name).exists()]
        ours = run_id_of(out) is not None  # a run of this folder, killed before a checkpoint
        if written_before and not others and not overwrite and not (ours and resume == "auto"):
            again = "start that run over with --resume auto, " if ours else ""
            raise RunFolderError(
                f"{out} holds {'another run' if ours else 'files'} that this run would "
                f"replace ({', '.join(written_before)}): {again}replace them with "
                "--overwrite, or give this run another --out"
            )
        if others and not overwrite:
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            shown = ", ".join(others[:3]) + more
            raise RunFolderError(
                f"{out} holds another run ({shown}): continue it with --resume auto, start "
                "over in this folder with --overwrite, or give this run another --out"
            )
        run_id = uuid.uuid4().hex[:12]
        if others:
            log.warning("--overwrite: a new run in %s; the old run's checkpoints stay", out)
        for old in ("metrics.jsonl", "config.yaml"):
            with written("run folder", out / old):
                (out / old).unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    if run_id_of(out) != run_id:
        atomic_write_text(out / RUN_FILE, json.dumps({"run_id": run_id}) + "\n", "run file")
    return run_id


def check_metrics_folder(out: Path, flag: str = "--out") -> None:
    """Refuse, before any work, a folder for an evaluation's metrics (``metrics.jsonl``,
    TensorBoard, tracker run ids) that holds a pre-training run or another run's metrics:
    the two would mix (and the run's trackers would lose their ids); or that cannot be
    written.

    Raises:
        RunFolderError: naming ``flag`` and what the folder holds.
        WriteError: it cannot be written.
    """
    held = [name for name in (RUN_FILE, "last.pt", "metrics.jsonl") if (out / name).exists()]
    held += [p.name for _, p in checkpoints_in(out)][:1]
    if held:
        raise RunFolderError(
            f"{flag} {out} holds another run ({', '.join(held)}): its metrics would mix with "
            "these; give another folder",
            flag,
        )
    why = unwritable_reason(out)
    if why is not None:
        raise WriteError(f"could not write metrics {out / 'metrics.jsonl'}: {why}")


def cut_metrics(out: Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` after ``step`` (written by a run that was killed
    after its last checkpoint), atomically; a truncated last line goes too."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept), "metrics")
