"""The queue the workers share: tasks claimed under a file lock, a claim of a dead process
taken over."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .study import VARIANTS, Study, Task


@contextmanager
def locked(out: Path) -> Iterator[None]:
    with open(out / "queue.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def done_path(study: Study, task: Task) -> Path:
    return study.out / "done" / f"{task.name}.json"


def ready(study: Study, task: Task) -> bool:
    """Whether ``task`` can start: an evaluation needs its pre-training finished."""
    if task.kind == "train":
        return True
    if task.variant == "random-init":
        source = Task("train", next(iter(VARIANTS)), 0, study.epochs)
    else:
        last = study.epochs if task.seed == 0 else study.spread_epoch
        source = Task("train", task.variant, task.seed, last)
    return done_path(study, source).is_file()


def claim(study: Study) -> Task | None:
    """The first task that is not done, not held by a live worker and ready; None when
    every task is done or held. Waits while the remaining ones wait on pre-trainings."""
    claims = study.out / "claims"
    while True:
        waiting = False
        with locked(study.out):
            for task in study.tasks():
                held = claims / f"{task.name}.pid"
                if done_path(study, task).is_file():
                    continue
                if held.is_file() and alive(int(held.read_text() or 0)):
                    continue
                if not ready(study, task):
                    waiting = True
                    continue
                held.write_text(str(os.getpid()))
                return task
        if not waiting:
            return None
        time.sleep(10)
