"""End-to-end tests of every ``dsmae`` command, on tiny models and real or fake data."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from saved_results import latest_result
from torchvision_fakes import patch_cifar10, patch_stl10, write_fake_cifar10, write_fake_stl10

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main


@pytest.fixture
def small(tiny_run) -> list[str]:
    """Shrinks any run to seconds: the tiny run's model (one block, patch 4 unless a flag
    says otherwise), one epoch, on the CPU."""
    return [*tiny_run.model_args, "--epochs", "1", "--device", "cpu"]


def test_quickstart_pretrains_probes_and_draws(tmp_path, capsys, small):
    out = tmp_path / "qs"
    args = ["pretrain", "--preset", "quickstart", "--out", str(out), "--patch-size", "4"]
    args += [*small, "--set", "probe.epochs=2", "--set", "probe.warmup_epochs=0"]
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


def test_linprobe_command(tmp_path, capsys, small):
    out = tmp_path / "run"
    run = ["pretrain", "--preset", "quickstart", "--out", str(out), *small, "--patch-size", "2"]
    assert main(run) == 0
    args = ["linprobe", "--checkpoint", str(out / "last.pt"), "--epochs", "2", "--pool", "avg"]
    assert main(args) == 0
    assert "linear probe top-1 (pre-trained encoder, last epoch of 2)" in capsys.readouterr().out
    result = latest_result(out, "last.linprobe")  # beside the 50-epoch probe of the run
    assert result["pool"] == "avg" and result["epochs"] == 2
    assert main([*args, "--random-init"]) == 0
    assert "random-init encoder" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["dsmae", "dsmae-ly", "dsmae-lz", "mae"])
def test_every_method_from_the_command_line(tmp_path, method, small):
    out = tmp_path / method
    args = ["pretrain", "--method", method, "--data", "digits", "--img-size", "8"]
    args += ["--patch-size", "2", "--in-chans", "1", "--batch-size", "128", "--out", str(out)]
    args += ["--noise-ratio", "0.5", "--lam", "0.3", "--seed", "3", *small]
    assert main(args) == 0
    cfg = load_checkpoint(out / "last.pt")["config"]
    assert cfg["model"]["method"] == method and cfg["model"]["noise_ratio"] == 0.5
    assert cfg["model"]["lam"] == 0.3 and cfg["train"]["seed"] == 3
    assert cfg["train"]["batch_size"] == 128
    probe = ["linprobe", "--checkpoint", str(out / "last.pt"), "--epochs", "1"]
    assert main(probe) == 0  # the probe works on every variant's encoder


def test_image_folder(tmp_path, cifar_folder, small):
    out = tmp_path / "mine"
    args = ["pretrain", "--data", str(cifar_folder), "--arch", "vit_small", "--img-size", "16"]
    args += ["--patch-size", "4", "--batch-size", "64", "--out", str(out), *small]
    assert main(args) == 0
    cfg = load_checkpoint(out / "last.pt")["config"]
    assert cfg["data"]["source"] == str(cifar_folder) and len(cfg["data"]["mean"]) == 3
    assert main(["linprobe", "--checkpoint", str(out / "last.pt"), "--epochs", "1"]) == 0


def _pretrain_downloaded(tmp_path, small: list[str], dataset: str, *shape: str):
    """Pre-train on ``dataset`` downloaded into ``tmp_path/datasets`` (its root, returned),
    the run in ``tmp_path/dataset``."""
    root = tmp_path / "datasets"
    args = ["pretrain", "--data", dataset, "--download", "--data-root", str(root), *shape]
    assert main([*args, "--out", str(tmp_path / dataset), *small]) == 0
    return root


def test_cifar10_download_path(tmp_path, monkeypatch, serve, small):
    patch_cifar10(monkeypatch, write_fake_cifar10(tmp_path / "server"), serve)
    shape = ["--arch", "vit_tiny", "--patch-size", "8", "--batch-size", "4"]
    root = _pretrain_downloaded(tmp_path, small, "cifar10", *shape)
    assert (root / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert load_checkpoint(tmp_path / "cifar10" / "last.pt")["step"] == 2  # 10 images // 4


def test_stl10_download_path(tmp_path, monkeypatch, serve, small):
    patch_stl10(monkeypatch, write_fake_stl10(tmp_path / "server"), serve)
    _pretrain_downloaded(tmp_path, small, "stl10", "--img-size", "96", "--patch-size", "24",
                         "--batch-size", "3")  # fmt: skip
    assert load_checkpoint(tmp_path / "stl10" / "last.pt")["step"] == 3  # (4 + 5) // 3


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


def test_a_killed_run_resumes_to_the_same_weights_bit_for_bit(tmp_path, tiny_run):
    # 256 images, patch 2: 8 steps an epoch of 16 tokens
    more = ["--set", "data.subset=256", "--patch-size", "2", "--set", "train.keep_checkpoints=2"]
    run = tiny_run.args("--epochs", "6", *more)
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


# ------------------------------------------------------- bad input: a message, no traceback


def _broken_folder(cifar_folder, tmp_path):
    """40 real CIFAR-10 training images (4 classes) plus one truncated file."""
    import shutil

    folder = tmp_path / "photos"
    for cls in sorted(p.name for p in (cifar_folder / "train").iterdir())[:4]:
        shutil.copytree(cifar_folder / "train" / cls, folder / cls)
    good = next((folder / "airplane").glob("*.jpg")).read_bytes()
    (folder / "airplane" / "zz-cut.jpg").write_bytes(good[: len(good) // 3])
    return folder


def test_a_bad_image_is_named_and_can_be_skipped(tmp_path, cifar_folder, capsys, small):
    folder = _broken_folder(cifar_folder, tmp_path)
    run = ["pretrain", "--data", str(folder), "--img-size", "16", "--patch-size", "4",
           "--batch-size", "16", *small, "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "zz-cut.jpg" in err and "--skip-bad-images" in err and "Traceback" not in err
    assert main([*run, "--skip-bad-images"]) == 0
    assert (tmp_path / "run" / "last.pt").is_file()


def test_shards_refuses_what_it_cannot_write_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "out")
    for args, message in [
        ([str(tmp_path / "none"), out, "--shard-size", "8"], "none is not a folder"),
        ([str(tmp_path / "empty"), out, "--shard-size", "8"], "No images found in"),
        ([str(tmp_path), out, "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    ]:
        assert main(["shards", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dsmae shards: error: ") and message in err
        assert err.count("\n") == 1
    assert not Path(out).exists() or not any(Path(out).iterdir())


def test_a_linear_probe_needs_class_folders(tmp_path, cifar_folder, capsys, small):
    import shutil

    flat = tmp_path / "flat"
    for split in ("train", "test"):
        (flat / split).mkdir(parents=True)
        for i, image in enumerate(sorted((cifar_folder / split).rglob("*.jpg"))[:20]):
            shutil.copy(image, flat / split / f"{i}.jpg")
    run = ["pretrain", "--data", str(flat), "--img-size", "16", "--patch-size", "4",
           "--batch-size", "10", *small, "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(run) == 0
    capsys.readouterr()
    assert main(["linprobe", "--checkpoint", str(tmp_path / "run" / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert "needs class labels (for a folder: one sub-folder per class)" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "model.noise_ratio=1.5"], "model.noise_ratio: must be in (0, 1], got 1.5"),
        (["--lam", "2"], "model.lam: must be in [0, 1], got 2.0"),
        (["--set", "train.momentum_end=1"], "train.momentum_end: must be in [0, 1), got 1"),
        (["--img-size", "30", "--patch-size", "4"], "4 does not divide model.img_size=30"),
        (["--arch", "vit_huge"], "vit_tiny, vit_small, vit_base"),
        (["--method", "beit"], "dsmae, dsmae-ly, dsmae-lz, mae"),
        (["--preset", "imagenet"], "unknown preset 'imagenet'; available:"),
        (["--set", "model.lamda=0.5"], "unknown config key 'model.lamda'"),
        (["--data", ".", "--download"], "data.download: data.source='.' is a folder"),
    ],
)
def test_impossible_settings_are_refused_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["pretrain", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing was written, so nothing was run


def test_a_yaml_file_with_an_unknown_key_is_refused(tmp_path, capsys):
    bad = tmp_path / "mine.yaml"
    bad.write_text("train:\n  epochs: 5\n  warmup_epoch: 1\n")
    assert main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "unknown config key 'train.warmup_epoch'" in capsys.readouterr().err


def test_untrusted_or_mismatched_checkpoints_are_refused(tmp_path, capsys, small):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    evil = tmp_path / "evil.pt"
    torch.save({"config": {}, "model": {"payload": Evil()}}, evil)
    run = ["pretrain", "--preset", "quickstart", "--patch-size", "4", *small]
    for command in (
        ["linprobe", "--checkpoint", str(evil)],
        [*run, "--out", str(tmp_path / "r"), "--resume", str(evil)],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "refused to load" in err and "Traceback" not in err
    assert not (tmp_path / "PWNED").exists() and not (Path.cwd() / "PWNED").exists()

    # a checkpoint whose weights do not fit the model its config describes
    assert main([*run, "--out", str(tmp_path / "ok")]) == 0
    state = load_checkpoint(tmp_path / "ok" / "last.pt")
    state["config"]["model"]["embed_dim"] = 64
    torch.save(state, tmp_path / "odd.pt")
    capsys.readouterr()
    odd = str(tmp_path / "odd.pt")
    for command in (
        ["linprobe", "--checkpoint", odd],
        ["finetune", "--checkpoint", odd, "--epochs", "1"],
        ["denoise", "--checkpoint", odd, "x.png"],
        ["export", "--checkpoint", odd, "--out", str(tmp_path / "e")],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "do not fit the model its config describes" in err, command
        assert "checkpoint (32,) vs model (64,)" in err and "Traceback" not in err

    # resuming with another architecture lists what differs
    changed = [*run, "--out", str(tmp_path / "ok"), "--resume", "auto", "--set", "model.depth=2"]
    assert main(changed) == 2
    assert "model.depth: 1 -> 2" in capsys.readouterr().err


# ------------------------------------------------------- evaluate, look, take away


def test_knn_command(digits_run, capsys):
    checkpoint = str(digits_run / "last.pt")
    assert main(["knn", "--checkpoint", checkpoint, "--k", "5", "--device", "cpu"]) == 0
    assert "k-NN top-1 (pre-trained encoder, k=5, avg):" in capsys.readouterr().out
    saved = latest_result(digits_run, "last.knn")
    assert saved["k"] == 5 and saved["num_classes"] == 10 and saved["num_test"] == 449
    assert 10 < saved["top1"] <= 100 and saved["pool"] == "avg"  # the default
    assert main(["knn", "--checkpoint", checkpoint, "--random-init", "--pool", "cls"]) == 0
    cls = latest_result(digits_run, "last.knn-cls-random-init")
    assert cls["pool"] == "cls" and cls["random_init"]


def test_knn_takes_the_checkpoints_vote_unless_a_flag_gives_one(digits_run, tmp_path, capsys):
    state = load_checkpoint(digits_run / "last.pt")
    state["config"]["monitor"].update(knn_k=5, knn_temperature=0.5)  # saved with the run
    torch.save(state, tmp_path / "last.pt")
    command = ["knn", "--checkpoint", str(tmp_path / "last.pt"), "--device", "cpu"]
    assert main(command) == 0
    saved = json.loads((tmp_path / "last.knn.json").read_text())
    assert (saved["k"], saved["temperature"]) == (5, 0.5)
    assert main([*command, "--k", "7", "--temperature", "0.1"]) == 0
    saved = latest_result(tmp_path, "last.knn")  # beside the first, which stays
    assert (saved["k"], saved["temperature"]) == (7, 0.1)
    assert "k=7" in capsys.readouterr().out


def test_export_command(digits_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(digits_run / "last.pt"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_export_command_with_onnx_and_the_cls_token(digits_run, tmp_path, capsys):
    out = tmp_path / "exported"
    command = ["export", "--checkpoint", str(digits_run / "last.pt"), "--out", str(out)]
    assert main([*command, "--onnx", "--pool", "cls"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"encoder written to {out}: model.safetensors, config.json, encoder.onnx"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "encoder.onnx", "model.safetensors"
    ]  # fmt: skip
    assert json.loads((out / "config.json").read_text())["global_pool"] == "token"


@pytest.mark.parametrize(
    "hub", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
    ids=["offline", "unreachable"],
)  # fmt: skip
def test_export_push_without_the_hub_is_one_line_and_exit_2(digits_run, tmp_path, hub):
    import os

    out = tmp_path / "exported"
    command = [sys.executable, "-m", "dsmae", "export", "--checkpoint", str(digits_run / "last.pt"),
               "--out", str(out), "--push-to-hub", "someone/digits"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), **hub)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        f"dsmae export: error: could not push {out} to the Hugging Face Hub repo someone/digits"
    )
    assert done.stdout.startswith(f"encoder written to {out}")  # the export is kept
    assert (out / "model.safetensors").is_file()


def test_features_command(digits_run, cifar_folder, tmp_path, capsys):
    import numpy as np

    from dsmae.data.folder_layout import find_image_files

    folder = cifar_folder / "test"  # any folder: RGB photos into a grey 8x8 digits model
    out = tmp_path / "feats.npy"
    run = ["features", "--checkpoint", str(digits_run / "last.pt"), "--data", str(folder)]
    assert main([*run, "--out", str(out), "--device", "cpu"]) == 0
    feats = np.load(out)
    names = (tmp_path / "feats.files.txt").read_text().splitlines()
    files = find_image_files(folder)
    assert feats.shape == (len(files), 32) and feats.dtype == np.float32
    assert names == [p.relative_to(folder).as_posix() for p in files]
    assert "feats.files.txt" in capsys.readouterr().out
    # the default reads the mean of the patch tokens; --pool cls the [CLS] token
    cls = tmp_path / "cls.npy"
    assert main([*run, "--out", str(cls), "--device", "cpu", "--pool", "cls"]) == 0
    assert not np.allclose(np.load(cls), feats)


@pytest.mark.parametrize("fixture,first", [("digits_run", "noisy"), ("digits_mae_run", "masked")])
def test_denoise_command(request, fixture, first, cifar_folder, tmp_path, capsys):
    from PIL import Image

    run = request.getfixturevalue(fixture)
    images = sorted((cifar_folder / "test").rglob("*.jpg"))[:3]
    out = tmp_path / "fig.png"
    command = ["denoise", "--checkpoint", str(run / "last.pt"), *map(str, images)]
    assert main([*command, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 image(s); PSNR on the corrupted patches: input" in printed
    with Image.open(out) as figure:
        assert figure.width > 3 * 96  # two triplets per row, each image scaled to 96 px


def test_denoise_refuses_a_model_without_decoder(tmp_path, capsys, tiny_digits_run):
    run = tiny_digits_run(tmp_path / "lz", "dsmae-lz")
    assert main(["denoise", "--checkpoint", str(run / "last.pt"), "x.png"]) == 2
    assert "no pixel decoder" in capsys.readouterr().err


def test_plot_command(digits_run, capsys):
    assert main(["plot", str(digits_run)]) == 0
    assert (digits_run / "curves.png").is_file()
    assert "curves.png" in capsys.readouterr().out
