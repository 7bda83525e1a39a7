"""``benchmarks/gpu_check.sh``: its whole flow on the CPU, shrunk, with no package index
and no proxy, as it must run on a GPU node that reaches no registry."""

import importlib.util
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_epochs_are_chosen_to_fit_the_wall_time():
    schedule = _check_module().schedule
    # 50k images at batch 1024: 48 full steps = 49,152 images an epoch; 120 s at
    # 40,000 img/s = 4.8M images = 97.66 epochs -> 97, warm-up 20/500 of it -> 4
    assert schedule(120, 40_000, 1024, 50_000) == (97, 4)
    assert schedule(1, 10, 1024, 50_000) == (1, 1)  # never less than one epoch


def _archive(tmp_path: Path) -> Path:
    """A CIFAR-10-shaped archive (cifar10/{train,test}/<class>/N.jpg) of real images: the
    scikit-learn digits, 12 train and 6 test per class, at 32x32 RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root, counts = tmp_path / "build" / "cifar10", {}
    for image, label in zip(digits.images, digits.target):
        n = counts[label] = counts.get(label, 0) + 1
        if n > 18:
            continue
        split = "train" if n <= 12 else "test"
        grey = (image / 16 * 255).astype(np.uint8)
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = Image.fromarray(np.stack([grey, 255 - grey, grey], axis=-1)).resize((32, 32))
        rgb.save(folder / f"{n:04d}.jpg")
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar10")
    return archive


def _no_installer_path(tmp_path: Path) -> str:
    """A PATH whose pip, pip3, uv and conda only leave a mark that they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("pip", "pip3", "uv", "conda"):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\ntouch {tmp_path}/installer-called\nexit 1\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.skipif(sys.platform != "linux", reason="the check is a bash script for Linux")
def test_the_whole_check_runs_offline_on_cpu(tmp_path):
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        PIP_NO_INDEX="1",
        PIP_INDEX_URL="http://127.0.0.1:9/simple",  # a closed port: any fetch would fail
        PYTHON=sys.executable,
        PATH=_no_installer_path(tmp_path),
    )
    argv = ["bash", str(ROOT / "benchmarks/gpu_check.sh"), str(results), str(_archive(tmp_path)),
            "--device", "cpu", "--shrink", "--seconds", "3", "--budget", "600"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "installer-called").exists()
    assert not (ROOT / ".venv-gpu-check").exists()

    for label in ("env", "bench-tiny", "pretrain-dsmae", "pretrain-mae", "eval", "bench-small"):
        assert (results / f"{label}.rc").read_text().strip() == "0", label
    summary = json.loads((results / "summary.json").read_text())
    assert summary["env"]["matmul_tflops"] > 0
    modes = {"eager", "compiled"}
    expected = {f"{m}-{a}-{mode}" for m in ("dsmae", "mae") for a in ("vit_tiny", "vit_small")
                for mode in modes} | {"dsmae-vit_tiny-compiled-blocks"}  # fmt: skip
    assert set(summary["bench"]) == expected
    for name, result in summary["bench"].items():
        assert result["img_per_s"] > 0 and 0 < result["mfu"] < 1, name
        assert result["data_share"] > 0 and result["peak_mem_mb"] > 0, name
        assert result["compile"] == name.endswith(("compiled", "compiled-blocks")), name
        assert result["command"].startswith("dsmae bench --method"), name
    for method in ("dsmae", "mae"):
        run = summary[f"pretrain-{method}"]
        assert run["returncode"] == 0 and run["epochs"] >= 1
        assert run["steps"] == run["epochs"] * (120 // 16)  # every planned step was taken
        assert run["step_mode"] == "compiled" and run["compile_s"] > 0
        for protocol in ("linprobe", "knn"):
            result = summary["eval"][method][protocol]
            assert result["pool"] == "avg" and 0 <= result["top1"] <= 100
            assert (result["num_train"], result["num_test"]) == (120, 60)
    assert summary["eval"]["random init"]["linprobe"]["random_init"] is True
    assert set(summary["projection_500_epochs_min"]) >= {"pretrain dsmae"}
    table = (results / "summary.md").read_text()
    assert table in done.stdout  # printed at the end
    assert "| dsmae vit_tiny 16/4 | compiled |" in table and "| random init |" in table
    assert not (results / "data").exists()  # the extracted images are removed
