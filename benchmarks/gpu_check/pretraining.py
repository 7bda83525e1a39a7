"""The ``pretrain-dsmae``, ``pretrain-mae`` and ``equal-time`` stages: both methods for the
same epochs on measured rates, and mae for dsmae's wall time."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runs import pretrain_args

from . import bench
from .plan import (
    BENCH,
    SCIENCE,
    SHRUNK_COMPILE,
    TINY_BENCH,
    TINY_MODEL,
    WARMUP_SHARE,
    _read,
    _write,
    log,
)


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
            bench.stage_bench(results, argparse.Namespace(**{**vars(args), **changed}))
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
    compiled = mode.startswith("compiled")
    overrides: dict[str, Any] = {
        "monitor.knn_every": 0, "monitor.images_every": 0, "train.checkpoint_every": 0,
        "train.checkpoint_minutes": 0, "train.log_every": 20, "train.compile": compiled,
    }  # fmt: skip
    if compiled:
        overrides["train.compile_scope"] = "blocks" if mode == "compiled-blocks" else "model"
    if args.shrink:
        overrides |= {**TINY_MODEL, "model.img_size": 16, "model.patch_size": 4}
        overrides |= {"train.log_every": 2, **SHRUNK_COMPILE}
    flags = ["--method", method, "--data", _data(args), "--batch-size", str(batch),
             "--device", args.device, "--out", str(out)]  # fmt: skip
    pretrain = pretrain_args(preset=SCIENCE["preset"], overrides=overrides)
    return [sys.executable, "-m", "dsmae", *pretrain, *flags]


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
