"""Stopping on a signal without losing work: SIGTERM (what Slurm and Kubernetes send
before they kill a job), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's ``--signal=USR1@120``).

While :class:`StopSignals` is active (pre-training's steps), such a signal only records
that a stop was asked for; the training loop finishes its step, writes a checkpoint and
raises :class:`Preempted`, and the ``dsmae`` command exits with :data:`PREEMPTED_EXIT`.
A second Ctrl-C interrupts at once.

In every other phase of a ``dsmae`` command (:class:`CommandSignals`), SIGTERM
and SIGUSR1 raise :class:`Stopped` at once, as Ctrl-C raises ``KeyboardInterrupt``: the
command says what it kept (nothing is ever half-written: every file is written
atomically) and exits with :data:`PREEMPTED_EXIT` too. Worker processes
(:func:`leave_stopping_to`) ignore them and die with their parent.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped cleanly, run it again to continue


class Preempted(Exception):
    """A run stopped on a signal after saving a checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        super().__init__(
            f"stopped by {signal_name} at step {step}; the checkpoint is {checkpoint}; "
            "resume with --resume auto"
        )
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class Stopped(Exception):
    """A command stopped by SIGTERM or SIGUSR1 outside pre-training's steps; ``kept``
    says what it had done, and what to run."""

    def __init__(self, signal_name: str, kept: str | None = None) -> None:
        kept = kept or "before it finished (nothing half-written is left): run it again"
        super().__init__(f"stopped by {signal_name} {kept}")
        self.signal_name = signal_name
        self.kept = kept


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


class CommandSignals:
    """A context (a whole ``dsmae`` command) in which SIGTERM and SIGUSR1 raise
    :class:`Stopped` in the main thread (SIGINT keeps raising ``KeyboardInterrupt``);
    :class:`StopSignals` takes over during pre-training's steps. The handlers before it
    are given back at its end. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    def __enter__(self) -> CommandSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, _raise_stopped)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def leave_stopping_to(parent: int) -> Callable[[int], None]:
    """A DataLoader's ``worker_init_fn`` for workers of the process ``parent`` (this one,
    ``os.getpid()``, taken before the workers fork): each worker ignores the stop signals
    (SIGTERM, SIGINT, SIGUSR1) that Slurm or Ctrl-C send to the whole process group, so
    that its parent alone stops, cleanly, and ends it; and on Linux it is killed the
    moment its parent dies, however that dies (``kill -9`` included)."""
    return functools.partial(_leave_stopping_to, parent)


def _leave_stopping_to(parent: int, worker: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning(
                "a worker cannot ask to die with its parent: %s", os.strerror(ctypes.get_errno())
            )
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


class StopSignals:
    """A context in which the stop signals are recorded instead of ending the process.

    ``received`` is the name of the first one (e.g. "SIGTERM"), or None. Outside the main
    thread (where handlers cannot be installed) it does nothing.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            log.warning("%s received: stopping after this step, with a checkpoint", name)
        self.received = self.received or name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
