"""Several processes under torchrun (gloo on CPU) take the same steps as one process."""

import os
import subprocess
import sys

import torch

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main
from dsmae.metrics import read_metrics

RUN = [
    "pretrain", "--preset", "quickstart", "--patch-size", "4", "--epochs", "2",
    "--batch-size", "32", "--set", "data.subset=128", "--set", "model.depth=2",
    "--set", "model.embed_dim=32", "--set", "model.num_heads=2", "--set", "model.decoder_depth=1",
    "--set", "model.regressor_depth=1", "--set", "train.log_every=1",
    "--set", "probe.after_pretrain=false", "--device", "cpu",
]  # fmt: skip


def test_two_ranks_with_half_batches_match_one_process_with_the_full_batch(tmp_path):
    assert main([*RUN, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dsmae",
        *RUN,
        "--micro-batch",
        "8",
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    for a, b in zip(one, two):
        for key in ("loss", "loss_y", "loss_z"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key)
    weights = [load_checkpoint(tmp_path / n / "last.pt")["model"] for n in ("one", "two")]
    # float tolerance: summing in another order moves gradients by rounding errors, and
    # Adam scales an update by 1/sqrt(v), so parameters whose gradient is ~0 (the key bias
    # of attention, which softmax ignores) move by up to lr per step either way.
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-4), name
    # only rank 0 wrote: one metrics line per step, one config
    assert sorted(p.name for p in (tmp_path / "two").glob("*.yaml")) == ["config.yaml"]
