"""SIGTERM, SIGUSR1 and Ctrl-C stop a run with a checkpoint, and it resumes exactly."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main
from dsmae.preemption import PREEMPTED_EXIT, StopSignals


@pytest.fixture
def run_args(tiny_run) -> list[str]:
    """The tiny run for 25 epochs (100 steps): no periodic checkpoint, no monitor."""
    quiet = ["--set", "monitor.knn_every=0", "--set", "monitor.images_every=0"]
    return tiny_run.args("--set", "train.checkpoint_every=0", "--epochs", "25", *quiet)


def _stopped_by(sig: signal.Signals, argv: list[str], out, threads: int) -> tuple[int, str]:
    """Start ``argv`` (a run into ``out``) as a child process, send it ``sig`` once the run
    has logged a few steps; its exit status and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    child = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    child.send_signal(sig)
    _, err = child.communicate(timeout=180)
    return child.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_stops_the_run_with_a_checkpoint_that_resumes_exactly(tmp_path, sig, run_args):
    out = tmp_path / "stopped"
    argv = [sys.executable, "-m", "dsmae", *run_args, "--out", str(out)]
    code, err = _stopped_by(sig, argv, out, torch.get_num_threads())
    assert code == PREEMPTED_EXIT, err[-2000:]
    found = re.search(rf"stopped by {sig.name} at step (\d+); the checkpoint is (\S+);", err)
    assert found and "resume with --resume auto" in err and "Traceback" not in err
    step, checkpoint = int(found.group(1)), found.group(2)
    assert 3 <= step < 100 and load_checkpoint(checkpoint)["step"] == step
    assert checkpoint.endswith(f"checkpoint-{step:08d}.pt")

    assert main([*run_args, "--out", str(tmp_path / "stopped"), "--resume", "auto"]) == 0
    assert main([*run_args, "--out", str(tmp_path / "straight")]) == 0
    a = load_checkpoint(tmp_path / "stopped" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    assert all(torch.equal(t, b[name]) for name, t in a.items())


def test_stop_signals_are_recorded_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"  # the process lives on
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGTERM"  # the first one is what is reported
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_under_torchrun_every_rank_stops_at_the_same_step(tmp_path, run_args):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "dsmae", *run_args, "--out", str(out)]  # fmt: skip
    _, err = _stopped_by(signal.SIGTERM, argv, out, 1)  # torchrun passes it on to its workers
    steps = {int(s) for s in re.findall(r"stopped by SIGTERM at step (\d+)", err)}
    assert len(steps) == 1, err[-3000:]  # one step, whichever rank reported it
    (step,) = steps
    assert load_checkpoint(out / f"checkpoint-{step:08d}.pt")["step"] == step
