"""End-to-end tests of every ``dsmae`` command, on tiny models and real or fake data."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from torchvision_fakes import patch_cifar10, patch_stl10, write_fake_cifar10, write_fake_stl10

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main

# shrink any run to seconds: a 1-block ViT, patch 4, one epoch
SMALL = [
    "--set", "model.depth=1", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
    "--set", "model.decoder_depth=1", "--set", "model.regressor_depth=1",
    "--epochs", "1", "--device", "cpu",
]  # fmt: skip


def test_quickstart_pretrains_probes_and_draws(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["pretrain", "--preset", "quickstart", "--out", str(out), "--patch-size", "4"]
    args += [*SMALL, "--set", "probe.epochs=2", "--set", "probe.warmup_epochs=0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "linear probe top-1, pre-trained encoder:" in printed
    assert "linear probe top-1, same encoder at random init:" in printed
    for name in (
        "last.pt",
        "config.yaml",
        "metrics.jsonl",
        "denoise.png",
        "last.linprobe.json",
        "last.linprobe-random-init.json",
    ):
        assert (out / name).is_file(), name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["patch_size"] == 4 and saved["train"]["epochs"] == 1


def test_linprobe_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "quickstart", "--out", str(out), *SMALL]) == 0
    args = ["linprobe", "--checkpoint", str(out / "last.pt"), "--epochs", "2", "--pool", "avg"]
    assert main(args) == 0
    assert "linear probe top-1 (pre-trained encoder, last epoch of 2)" in capsys.readouterr().out
    result = json.loads((out / "last.linprobe.json").read_text())
    assert result["pool"] == "avg" and result["epochs"] == 2
    assert main([*args, "--random-init"]) == 0
    assert "random-init encoder" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["dsmae", "dsmae-ly", "dsmae-lz", "mae"])
def test_every_method_from_the_command_line(tmp_path, method):
    out = tmp_path / method
    args = ["pretrain", "--method", method, "--data", "digits", "--img-size", "8"]
    args += ["--patch-size", "2", "--in-chans", "1", "--batch-size", "128", "--out", str(out)]
    args += ["--noise-ratio", "0.5", "--lam", "0.3", "--seed", "3", *SMALL]
    assert main(args) == 0
    cfg = load_checkpoint(out / "last.pt")["config"]
    assert cfg["model"]["method"] == method and cfg["model"]["noise_ratio"] == 0.5
    assert cfg["model"]["lam"] == 0.3 and cfg["train"]["seed"] == 3
    assert cfg["train"]["batch_size"] == 128
    probe = ["linprobe", "--checkpoint", str(out / "last.pt"), "--epochs", "1"]
    assert main(probe) == 0  # the probe works on every variant's encoder


def test_image_folder(tmp_path, cifar_folder):
    out = tmp_path / "mine"
    args = ["pretrain", "--data", str(cifar_folder), "--arch", "vit_small", "--img-size", "16"]
    args += ["--patch-size", "4", "--batch-size", "64", "--out", str(out), *SMALL]
    assert main(args) == 0
    cfg = load_checkpoint(out / "last.pt")["config"]
    assert cfg["data"]["source"] == str(cifar_folder) and len(cfg["data"]["mean"]) == 3
    assert main(["linprobe", "--checkpoint", str(out / "last.pt"), "--epochs", "1"]) == 0


def test_cifar10_download_path(tmp_path, monkeypatch, serve):
    patch_cifar10(monkeypatch, write_fake_cifar10(tmp_path / "server"), serve)
    root = tmp_path / "datasets"
    args = ["pretrain", "--data", "cifar10", "--download", "--data-root", str(root)]
    args += ["--arch", "vit_tiny", "--patch-size", "8", "--batch-size", "4"]
    args += ["--out", str(tmp_path / "c10"), *SMALL]
    assert main(args) == 0
    assert (root / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert load_checkpoint(tmp_path / "c10" / "last.pt")["step"] == 2  # 10 images // 4


def test_stl10_download_path(tmp_path, monkeypatch, serve):
    patch_stl10(monkeypatch, write_fake_stl10(tmp_path / "server"), serve)
    root = tmp_path / "datasets"
    args = ["pretrain", "--data", "stl10", "--download", "--data-root", str(root)]
    args += ["--img-size", "96", "--patch-size", "24", "--batch-size", "3"]
    args += ["--out", str(tmp_path / "stl"), *SMALL]
    assert main(args) == 0
    assert load_checkpoint(tmp_path / "stl" / "last.pt")["step"] == 3  # (4 + 5) // 3


def test_missing_data_offline_is_a_message_not_a_traceback(tmp_path, capsys):
    args = ["pretrain", "--data", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--download" in err and "folder" in err and "Traceback" not in err


def test_bad_values_are_refused_naming_the_key(tmp_path, capsys):
    assert main(["pretrain", "--patch-size", "3", "--out", str(tmp_path)]) == 2
    assert "model.patch_size" in capsys.readouterr().err
    assert main(["pretrain", "--set", "train.epoch=3"]) == 2
    assert "train.epoch" in capsys.readouterr().err
    assert main(["linprobe", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["pretrain", "--preset", "quickstart", "--lam", "0.4", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["lam"] == 0.4 and cfg["data"]["source"] == "digits"


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "dsmae", "pretrain", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in (
        "--method",
        "--arch",
        "--data",
        "--img-size",
        "--patch-size",
        "--epochs",
        "--batch-size",
        "--noise-ratio",
        "--lam",
        "--out",
        "--device",
        "--seed",
    ):
        assert flag in done.stdout


def test_a_killed_run_resumes_to_the_same_weights_bit_for_bit(tmp_path):
    run = [
        "pretrain",
        "--preset",
        "quickstart",
        "--epochs",
        "6",
        "--batch-size",
        "32",
        "--set",
        "data.subset=256",
        "--set",
        "probe.after_pretrain=false",
        "--set",
        "train.log_every=1",
        "--set",
        "train.keep_checkpoints=2",
        *SMALL[:-4],
    ]
    assert main([*run, "--out", str(tmp_path / "straight")]) == 0

    out = tmp_path / "killed"
    every_step = ["--set", "train.checkpoint_minutes=1e-9", "--out", str(out)]
    child = subprocess.Popen(
        [sys.executable, "-m", "dsmae", *run, *every_step],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)  # in the middle of epoch 2 of 6 (8 steps an epoch)
    child.wait()
    assert not (out / "last.pt").exists(), "the run ended before it could be killed"

    assert main([*run, *every_step, "--resume", "auto"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(out / "last.pt")
    assert straight["step"] == resumed["step"] == 48
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
