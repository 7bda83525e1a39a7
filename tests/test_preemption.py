"""SIGTERM, SIGUSR1 and Ctrl-C stop a run with a checkpoint, and it resumes exactly; in
every other phase of a command SIGTERM and SIGUSR1 stop it in one line, saying what it kept."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main
from dsmae.preemption import PREEMPTED_EXIT, CommandSignals, Stopped, StopSignals


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


# ------------------------------------------------------------------ outside the steps


def _driven(driver: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``dsmae ARGV`` run by ``driver`` (a ``fault_driver`` script) in a child process."""
    command = [sys.executable, driver, *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _stop_line(done: subprocess.CompletedProcess, command: str, sig: str) -> str:
    """The one line with which ``dsmae COMMAND`` said it stopped on ``sig``, after checking
    that it exited with PREEMPTED_EXIT, without a traceback."""
    assert done.returncode == PREEMPTED_EXIT, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"dsmae {command}: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"dsmae {command}: stopped by {sig} "), lines[0]
    return lines[0]


def test_a_signal_during_the_probe_after_pretraining_names_the_complete_checkpoint(
    tmp_path, tiny_run, fault_driver
):
    driver = fault_driver(
        """
        import dsmae.evaluation.linprobe  # the package exports the function under its name
        probe_module = sys.modules["dsmae.evaluation.linprobe"]
        real_linprobe = probe_module.linprobe
        def signalled_linprobe(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGUSR1)
            return real_linprobe(*args, **kwargs)
        probe_module.linprobe = signalled_linprobe
        """
    )
    out = tmp_path / "run"
    done = _driven(driver, tiny_run.args("--set", "probe.after_pretrain=true", "--out", str(out)))
    line = _stop_line(done, "pretrain", "SIGUSR1")
    checkpoint = out / "last.pt"
    assert f"stopped by SIGUSR1 after pre-training finished: {checkpoint} is complete" in line
    assert "its linear probe did not finish" in line
    assert f"dsmae linprobe --checkpoint {shlex.quote(str(checkpoint))}" in line
    assert load_checkpoint(checkpoint)["step"] == 8  # all of the run's 2 epochs of 4 steps


def test_a_signal_while_last_pt_is_written_lets_the_run_end_and_skips_the_probe(
    tmp_path, tiny_run, fault_driver
):
    driver = fault_driver(
        """
        from dsmae.pretrain import loop
        real_finish = loop._finish
        def signalled_finish(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # after the last step: only recorded
            return real_finish(*args, **kwargs)
        loop._finish = signalled_finish
        """
    )
    out = tmp_path / "run"
    done = _driven(driver, tiny_run.args("--set", "probe.after_pretrain=true", "--out", str(out)))
    line = _stop_line(done, "pretrain", "SIGTERM")
    checkpoint = out / "last.pt"
    assert f"stopped by SIGTERM after pre-training finished: {checkpoint} is complete" in line
    assert f"its linear probe did not run: dsmae linprobe --checkpoint {checkpoint}" in line
    assert load_checkpoint(checkpoint)["step"] == 8 and (out / "denoise.png").is_file()
    assert not list(out.glob("last.linprobe*.json"))  # the probe did not start


def test_a_signal_to_a_standalone_command_stops_it_in_one_line(tmp_path, digits_run, fault_driver):
    checkpoint = shutil.copy(digits_run / "last.pt", tmp_path / "last.pt")  # results go beside
    driver = fault_driver(
        """
        import dsmae.evaluation.knn
        real_knn_eval = dsmae.evaluation.knn.knn_eval
        def signalled_knn_eval(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_knn_eval(*args, **kwargs)
        dsmae.evaluation.knn.knn_eval = signalled_knn_eval
        """
    )
    done = _driven(driver, ["knn", "--checkpoint", str(checkpoint), "--device", "cpu"])
    line = _stop_line(done, "knn", "SIGTERM")
    assert line.startswith("dsmae knn: stopped by SIGTERM before it finished"), line
    assert not list(tmp_path.glob("last.knn*.json"))


def test_outside_the_steps_a_stop_signal_raises_stopped_and_stop_signals_still_take_over():
    stops = (signal.SIGTERM, signal.SIGUSR1)
    previous = {sig: signal.getsignal(sig) for sig in stops}  # given back by the command
    ctrl_c = signal.getsignal(signal.SIGINT)
    with CommandSignals():
        assert signal.getsignal(signal.SIGINT) is ctrl_c  # Ctrl-C is left as it was
        with pytest.raises(Stopped) as stopped:
            signal.raise_signal(signal.SIGUSR1)
        assert stopped.value.signal_name == "SIGUSR1"
        assert str(stopped.value).startswith("stopped by SIGUSR1 before it finished")
        handlers = {sig: signal.getsignal(sig) for sig in stops}
        with StopSignals() as stop:
            signal.raise_signal(signal.SIGUSR1)  # recorded, not raised
            assert stop.received == "SIGUSR1"
        assert {sig: signal.getsignal(sig) for sig in stops} == handlers  # given back
        with pytest.raises(Stopped) as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.signal_name == "SIGTERM"
    assert {sig: signal.getsignal(sig) for sig in stops} == previous  # the command's end
