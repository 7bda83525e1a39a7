"""The stages of ``benchmarks/gpu_check.sh``; each is run, and time-limited, on its own.

    python3 benchmarks/gpu_check.py STAGE RESULTS_DIR [--device cuda] [--seconds 120]
        [--data FOLDER] [--rows rates|speed] [--budget S] [--shrink]

Stages (each writes its own files into RESULTS_DIR, so one that fails leaves the others):

- ``smoke``: every ``dsmae`` command once on the quickstart-sized model, in this process,
  all eager in fp32, then pre-training and fine-tuning in bf16 compiled: ``smoke.json``
  (exit status, seconds and error line of each, written as each ends) and the pass/fail
  table ``smoke.md``.

- ``env``: the machine, torch/timm versions and a bf16 8192^3 matmul (the MFU
  denominator): ``env.json``.
- ``bench --rows rates|speed``: ``dsmae bench`` (:func:`dsmae.bench.run_bench`, in this
  process) in bf16 (:func:`bench_plan`): "rates", dsmae and mae at ViT-Tiny 32/2 (batch
  1024) compiled, the step rates pre-training plans with, the dsmae step also profiled
  (``profile-bench-dsmae-vit_tiny-compiled.json``, a chrome trace, and its
  ``profile_top`` operators); "speed", the rest of the MFU table (ViT-Tiny eager,
  ViT-Small 96/6 at batch 256 eager and compiled) and the A/B of each speed switch:
  ``bench-METHOD-ARCH-MODE.json``. A benchmark that would not finish inside
  ``--budget`` seconds is skipped and says so.
- ``pretrain-dsmae`` / ``pretrain-mae``: ``dsmae pretrain`` of the cifar10-vit-tiny preset
  (SPEC defaults) at batch 1024 on the CIFAR-10 folder ``--data``, both for the same
  epochs, as many as take ``--seconds`` each on average at the rates ``bench --rows
  rates`` measured (a method not measured yet is benchmarked first): warm-up and cosine
  end on time. ``pretrain-METHOD/`` and ``pretrain-METHOD.json``.
- ``equal-time``: mae pre-trained for the wall time dsmae's pre-training took
  (``--time-budget``), for the equal-time reading: ``pretrain-mae-equal-time/`` and
  ``pretrain-mae-equal-time.json``.
- ``eval``: the avg-pooled linear probe and k-NN (full train/test split) of both and of
  the random-init encoder, and the k-NN of the equal-time mae, all at once: ``eval.json``.
- ``summary``: ``summary.json`` and the markdown table ``summary.md``, printed.

``--shrink`` runs the same flow with tiny models and batches, compiled steps on Dynamo's
``aot_eager`` backend rather than a CPU Inductor build (for the CPU test).
Nothing here installs anything: it runs with the interpreter that runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_check")

PAPER_EPOCHS = 500  # SPEC section 5
CIFAR10_TRAIN = 50_000
WARMUP_SHARE = 20 / 500  # SPEC section 5: 20 warm-up epochs of 500
SCIENCE = {"preset": "cifar10-vit-tiny", "batch": 1024}
# (method, arch, img, patch, batch, extra config): stage 2's steps, most needed first
BENCH = [
    ("dsmae", "vit_tiny", 32, 2, 1024),
    ("mae", "vit_tiny", 32, 2, 1024),
    ("dsmae", "vit_small", 96, 6, 256),
    ("mae", "vit_small", 96, 6, 256),
]
MODES = {  # name: config overrides; "blocks" only for the first row (regional compilation)
    "eager": {"train.compile": False},
    "compiled": {"train.compile": True, "train.compile_scope": "model"},
    "compiled-blocks": {"train.compile": True, "train.compile_scope": "blocks"},
}
# the speed switches, each A/B'd against "compiled" on the first row (dsmae ViT-Tiny 32/2)
SWITCHES = {
    "compiled-bf16-residual": {"train.bf16_residual": True},
    "compiled-fast-norm": {"train.fast_norm": True},
    "compiled-bf16-residual-fast-norm": {"train.bf16_residual": True, "train.fast_norm": True},
    "compiled-attention-flash": {"train.attention": "flash"},
    "compiled-attention-efficient": {"train.attention": "efficient"},
    "compiled-attention-cudnn": {"train.attention": "cudnn"},
    "compiled-blocks-max-autotune": {
        "train.compile_scope": "blocks",
        "train.compile_mode": "max-autotune-no-cudagraphs",
    },
}
CUDA_ONLY = ("compiled-attention-efficient", "compiled-attention-cudnn")
PRETRAIN_STAGES = ("pretrain-dsmae", "pretrain-mae", "equal-time")
EQUAL_TIME = "mae at dsmae's time"  # the rows of mae pre-trained for dsmae's wall time
PROFILED = "bench-dsmae-vit_tiny-compiled"  # the row whose steps are also profiled
# --shrink: the same flow at toy sizes, for a CPU test
TINY_MODEL = {
    "model.depth": 1,
    "model.embed_dim": 32,
    "model.num_heads": 2,
    "model.decoder_depth": 1,
    "model.regressor_depth": 1,
}
SHRUNK_COMPILE = {"train.compile_backend": "aot_eager"}  # Dynamo's path, not a CPU Inductor build
TINY_BENCH = [
    ("dsmae", "vit_tiny", 16, 4, 8),
    ("mae", "vit_tiny", 16, 4, 8),
    ("dsmae", "vit_small", 8, 2, 4),
    ("mae", "vit_small", 8, 2, 4),
]


def _write(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- stages


def stage_env(results: Path, args: argparse.Namespace) -> None:
    import timm
    import torch

    from dsmae.bench import device_name
    from dsmae.matmul_peak import matmul_peak_gflops

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = 8192 if cuda and not args.shrink else 256
    peak = matmul_peak_gflops(dev, dtype, size=size, repeats=10)
    env = {
        "device": device_name(dev),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "cpus": os.cpu_count(),
        "matmul_size": size,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tflops": peak / 1e3,
    }
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        env["gpu_memory_gib"] = props.total_memory / 2**30
        env["multiprocessors"] = props.multi_processor_count
    _write(results / "env.json", env)
    print(json.dumps(env, indent=2))


# ----------------------------------------------------------------------------- smoke

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
    model = [*_sets(TINY_MODEL), "--set", "model.patch_size=4"] if shrink else []
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
        *_sets(TINY_MODEL),
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
    return _sets(SHRUNK_COMPILE) if shrink else []


def _sets(values: dict[str, Any]) -> list[str]:
    """Dotted config values as ``--set KEY=VALUE`` arguments."""
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


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


def bench_plan(
    rows: str, shrink: bool, cuda: bool = True
) -> list[tuple[str, str, int, int, int, str]]:
    """The benchmarks of a bench stage, in the order they run.

    "rates": the science step (ViT-Tiny 32/2) of dsmae and mae compiled, as pre-training
    runs it: the rates the pre-training stages plan with. "speed": the rest of the MFU
    table, the science step eager, ViT-Small 96/6 eager and compiled, then dsmae at
    ViT-Tiny under regional compilation and with each of :data:`SWITCHES` (those of
    :data:`CUDA_ONLY` only on CUDA).
    """
    table = TINY_BENCH if shrink else BENCH
    if rows == "rates":
        return [(*row, "compiled") for row in table[:2]]
    plan = [(*row, "eager") for row in table[:2]]
    plan += [(*row, mode) for row in table[2:] for mode in ("eager", "compiled")]
    modes = ["compiled-blocks", *(m for m in SWITCHES if cuda or m not in CUDA_ONLY)]
    return plan + [(*table[0], mode) for mode in modes]


def _mode_overrides(mode: str) -> dict[str, Any]:
    """The config of a bench mode: one of :data:`MODES`, or a switch on top of "compiled"."""
    if mode in MODES:
        return dict(MODES[mode])
    return {**MODES["compiled"], **SWITCHES[mode]}


def stage_bench(results: Path, args: argparse.Namespace) -> None:
    from dsmae.bench import format_report, run_bench

    deadline = time.monotonic() + args.budget
    only = set(args.only.split(",")) if args.only else None
    cuda = args.device.startswith("cuda")
    steps, warmup = (2, 1) if args.shrink else (10, 3)
    for method, arch, img, patch, batch, mode in bench_plan(args.rows, args.shrink, cuda):
        name = f"bench-{method}-{arch}-{mode}"
        if only is not None and name.removeprefix("bench-") not in only:
            continue
        overrides = _mode_overrides(mode)
        if args.shrink:
            overrides.update(TINY_MODEL | (SHRUNK_COMPILE if mode != "eager" else {}))
        left = deadline - time.monotonic()
        need = 15 if mode == "eager" or args.shrink else 60
        if left < need:  # a compile would not finish: say so rather than be killed
            _write(results / f"{name}.json", {"skipped": f"{left:.0f} s left of the stage"})
            continue
        started = time.monotonic()
        try:
            profile = results / f"profile-{name}.json" if name == PROFILED else None
            result = run_bench(
                method, arch, img, patch, batch, steps=steps, warmup=warmup, device=args.device,
                overrides=overrides, profile=profile,
            )  # fmt: skip
        except Exception as err:  # one failure must not cost the other rows
            log.exception("%s failed", name)
            result = {"error": f"{type(err).__name__}: {err}"}
        else:
            print(format_report(result), flush=True)
        result["wall_s"] = time.monotonic() - started
        shape = (method, arch, img, patch, batch)
        result["command"] = _bench_command(*shape, args.device, overrides, steps)
        _write(results / f"{name}.json", result)
        _release_gpu_memory()


def _bench_command(
    method: str,
    arch: str,
    img: int,
    patch: int,
    batch: int,
    device: str,
    overrides: dict,
    steps: int,
) -> str:
    """The ``dsmae bench`` command line that measures the same thing."""
    argv = ["dsmae", "bench", "--method", method, "--arch", arch, "--img-size", str(img),
            "--patch-size", str(patch), "--batch-size", str(batch), "--steps", str(steps),
            "--device", device]  # fmt: skip
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(argv)


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_rate(results: Path, method: str, shrink: bool) -> tuple[float | None, str]:
    """The measured img/s of the science model's step, and the mode that reached it:
    compiled (the pre-training default on CUDA) where that worked, else eager."""
    arch = (TINY_BENCH if shrink else BENCH)[0][1]
    for mode in ("compiled", "compiled-blocks", "eager"):
        found = _read(results / f"bench-{method}-{arch}-{mode}.json") or {}
        if found.get("img_per_s"):
            return found["img_per_s"], mode
    return None, "eager"


def schedule(seconds: float, img_per_s: float, batch: int, images: int) -> tuple[int, int]:
    """Epochs (and warm-up epochs, the paper's 20/500 share) that take about ``seconds``
    at ``img_per_s``, counting whole steps of ``batch`` (a partial last batch is dropped)."""
    per_epoch = (images // batch) * batch
    epochs = max(1, math.floor(seconds * img_per_s / per_epoch))
    return epochs, max(1, round(epochs * WARMUP_SHARE))


def shared_rate(rates: list[float]) -> float:
    """The rate at which runs of the same images, one at each of ``rates``, take on
    average the time of one run at it: their harmonic mean. Methods pre-trained for the
    same epochs in ``seconds`` each on average get :func:`schedule` at this rate."""
    return len(rates) / sum(1 / rate for rate in rates)


def measured_rates(results: Path, args: argparse.Namespace) -> dict[str, tuple[float, str]]:
    """The measured img/s of the science step of dsmae and mae, and the mode of each.

    A method without a bench figure is benchmarked first, here (its compiled row, as
    pre-training runs it), its JSON written as the bench stage writes it: a pre-training
    never runs on an assumed rate. SystemExit where the benchmark gives none."""
    rates = {}
    arch = (TINY_BENCH if args.shrink else BENCH)[0][1]
    for method in ("dsmae", "mae"):
        rate, mode = step_rate(results, method, args.shrink)
        if rate is None:
            log.info("no measured step rate for %s: benchmarking it first", method)
            only = f"{method}-{arch}-compiled"
            changed = {"only": only, "rows": "rates", "budget": 600.0}
            stage_bench(results, argparse.Namespace(**{**vars(args), **changed}))
            rate, mode = step_rate(results, method, args.shrink)
        if rate is None:
            raise SystemExit(
                f"{method}: no step rate could be measured (bench-{method}-{arch}-*.json); "
                "refusing to pre-train on an assumed one"
            )
        rates[method] = (rate, mode)
    return rates


def stage_pretrain(results: Path, args: argparse.Namespace, method: str) -> None:
    """``method``'s pre-training for the epochs that dsmae and mae, both for the same
    epochs (the paper compares equal epochs), take in ``--seconds`` each on average at
    their measured rates (:func:`measured_rates`)."""
    batch = 16 if args.shrink else SCIENCE["batch"]
    rates = measured_rates(results, args)
    rate, mode = rates[method]
    train_images = _count_images(Path(_data(args)) / "train")
    together = shared_rate([found for found, _ in rates.values()])
    epochs, warmup = schedule(args.seconds, together, batch, train_images)
    argv = _pretrain_argv(args, method, mode, batch, results / f"pretrain-{method}")
    argv += ["--epochs", str(epochs), "--set", f"train.warmup_epochs={warmup}"]
    record = {
        "method": method,
        "planned_seconds": args.seconds,
        "bench_img_per_s": rate,
        "bench_img_per_s_both": {name: found for name, (found, _) in rates.items()},
        "step_mode": mode,
        "epochs": epochs,
        "warmup_epochs": warmup,
        "batch_size": batch,
        "train_images": train_images,
    }
    _run_pretrain(results, f"pretrain-{method}", argv, record)


def stage_equal_time(results: Path, args: argparse.Namespace) -> None:
    """mae pre-trained for the wall time dsmae's pre-training took, set-up and compilation
    included (``--time-budget``, which counts them too: the epochs are those that fit, the
    schedules end on time), for the k-NN at equal time."""
    dsmae = _read(results / "pretrain-dsmae.json") or {}
    if dsmae.get("returncode") != 0 or not math.isfinite(dsmae.get("run_s", math.nan)):
        raise SystemExit("equal-time needs dsmae's pre-training (the pretrain stage) first")
    batch = 16 if args.shrink else SCIENCE["batch"]
    rate, mode = measured_rates(results, args)["mae"]
    train_images = _count_images(Path(_data(args)) / "train")
    budget = max(1, math.ceil(dsmae["run_s"]))
    _, warmup = schedule(budget, rate, batch, train_images)  # the share of the likely epochs
    name = "pretrain-mae-equal-time"
    argv = _pretrain_argv(args, "mae", mode, batch, results / name)
    argv += ["--time-budget", f"{budget}s", "--set", f"train.warmup_epochs={warmup}"]
    record = {
        "method": "mae",
        "time_budget_s": budget,
        "bench_img_per_s": rate,
        "step_mode": mode,
        "warmup_epochs": warmup,
        "batch_size": batch,
        "train_images": train_images,
    }
    _run_pretrain(results, name, argv, record)


def _data(args: argparse.Namespace) -> str:
    if not args.data:
        raise SystemExit("pre-training needs --data (the CIFAR-10 folder)")
    return args.data


def _pretrain_argv(
    args: argparse.Namespace, method: str, mode: str, batch: int, out: Path
) -> list[str]:
    """The ``python -m dsmae pretrain`` command of the science model for ``method``, its
    step run as ``mode`` (the bench mode whose rate it was planned with), into ``out``;
    the caller adds how long it runs."""
    argv = [
        sys.executable, "-m", "dsmae", "pretrain", "--preset", SCIENCE["preset"],
        "--method", method, "--data", _data(args), "--batch-size", str(batch),
        "--set", "monitor.knn_every=0", "--set", "monitor.images_every=0",
        "--set", "train.checkpoint_every=0", "--set", "train.checkpoint_minutes=0",
        "--set", "train.log_every=20", "--device", args.device, "--out", str(out),
    ]  # fmt: skip
    compiled = mode.startswith("compiled")
    argv += ["--set", f"train.compile={str(compiled).lower()}"]
    if compiled:
        scope = "blocks" if mode == "compiled-blocks" else "model"
        argv += ["--set", f"train.compile_scope={scope}"]
    if args.shrink:
        argv += _sets(TINY_MODEL)
        argv += ["--img-size", "16", "--patch-size", "4", "--set", "train.log_every=2"]
        argv += _shrunk_compile(args.shrink)
    return argv


def _run_pretrain(results: Path, name: str, argv: list[str], record: dict[str, Any]) -> None:
    """Run the pre-training ``argv`` and write ``record`` with its exit status, wall time,
    command and training figures to ``NAME.json``."""
    print("$", shlex.join(argv[2:]), flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, check=False)
    record |= {
        "returncode": done.returncode,
        "wall_s": time.monotonic() - started,
        "command": shlex.join(["dsmae", *argv[3:]]),
    }
    record.update(_training_figures(results / name))
    record.setdefault("epochs", record.get("epochs_done"))  # a budgeted run's: those it chose
    _write(results / f"{name}.json", record)
    print(json.dumps(record, indent=2))


def _count_images(folder: Path) -> int:
    from dsmae.data.folder_layout import find_image_files

    return len(find_image_files(folder))


def _training_figures(out: Path) -> dict[str, Any]:
    """From a run's metrics.jsonl: the last loss, the steady img/s (median of the lines
    after the first), the compile time, the training time (set-up and compilation
    excluded) and the run's time (included)."""
    from dsmae.metrics import read_metrics

    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [r for r in read_metrics(path) if "loss" in r]
    if not lines:
        return {}
    timed = [r["img_per_s"] for r in lines if "img_per_s" in r]
    rates = sorted(timed[1:] or timed) or [0.0]  # one line only: its rate, warm-up and all
    compile_s = next((r["compile_s"] for r in lines if "compile_s" in r), 0.0)
    setup_s = next((r["setup_s"] for r in lines if "setup_s" in r), 0.0)
    last = lines[-1]
    return {
        "steps": last["step"],
        "epochs_done": last["epoch"] + 1,
        "last_loss": last["loss"],
        "img_per_s": rates[len(rates) // 2],
        "setup_s": setup_s,
        "compile_s": compile_s,
        "train_s": last.get("wall_s", math.nan) - setup_s - compile_s,
        "run_s": last.get("wall_s", math.nan),  # since the run started, to its last step
        "peak_mem_mb": last.get("peak_mem_mb"),
    }


def stage_eval(results: Path, args: argparse.Namespace) -> None:
    jobs = {}
    for method in ("dsmae", "mae"):
        checkpoint = results / f"pretrain-{method}" / "last.pt"
        if checkpoint.is_file():
            jobs[(method, "linprobe")] = ["linprobe", "--checkpoint", str(checkpoint)]
            jobs[(method, "knn")] = ["knn", "--checkpoint", str(checkpoint)]
    equal_time = results / "pretrain-mae-equal-time" / "last.pt"
    if equal_time.is_file():
        jobs[(EQUAL_TIME, "knn")] = ["knn", "--checkpoint", str(equal_time)]
    if jobs:  # the random-init baseline: the same ViT, from the first checkpoint
        first = next(iter(jobs.values()))[2]
        jobs[("random init", "linprobe")] = ["linprobe", "--checkpoint", first, "--random-init"]
        jobs[("random init", "knn")] = ["knn", "--checkpoint", first, "--random-init"]
    extra = ["--epochs", "2"] if args.shrink else []
    # the six run at once: share the cores rather than each spinning up one thread per core
    threads = str(max(1, (os.cpu_count() or 1) // max(len(jobs), 1)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    running = {}
    for key, argv in jobs.items():
        full = [sys.executable, "-m", "dsmae", *argv, "--pool", "avg", "--device", args.device]
        if key[1] == "linprobe":
            full += extra
        slug = re.sub(r"[^a-z0-9]+", "-", key[0])
        log_file = (results / f"eval-{slug}-{key[1]}.log").open("w")
        child = subprocess.Popen(full, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        running[key] = (child, full)
    table: dict[str, dict[str, Any]] = {}
    for (who, protocol), (proc, full) in running.items():
        code = proc.wait()
        checkpoint = Path(full[full.index("--checkpoint") + 1])
        name = f"{checkpoint.stem}.{protocol}{'-random-init' if who == 'random init' else ''}"
        found = _read(checkpoint.with_name(f"{name}.json")) if code == 0 else None
        table.setdefault(who, {})[protocol] = found or {"returncode": code}
        table[who][f"{protocol}_command"] = shlex.join(["dsmae", *full[3:]])
    _write(results / "eval.json", table)
    print(json.dumps(table, indent=2))


# ----------------------------------------------------------------------------- summary


def summarise(results: Path) -> tuple[dict[str, Any], str]:
    """Everything the stages wrote, and the markdown table of it."""
    summary: dict[str, Any] = {
        "smoke": _read(results / "smoke.json"),
        "env": _read(results / "env.json"),
        "bench": {},
    }
    for path in sorted(results.glob("bench-*.json"), key=lambda p: p.stat().st_mtime):
        summary["bench"][path.stem.removeprefix("bench-")] = _read(path)  # in the order run
    for method in ("dsmae", "mae", "mae-equal-time"):
        summary[f"pretrain-{method}"] = _read(results / f"pretrain-{method}.json")
    summary["eval"] = _read(results / "eval.json")
    summary["stages"] = {
        path.stem: path.read_text().strip() for path in sorted(results.glob("*.rc"))
    }
    summary["projection_500_epochs_min"] = _projection(summary)
    return summary, _table(summary)


def _projection(summary: dict[str, Any]) -> dict[str, float]:
    """Minutes of the paper's 500-epoch CIFAR-10 ViT-Tiny pre-training (50k images), at
    each measured rate of the dsmae step."""
    out = {}
    for name, result in summary["bench"].items():
        if name.startswith("dsmae-vit_tiny") and result and result.get("img_per_s"):
            out[f"bench {name}"] = PAPER_EPOCHS * CIFAR10_TRAIN / result["img_per_s"] / 60
    run = summary.get("pretrain-dsmae") or {}
    if run.get("img_per_s"):
        out["pretrain dsmae"] = PAPER_EPOCHS * CIFAR10_TRAIN / run["img_per_s"] / 60
    return out


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"


def _num(value: Any, fmt: str = ".0f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _table(summary: dict[str, Any]) -> str:
    env = summary["env"] or {}
    lines = [
        f"GPU check on {env.get('device', '?')}: torch {env.get('torch', '?')}, timm "
        f"{env.get('timm', '?')}; {env.get('matmul_dtype', '?')} {env.get('matmul_size', '?')}^3 "
        f"matmul {_num(env.get('matmul_tflops'), '.1f')} TFLOP/s",
        "",
        "| step | mode | batch | img/s | MFU | peak mem (MiB) | data share | compile (s) "
        "| host syncs/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in summary["bench"].items():
        r = r or {}
        method, arch, mode = name.split("-", 2) if name.count("-") >= 2 else (name, "", "")
        if "img_per_s" not in r:
            reason = r.get("error") or r.get("skipped") or "no result"
            lines.append(f"| {method} {arch} | {mode} | | {reason[:60]} | | | | | |")
            continue
        lines.append(
            f"| {method} {arch} {r['img_size']}/{r['patch_size']} | {mode} | {r['batch_size']} "
            f"| {_num(r['img_per_s'])} | {_pct(r['mfu'])} | {_num(r['peak_mem_mb'])} "
            f"| {_pct(r['data_share'])} | {_num(r.get('compile_s'), '.1f')} "
            f"| {_num(r.get('host_syncs_per_step'), 'd')} |"
        )
    lines += [
        "",
        "| method | epochs (warm-up) | train s | img/s | compile s | last loss "
        "| linear probe (avg) | k-NN (avg) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    evals = summary["eval"] or {}
    runs = {"dsmae": "dsmae", "mae": "mae", EQUAL_TIME: "mae-equal-time", "random init": ""}
    for method, name in runs.items():
        run = summary.get(f"pretrain-{name}") or {}
        e = evals.get(method, {})
        probe = (e.get("linprobe") or {}).get("top1")
        knn = (e.get("knn") or {}).get("top1")
        lines.append(
            f"| {method} | {run.get('epochs', '-')} ({run.get('warmup_epochs', '-')}) "
            f"| {_num(run.get('train_s'))} | {_num(run.get('img_per_s'))} "
            f"| {_num(run.get('compile_s'), '.1f')} | {_num(run.get('last_loss'), '.4f')} "
            f"| {_num(probe, '.2f')} | {_num(knn, '.2f')} |"
        )
    lines.append("")
    if summary["smoke"]:
        lines += ["Every command once (smoke):", "", smoke_table(summary["smoke"])]
    for name, minutes in summary["projection_500_epochs_min"].items():
        lines.append(f"500-epoch CIFAR-10 ViT-Tiny pre-training at the {name} rate: "
                     f"{minutes:.1f} min")  # fmt: skip
    return "\n".join(lines) + "\n"


def stage_summary(results: Path, args: argparse.Namespace) -> None:
    summary, table = summarise(results)
    _write(results / "summary.json", summary)
    (results / "summary.md").write_text(table)
    print(table)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "stage", choices=("smoke", "env", "bench", *PRETRAIN_STAGES, "eval", "summary")
    )
    parser.add_argument("results", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=120.0, help="pre-training time")
    parser.add_argument("--rows", choices=("rates", "speed"), default="rates", help="bench rows")
    parser.add_argument("--budget", type=float, default=150.0, help="bench stage seconds")
    parser.add_argument("--only", help="bench: only these, e.g. mae-vit_tiny-eager,...")
    parser.add_argument("--data", help="the CIFAR-10 folder (train/ and test/)")
    parser.add_argument("--shrink", action="store_true", help="toy sizes (CPU test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.results.mkdir(parents=True, exist_ok=True)
    if args.stage in ("pretrain-dsmae", "pretrain-mae"):
        stage_pretrain(args.results, args, args.stage.removeprefix("pretrain-"))
    else:
        stages = {"smoke": stage_smoke, "env": stage_env, "bench": stage_bench,
                  "equal-time": stage_equal_time, "eval": stage_eval,
                  "summary": stage_summary}  # fmt: skip
        stages[args.stage](args.results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
