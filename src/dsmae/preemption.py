"""Stopping on a signal without losing work: SIGTERM (what Slurm and Kubernetes send
before they kill a job), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's ``--signal=USR1@120``).

While :class:`StopSignals` is active, such a signal only records that a stop was asked
for; the training loop finishes its step, writes a checkpoint and raises
:class:`Preempted`, and the ``dsmae`` command exits with :data:`PREEMPTED_EXIT`. A
second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
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
