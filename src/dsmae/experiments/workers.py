"""Cells side by side: :class:`CellPool` runs a grid's cells here, one after another, or
in worker processes of their own.

On a CPU, ``W`` workers share the cores: each runs its cells with ``cores // W`` threads
(one each on a 2-core machine), as two processes of one thread each do more on two cores
than one process of two threads. Where there are GPUs, each worker takes one of them
(``CUDA_VISIBLE_DEVICES``), so ``W`` is at most their number. A worker's log and progress
bars go to ``LOGS/worker-<n>.log``.

A cell goes to a worker only when one is free. A grid that stops (a signal, an error in a
cell) gives no worker a new cell and sends the running ones SIGTERM: each stops after its
step with a checkpoint, which the grid's next run resumes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from types import TracebackType
from typing import Any

from dsmae.config import ConfigError

log = logging.getLogger(__name__)


class CellPool:
    """Runs ``fn(*args)`` for each submitted key and yields ``(key, result)`` as they end.

    Args:
        workers: processes side by side; 1 runs each task here, when :meth:`results`
            reaches it.
        logs: the folder of the workers' logs.
    """

    def __init__(self, workers: int, logs: Path) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}", "--workers")
        self.workers = workers
        self.logs = logs
        # tasks not yet given to a worker: one goes to a worker only when one is free, so
        # that a stop (a signal, an error) leaves nothing queued in the workers
        self._waiting: collections.deque[tuple[Hashable, Callable[..., Any], tuple]] = (
            collections.deque()
        )
        self._pending: dict[Future, Hashable] = {}
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> CellPool:
        if self.workers > 1:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if gpus and self.workers > gpus:
                raise ConfigError(
                    f"--workers {self.workers}: one worker per GPU, and there are {gpus}",
                    "--workers",
                )
            context = multiprocessing.get_context("spawn")
            devices = context.Queue()
            for i in range(self.workers):
                devices.put(i)
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self.logs.mkdir(parents=True, exist_ok=True)
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_start_worker,
                initargs=(str(self.logs), devices, threads, gpus > 0),
            )
            log.info(
                "%d workers side by side (%s); their logs: %s/worker-*.log",
                self.workers,
                "one GPU each" if gpus else f"{threads} thread(s) each",
                self.logs,
            )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._executor is None:
            return
        if error is not None:  # a stop or an error here: the running cells checkpoint and stop
            for process in list(getattr(self._executor, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` (a module-level function: it goes to another process) for
        ``key``, in the order submitted, when a worker is free."""
        self._waiting.append((key, fn, args))

    def results(self) -> Iterator[tuple[Hashable, Any]]:
        """``(key, result)`` of every task as it ends, those submitted meanwhile
        included; a task's error is raised here (and no other task starts)."""
        if self._executor is None:
            while self._waiting:
                key, fn, args = self._waiting.popleft()
                yield key, fn(*args)
            return
        self._dispatch()
        while self._pending:
            finished, _ = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in finished:
                key = self._pending.pop(future)
                yield key, future.result()
            self._dispatch()

    def _dispatch(self) -> None:
        """Give waiting tasks to the free workers."""
        assert self._executor is not None
        while self._waiting and len(self._pending) < self.workers:
            key, fn, args = self._waiting.popleft()
            self._pending[self._executor.submit(fn, *args)] = key


def _start_worker(logs: str, devices: Any, threads: int, gpu: bool) -> None:
    """A worker process starts: its GPU or threads, its log file, its logging."""
    index = devices.get()
    if gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    import torch

    torch.set_num_threads(threads)
    handle = open(Path(logs) / f"worker-{index}.log", "a", buffering=1)  # noqa: SIM115
    os.dup2(handle.fileno(), sys.stdout.fileno())
    os.dup2(handle.fileno(), sys.stderr.fileno())
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
