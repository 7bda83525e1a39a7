"""The ``smoke`` stage: every ``dsmae`` command once, its pass/fail table."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from runs import set_args

from .bench import _release_gpu_memory
from .plan import SHRUNK_COMPILE, TINY_MODEL, _write

QUICKSTART_BENCH = ["--arch", "vit_tiny", "--img-size", "8", "--patch-size", "2", "--in-chans",
                    "1", "--depth", "4", "--embed-dim", "96", "--num-heads", "3"]  # fmt: skip


EAGER = ["--set", "train.amp=false", "--set", "train.compile=false"]


BF16_COMPILED = ["--set", "train.amp=true", "--set", "train.compile=true"]


def smoke_plan(work: Path, device: str, shrink: bool) -> list[tuple[str, list[str]]]:
    """Every command once, on the quickstart-sized model (``shrink``: the tiny one), in
    the order they depend on each other: (name, ``dsmae`` arguments). All run eager in
    fp32, but for pre-training and fine-tuning, which run again in bf16 compiled."""
    images, run = _digit_folders(work), work / "pretrain"
    checkpoint = str(run / "last.pt")
    model = [*set_args(TINY_MODEL), "--set", "model.patch_size=4"] if shrink else []
    compiled = [*BF16_COMPILED, *_shrunk_compile(shrink)]
    quick = ["--preset", "quickstart", "--set", "data.subset=256", "--epochs", "2",
             "--set", "probe.after_pretrain=false", "--device", device, *model]  # fmt: skip
    monitors = ["--set", "monitor.knn_every=1", "--set", "monitor.images_every=1"]
    finetune = ["finetune", "--checkpoint", checkpoint, "--epochs", "1", "--batch-size", "64",
                "--set", "finetune.warmup_epochs=0", "--set", "finetune.workers=2"]  # fmt: skip
    test_images = sorted((images / "test").rglob("*.png"))[:8]
    bench = QUICKSTART_BENCH + (["--depth", "1", "--embed-dim", "32", "--num-heads", "2"]
                                if shrink else [])  # fmt: skip
    experiment = [
        "experiment", "table3", "--datasets", "cifar10", "--archs", "vit_tiny", "--epochs",
        "1", "--subset", "64", "--probe-epochs", "2", "--data", f"cifar10={images}",
        "--results", str(work / "experiment"), "--device", device,
        *set_args(TINY_MODEL),
        "--set", "model.patch_size=8", "--set", "train.batch_size=32",
        "--set", "monitor.knn_every=0", "--set", "monitor.images_every=0", *EAGER,
    ]  # fmt: skip
    on = ["--checkpoint", checkpoint, "--device", device]
    # a GPU node may lack the onnx extra (and no package can be installed there)
    onnx = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))
    export_name, export_onnx = ("export --onnx", ["--onnx"]) if onnx else ("export (no onnx)", [])
    plan = {
        "pretrain": ["pretrain", *quick, *EAGER, *monitors, "--out", str(run)],
        "pretrain bf16 compiled": ["pretrain", *quick, *compiled, *monitors, "--out",
                                   str(work / "pretrain-compiled")],
        "linprobe fast": ["linprobe", *on, "--epochs", "10"],
        "linprobe mae": ["linprobe", *on, "--recipe", "mae", "--epochs", "1"],
        "knn": ["knn", *on],
        "finetune": [*finetune, "--device", device, *EAGER],
        "finetune bf16 compiled": [*finetune, "--device", device, *compiled],
        "denoise": ["denoise", *on, "--out", str(work / "denoise.png"), *map(str, test_images)],
        export_name: ["export", "--checkpoint", checkpoint, "--out", str(work / "export"),
                      *export_onnx],
        "features": ["features", *on, "--data", str(images / "test"), "--out",
                     str(work / "features.npy")],
        "bench": ["bench", "--method", "dsmae", *bench, "--batch-size", "64", "--steps", "3",
                  "--no-compile", "--device", device, "--json"],
        "experiment": experiment,
    }  # fmt: skip
    return list(plan.items())


def _shrunk_compile(shrink: bool) -> list[str]:
    """``--set`` arguments of :data:`SHRUNK_COMPILE` where ``shrink``."""
    return set_args(SHRUNK_COMPILE) if shrink else []


def _digit_folders(work: Path, train: int = 20, test: int = 5) -> Path:
    """scikit-learn's real digits as an image folder (``train/`` and ``test/``, a folder per
    class, 8x8 grey PNGs), ``train`` and ``test`` images per class."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root, counts = work / "digits", {}
    digits = load_digits()
    for image, label in zip(digits.images, digits.target, strict=True):
        n = counts[label] = counts.get(label, 0) + 1
        if n > train + test:
            continue
        folder = root / ("train" if n <= train else "test") / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{n:03d}.png")
    return root


def stage_smoke(results: Path, args: argparse.Namespace) -> None:
    """Every command (:func:`smoke_plan`) in this process, one after another: each one's
    exit status, seconds and error line go to ``smoke.json`` as soon as it ends (a stage
    killed by its time limit keeps what ran); ``smoke.md`` is the pass/fail table."""
    import contextlib
    import io
    import shutil

    from dsmae.cli import main as dsmae

    work = results / "smoke"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    table: dict[str, dict[str, Any]] = {}
    for name, argv in smoke_plan(work, args.device, args.shrink):
        print(f"== smoke: {name}: dsmae {shlex.join(argv)}", flush=True)
        started, errors = time.monotonic(), io.StringIO()
        try:
            with contextlib.redirect_stderr(_Tee(errors, sys.stderr)):
                code: int | str = dsmae(argv)
        except BaseException as err:  # a bug or a crash: the table says which, then on
            code = type(err).__name__
            errors.write(f"{type(err).__name__}: {err}\n")
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        error = None if code == 0 else (lines[-1] if lines else f"exit status {code}")
        table[name] = {"passed": code == 0, "exit": code, "seconds": time.monotonic() - started,
                       "error": error, "command": shlex.join(["dsmae", *argv])}  # fmt: skip
        _write(results / "smoke.json", table)
        _release_gpu_memory()
    (results / "smoke.md").write_text(smoke_table(table))
    print(smoke_table(table))
    shutil.rmtree(work / "digits", ignore_errors=True)


class _Tee:
    """A text stream that writes to several; anything else is the last one's."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the terminal's
        return getattr(self.streams[-1], name)


def smoke_table(table: dict[str, dict[str, Any]]) -> str:
    """The markdown pass/fail table of a smoke stage."""
    lines = ["| command | result | seconds | error |", "| --- | --- | --- | --- |"]
    for name, row in table.items():
        error = (row["error"] or "").replace("|", "/")[:120]
        result = "pass" if row["passed"] else "FAIL"
        lines.append(f"| {name} | {result} | {row['seconds']:.1f} | {error} |")
    passed = sum(row["passed"] for row in table.values())
    return "\n".join([*lines, "", f"{passed} of {len(table)} commands passed"]) + "\n"
