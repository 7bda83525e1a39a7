"""``benchmarks/gpu_check.sh``: its whole flow on the CPU, shrunk, with no package index
and no proxy, as it must run on a GPU node that reaches no registry."""

import argparse
import importlib
import json
import math
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
    """The package ``benchmarks/gpu_check``, imported as its ``__main__`` imports it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def test_epochs_are_chosen_to_fit_the_wall_time():
    check = _check_module()
    # 50k images at batch 1024: 48 full steps = 49,152 images an epoch; 120 s at
    # 40,000 img/s = 4.8M images = 97.66 epochs -> 97, warm-up 20/500 of it -> 4
    assert check.schedule(120, 40_000, 1024, 50_000) == (97, 4)
    assert check.schedule(1, 10, 1024, 50_000) == (1, 1)  # never less than one epoch
    # the same epochs for two methods in 2 x 120 s: at 9001 and 23504 img/s an epoch takes
    # 5.461 + 2.091 = 7.552 s, so 240 s hold 31.78 -> 31 epochs; their harmonic mean
    together = check.shared_rate([9001, 23504])
    assert together == pytest.approx(2 / (1 / 9001 + 1 / 23504))
    assert check.schedule(120, together, 1024, 50_000) == (31, 1)


def test_a_method_without_a_measured_rate_is_benchmarked_before_it_pre_trains(
    tmp_path, monkeypatch
):
    check, results = _check_module(), tmp_path / "results"
    results.mkdir()
    (results / "bench-dsmae-vit_tiny-compiled.json").write_text('{"img_per_s": 100.0}')
    benched = []

    def bench(results_dir, args):  # stands in for the bench stage: writes mae's figure
        benched.append(args.only)
        (results_dir / f"bench-{args.only}.json").write_text('{"img_per_s": 300.0}')

    monkeypatch.setattr(check.bench, "stage_bench", bench)  # what measured_rates calls
    args = argparse.Namespace(shrink=True, device="cpu", only=None, rows="rates", budget=1.0)
    rates = check.measured_rates(results, args)
    assert benched == ["mae-vit_tiny-compiled"]
    assert rates == {"dsmae": (100.0, "compiled"), "mae": (300.0, "compiled")}

    monkeypatch.setattr(check.bench, "stage_bench", lambda results_dir, args: None)  # none
    (results / "bench-mae-vit_tiny-compiled.json").unlink()
    with pytest.raises(SystemExit, match="mae: no step rate could be measured"):
        check.measured_rates(results, args)


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

    labels = ("smoke", "env", "rates", "pretrain-dsmae", "pretrain-mae", "equal-time", "eval",
              "speed")  # fmt: skip
    for label in labels:
        assert (results / f"{label}.rc").read_text().strip() == "0", label
    summary = json.loads((results / "summary.json").read_text())
    smoke = summary["smoke"]
    assert {"pretrain", "pretrain bf16 compiled", "linprobe fast", "linprobe mae", "knn",
            "finetune", "finetune bf16 compiled", "denoise", "export --onnx", "features",
            "bench", "experiment"} == set(smoke)  # fmt: skip
    assert all(row["passed"] and row["error"] is None for row in smoke.values()), smoke
    assert "12 of 12 commands passed" in (results / "smoke.md").read_text()
    assert summary["env"]["matmul_tflops"] > 0
    bench = summary["bench"]
    assert bench["dsmae-vit_tiny-compiled-bf16-residual-fast-norm"]["bf16_residual"] is True
    assert bench["dsmae-vit_tiny-compiled-bf16-residual-fast-norm"]["fast_norm"] is True
    assert bench["dsmae-vit_tiny-compiled-attention-flash"]["attention"] == "flash"
    autotuned = bench["dsmae-vit_tiny-compiled-blocks-max-autotune"]
    assert (autotuned["compile_scope"], autotuned["compile_mode"]) == (
        "blocks",
        "max-autotune-no-cudagraphs",
    )
    profiled = bench["dsmae-vit_tiny-compiled"]
    assert Path(profiled["profile_trace"]).is_file() and profiled["profile_top"]
    modes = {"eager", "compiled"}
    switches = {"compiled-blocks", "compiled-bf16-residual", "compiled-fast-norm",
                "compiled-bf16-residual-fast-norm", "compiled-attention-flash",
                "compiled-blocks-max-autotune"}  # fmt: skip
    expected = {f"{m}-{a}-{mode}" for m in ("dsmae", "mae") for a in ("vit_tiny", "vit_small")
                for mode in modes} | {f"dsmae-vit_tiny-{mode}" for mode in switches}  # fmt: skip
    assert set(summary["bench"]) == expected
    for name, result in summary["bench"].items():
        assert result["img_per_s"] > 0 and 0 < result["mfu"] < 1, name
        assert result["data_share"] > 0 and result["peak_mem_mb"] > 0, name
        assert result["compile"] == ("compiled" in name), name
        assert result["command"].startswith("dsmae bench --method"), name
    runs = [summary[f"pretrain-{method}"] for method in ("dsmae", "mae")]
    assert runs[0]["epochs"] == runs[1]["epochs"]  # the paper's comparison: equal epochs
    for method in ("dsmae", "mae"):
        run = summary[f"pretrain-{method}"]
        assert run["returncode"] == 0 and run["epochs"] >= 1
        measured = summary["bench"][f"{method}-vit_tiny-compiled"]["img_per_s"]
        assert run["bench_img_per_s"] == run["bench_img_per_s_both"][method] == measured
        assert run["steps"] == run["epochs"] * (120 // 16)  # every planned step was taken
        assert run["step_mode"] == "compiled" and run["compile_s"] > 0
        for protocol in ("linprobe", "knn"):
            result = summary["eval"][method][protocol]
            assert result["pool"] == "avg" and 0 <= result["top1"] <= 100
            assert (result["num_train"], result["num_test"]) == (120, 60)
    assert summary["eval"]["random init"]["linprobe"]["random_init"] is True
    equal_time = summary["pretrain-mae-equal-time"]
    assert equal_time["returncode"] == 0 and equal_time["epochs_done"] >= 1
    assert equal_time["time_budget_s"] == math.ceil(runs[0]["run_s"])  # dsmae's wall time
    assert equal_time["epochs"] == equal_time["epochs_done"] >= 1
    assert 0 <= summary["eval"]["mae at dsmae's time"]["knn"]["top1"] <= 100
    assert "| mae at dsmae's time |" in (results / "summary.md").read_text()
    assert set(summary["projection_500_epochs_min"]) >= {"pretrain dsmae"}
    table = (results / "summary.md").read_text()
    assert table in done.stdout  # printed at the end
    assert "| dsmae vit_tiny 16/4 | compiled |" in table and "| random init |" in table
    assert not (results / "data").exists()  # the extracted images are removed
