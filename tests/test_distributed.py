"""Several processes under torchrun (gloo on CPU) take the same steps as one process, and
one failing rank ends them all."""

import os
import subprocess
import sys
import time

import pytest
import torch

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main
from dsmae.distributed import Process, local_share, wrap
from dsmae.metrics import read_metrics


@pytest.fixture
def run_args(tiny_run) -> list[str]:
    """The tiny run (2 epochs of 4 steps) with 2 encoder blocks."""
    return tiny_run.args("--set", "model.depth=2")


def _torchrun(*args: str) -> None:
    """``torchrun --standalone --nproc_per_node=2 -m dsmae ARGS`` (gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dsmae", *args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_close_weights(a, b) -> None:
    # Float tolerance: summing in another order moves gradients by rounding errors, and
    # Adam scales an update by 1/sqrt(v), so parameters whose gradient is ~0 (the key bias
    # of attention, which softmax ignores) move by up to lr per step either way.
    weights = [load_checkpoint(path)["model"] for path in (a, b)]
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-4), name


@pytest.mark.parametrize("ema_every", ["epoch", "step"])
def test_two_ranks_with_half_batches_match_one_process_with_the_full_batch(
    tmp_path, ema_every, run_args
):
    run = [*run_args, "--set", f"train.ema_every={ema_every}"]
    assert main([*run, "--out", str(tmp_path / "one")]) == 0
    # 2 ranks x 16 images, in micro-batches of 8: accumulation without extra all-reduces
    _torchrun(*run, "--micro-batch", "8", "--out", str(tmp_path / "two"))

    one, two = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    for a, b in zip(one, two):
        for key in ("loss", "loss_y", "loss_z"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key)
    _assert_close_weights(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt")
    # only rank 0 wrote: one metrics line per step (checked above), one config
    assert sorted(p.name for p in (tmp_path / "two").glob("*.yaml")) == ["config.yaml"]


def test_a_one_process_checkpoint_resumes_on_two_ranks(tmp_path, run_args):
    assert main([*run_args, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "moved"
    assert main([*run_args, "--set", "train.checkpoint_every=1", "--out", str(out)]) == 0
    (out / "last.pt").unlink()  # keep only the checkpoint after epoch 1 (step 4 of 8)
    assert [p.name for p in out.glob("*.pt")] == ["checkpoint-00000004.pt"]
    _torchrun(*run_args, "--set", "train.checkpoint_every=1", "--out", str(out), "--resume", "auto")
    assert load_checkpoint(out / "last.pt")["step"] == 8
    _assert_close_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


def test_local_share_splits_a_global_batch():
    shares = [local_share(10, Process(rank=r, world_size=3)) for r in range(3)]
    assert shares == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert local_share(8, Process()) == slice(0, 8)


def test_wrap_is_the_model_itself_in_one_process():
    model = torch.nn.Linear(2, 2)
    assert wrap(model, Process(), torch.device("cpu")) is model


def test_one_failing_rank_ends_every_rank_quickly(tmp_path, tiny_run, fault_driver):
    driver = fault_driver(
        """
        from dsmae.pretrain import step
        real_step, calls = step.train_step, []
        def failing_step(*args, **kwargs):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 3:
                raise RuntimeError("rank 1 fails on purpose")
            return real_step(*args, **kwargs)
        step.train_step = failing_step
        """,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tiny_run.args("--epochs", "3", checkpoints=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", driver, *run, "--out", str(tmp_path / "run")]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert time.monotonic() - started < 120
    assert "rank 1 fails on purpose" in done.stderr


def test_under_a_time_budget_every_rank_takes_the_same_epochs(tmp_path, run_args, fault_driver):
    # rank 1 times its steps 100 times slower than rank 0: alone, rank 0 would choose all
    # 50 epochs and rank 1 a few; they must agree (the fewest), or the run could not end
    driver = fault_driver(
        """
        from dsmae.pretrain import time_budget
        real_time_steps = time_budget._time_steps
        def rank_timed_steps(run):
            steps, _ = real_time_steps(run)
            return steps, 0.001 if os.environ["RANK"] == "0" else 0.1
        time_budget._time_steps = rank_timed_steps
        """,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    run = [*run_args, "--epochs", "50", "--time-budget", "8s", "--out", str(out)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", driver, *run]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = load_checkpoint(out / "last.pt")["config"]["train"]["epochs"]
    assert 1 <= epochs < 50  # rank 1's choice: 4 steps of 0.1 s an epoch in what is left
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 4 * epochs
