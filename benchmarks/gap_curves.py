"""Does the gap close? MAE, DSMAE (teacher per epoch and per step) and its two ablations,
each pre-trained ONCE to the end of its schedule, with the linear probe and k-NN read at
checkpoints along the way; plus more seeds at one early checkpoint for the spread.

    python benchmarks/gap_curves.py run [--setting cpu] [--workers 2] [--out runs/gap_curves]
    python benchmarks/gap_curves.py report [--out runs/gap_curves]

``run`` starts ``--workers`` single-thread processes that share one queue of tasks (each
pre-training, then each evaluation), then writes the report. Every task leaves its result
in ``--out``; run it again after an interruption and it continues where it stopped (a
pre-training resumes from its newest checkpoint). ``report`` draws what is there.

Settings (``--setting``):

- ``cpu``: the equal-budget study's setting (``benchmarks/equal_budget.py``): a 6-block
  width-128 ViT, 32x32 real CIFAR-10 images in 4x4 patches, batch 128 in micro-batches of
  32, base lr 1.5e-3 with 1 warm-up epoch, fp32 on the CPU, pre-trained on a fixed random
  subset of the train split.
- ``paper``: the paper's own (ViT-Tiny 32/2 on the full 50k train split, SPEC defaults,
  batch 1024, on the GPU), for the GPU check.

Every schedule (learning rate, teacher momentum) is that of a run of ``--epochs``: the
checkpoint after 20 epochs of an 80-epoch run is read before its cosine has ended. The
evaluations (SPEC section 6, the library's defaults) read the mean of the patch tokens on
the FULL labelled train split and test on the test split: the linear probe by the fast
recipe (BatchNorm + linear, SGD, 90 epochs, the last epoch's top-1), and k-NN (k = 20,
T = 0.07). The encoder at random initialisation is the baseline.

Outputs in ``--out``: ``results.json`` (every number), ``results.md`` (the table), and the
figure ``gap_curves.png``; ``--figure`` and ``--json`` also copy the figure and the JSON
(e.g. to ``benchmarks/figures/`` and ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("gap_curves")
HERE = Path(__file__).resolve().parent

VARIANTS: dict[str, dict[str, Any]] = {
    "mae": {"model.method": "mae"},
    "dsmae-ly": {"model.method": "dsmae-ly"},
    "dsmae-lz": {"model.method": "dsmae-lz"},
    "dsmae": {"model.method": "dsmae", "train.ema_every": "epoch"},  # SPEC section 3
    "dsmae-step": {"model.method": "dsmae", "train.ema_every": "step"},
}
# What each setting sets beyond the library's defaults; "subset" None: the whole split.
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {
        "subset": 1024,
        "overrides": {
            "model.depth": 6,
            "model.embed_dim": 128,
            "model.num_heads": 4,
            "model.decoder_depth": 2,
            "model.regressor_depth": 2,
            "model.img_size": 32,
            "model.patch_size": 4,
            "train.batch_size": 128,
            "train.micro_batch": 32,
            "train.base_lr": 1.5e-3,
            "train.warmup_epochs": 1,
            "train.device": "cpu",
        },
    },
    "smoke": {  # the flow in seconds, for the tests
        "subset": 64,
        "overrides": {
            "model.depth": 1,
            "model.embed_dim": 32,
            "model.num_heads": 2,
            "model.decoder_depth": 1,
            "model.regressor_depth": 1,
            "model.img_size": 16,
            "model.patch_size": 4,
            "train.batch_size": 32,
            "train.base_lr": 0.05,
            "train.warmup_epochs": 1,
            "train.device": "cpu",
        },
    },
    "paper": {
        "subset": None,
        "overrides": {
            "model.arch": "vit_tiny",
            "model.img_size": 32,
            "model.patch_size": 2,
            "train.batch_size": 1024,
        },
    },
}


@dataclass(frozen=True)
class Study:
    """What one study runs: the setting, the schedule's length, where it reads the
    curves, and the seeds of the spread."""

    out: Path
    data: Path
    setting: str
    epochs: int
    checkpoints: tuple[int, ...]  # epochs read on the seed-0 curve (the last: ``epochs``)
    spread_epoch: int  # the epoch read on every seed
    seeds: int

    def config(self, variant: str, seed: int) -> Any:
        """The pre-training config of ``variant`` at ``seed``."""
        from dsmae.config import build_config

        setting = SETTINGS[self.setting]
        return build_config(
            overrides={
                **setting["overrides"],
                **VARIANTS[variant],
                "data.source": str(self.data),
                "data.subset": setting["subset"],
                "train.epochs": self.epochs,
                "train.seed": seed,
                "train.checkpoint_every": self.checkpoint_every,
                "train.checkpoint_minutes": 10,  # resumable from a kill
                "train.keep_checkpoints": 0,
                "monitor.knn_every": 0,
                "monitor.images_every": 0,
                "out": str(self.run_folder(variant, seed)),
            }
        )

    @property
    def checkpoint_every(self) -> int:
        """The epoch period that writes every checkpoint the curves read."""
        from math import gcd

        period = 0
        for epoch in (*self.checkpoints, self.spread_epoch):
            period = gcd(period, epoch)
        return period

    def run_folder(self, variant: str, seed: int) -> Path:
        return self.out / "runs" / f"{variant}-seed{seed}"

    def tasks(self) -> list[Task]:
        """Every task: the full-length pre-trainings first, then those of the other seeds,
        then the evaluations, the random-init baseline first. A worker takes the first
        that is ready (an evaluation waits for its pre-training)."""
        trains = [Task("train", v, 0, self.epochs) for v in VARIANTS]
        trains += [
            Task("train", v, s, self.spread_epoch) for s in range(1, self.seeds) for v in VARIANTS
        ]
        evals = [Task("eval", "random-init", 0, 0)]
        evals += [Task("eval", v, 0, e) for v in VARIANTS for e in self.checkpoints]
        evals += [
            Task("eval", v, s, self.spread_epoch) for s in range(1, self.seeds) for v in VARIANTS
        ]
        return trains + evals


@dataclass(frozen=True)
class Task:
    """A pre-training of ``variant`` at ``seed`` to ``epoch`` ("train"), or the
    evaluation of its checkpoint after ``epoch`` ("eval")."""

    kind: str
    variant: str
    seed: int
    epoch: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.variant}-seed{self.seed}-epoch{self.epoch}"


# ---------------------------------------------------------------------------------------
# the queue: tasks claimed under a file lock, a claim of a dead process taken over


@contextmanager
def locked(out: Path) -> Iterator[None]:
    with open(out / "queue.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def done_path(study: Study, task: Task) -> Path:
    return study.out / "done" / f"{task.name}.json"


def ready(study: Study, task: Task) -> bool:
    """Whether ``task`` can start: an evaluation needs its pre-training finished."""
    if task.kind == "train":
        return True
    if task.variant == "random-init":
        source = Task("train", next(iter(VARIANTS)), 0, study.epochs)
    else:
        last = study.epochs if task.seed == 0 else study.spread_epoch
        source = Task("train", task.variant, task.seed, last)
    return done_path(study, source).is_file()


def claim(study: Study) -> Task | None:
    """The first task that is not done, not held by a live worker and ready; None when
    every task is done or held. Waits while the remaining ones wait on pre-trainings."""
    claims = study.out / "claims"
    while True:
        waiting = False
        with locked(study.out):
            for task in study.tasks():
                held = claims / f"{task.name}.pid"
                if done_path(study, task).is_file():
                    continue
                if held.is_file() and alive(int(held.read_text() or 0)):
                    continue
                if not ready(study, task):
                    waiting = True
                    continue
                held.write_text(str(os.getpid()))
                return task
        if not waiting:
            return None
        time.sleep(10)


# ---------------------------------------------------------------------------------------
# the tasks


def train(study: Study, task: Task) -> dict[str, Any]:
    """Pre-train (or resume) ``task``'s run to its epoch."""
    from dsmae.checkpoint import load_checkpoint
    from dsmae.pretrain import pretrain

    cfg = study.config(task.variant, task.seed)
    result = pretrain(cfg, resume="auto", until_epoch=task.epoch)
    step = load_checkpoint(result.checkpoint)["step"]
    return {
        "checkpoint": str(result.checkpoint),
        "steps_per_epoch": step // task.epoch,
        "last": result.last_metrics,
    }


def checkpoint_of(study: Study, variant: str, seed: int, epoch: int) -> Path:
    """The checkpoint of a run after ``epoch`` (``last.pt`` after the schedule's end)."""
    folder = study.run_folder(variant, seed)
    if epoch == study.epochs:
        return folder / "last.pt"
    last = study.epochs if seed == 0 else study.spread_epoch
    trained = json.loads(done_path(study, Task("train", variant, seed, last)).read_text())
    return folder / f"checkpoint-{epoch * trained['steps_per_epoch']:08d}.pt"


def pretraining_seconds(folder: Path, step: int, batch: int) -> float:
    """Wall seconds of pre-training up to ``step``, summed over the metric lines (each
    gives the rate since the one before; the line past ``step`` pro rata), so that a
    resumed run counts only the steps it kept."""
    seconds, previous = 0.0, 0
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "img_per_s" in record:
            steps = min(record["step"], step) - previous
            seconds += steps * batch / record["img_per_s"]
        previous = record["step"]
        if previous >= step:
            break
    return seconds


_SPLITS: dict[str, Any] = {}


def evaluate(study: Study, task: Task) -> dict[str, Any]:
    """Linear probe (fast recipe) and k-NN top-1 of a checkpoint's encoder (avg pool)."""
    from dsmae.checkpoint import Checkpoint
    from dsmae.config import MonitorConfig, ProbeConfig
    from dsmae.evaluation.frozen import frozen_features
    from dsmae.evaluation.knn import knn_accuracy
    from dsmae.evaluation.linprobe import train_linear_probe
    from dsmae.evaluation.results import labelled_splits

    random_init = task.variant == "random-init"
    variant = next(iter(VARIANTS)) if random_init else task.variant
    epoch = study.epochs if random_init else task.epoch
    path = checkpoint_of(study, variant, task.seed, epoch)
    checkpoint = Checkpoint.read(path)
    cfg = checkpoint.config
    if "splits" not in _SPLITS:  # the same labelled splits for every checkpoint
        _SPLITS["splits"] = labelled_splits(cfg.data, cfg.model, "the study")
    splits = _SPLITS["splits"]
    encoder = checkpoint.encoder(random_init=random_init, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    f = frozen_features(encoder, splits, cfg, "avg", device)
    probe, knn = ProbeConfig(), MonitorConfig()
    classes = len(f.classes)
    top1, history = train_linear_probe(
        f.train, f.train_labels, f.test, f.test_labels, classes, probe
    )
    knn_top1 = knn_accuracy(
        f.train, f.train_labels, f.test, f.test_labels, classes,
        k=knn.knn_k, temperature=knn.knn_temperature,
    )  # fmt: skip
    step = int(checkpoint.state["step"])
    batch = cfg.train.batch_size
    seconds = 0.0 if random_init else pretraining_seconds(path.parent, step, batch)
    return {
        "variant": task.variant,
        "seed": task.seed,
        "epoch": task.epoch,
        "step": 0 if random_init else step,
        "checkpoint": str(path),
        "linprobe": top1,
        "linprobe_best": max(history),
        "knn": knn_top1,
        "pretrain_s": seconds,
        "images_seen": 0 if random_init else step * batch,
    }


def work(study: Study) -> None:
    """Take tasks from the queue until none is left."""
    from dsmae.runtime import keep_freed_memory

    keep_freed_memory()
    while (task := claim(study)) is not None:
        started = time.perf_counter()
        log.info("%s: start", task.name)
        result = train(study, task) if task.kind == "train" else evaluate(study, task)
        result["task_s"] = time.perf_counter() - started
        result["threads"] = torch.get_num_threads()
        path = done_path(study, task)
        path.write_text(json.dumps(result, indent=2) + "\n")
        (study.out / "claims" / f"{task.name}.pid").unlink(missing_ok=True)
        log.info("%s: done in %.0f s", task.name, result["task_s"])


# ---------------------------------------------------------------------------------------
# the report


def collect(study: Study) -> dict[str, Any]:
    """Every evaluation done so far, by variant: the seed-0 curve and the spread."""
    evals = {}
    for path in sorted((study.out / "done").glob("eval-*.json")):
        record = json.loads(path.read_text())
        record["checkpoint"] = os.path.relpath(record["checkpoint"], study.out)
        evals[(record["variant"], record["seed"], path.stem.rsplit("epoch", 1)[1])] = record
    curves: dict[str, list[dict[str, Any]]] = {}
    spread: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        points = [evals.get((variant, 0, str(e))) for e in study.checkpoints]
        curves[variant] = [p for p in points if p is not None]
        seeds = [evals.get((variant, s, str(study.spread_epoch))) for s in range(study.seeds)]
        seeds = [s for s in seeds if s is not None]
        if seeds:
            spread[variant] = {
                key: {
                    "values": [s[key] for s in seeds],
                    "mean": statistics.fmean(s[key] for s in seeds),
                    "std": statistics.stdev(s[key] for s in seeds) if len(seeds) > 1 else 0.0,
                }
                for key in ("linprobe", "knn")
            }
    return {
        "setting": study.setting,
        "overrides": SETTINGS[study.setting]["overrides"],
        "subset": SETTINGS[study.setting]["subset"],
        "epochs": study.epochs,
        "checkpoints": study.checkpoints,
        "spread_epoch": study.spread_epoch,
        "seeds": study.seeds,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "curves": curves,
        "spread": spread,
        "random_init": evals.get(("random-init", 0, "0")),
    }


def markdown(report: dict[str, Any]) -> str:
    """The table: top-1 at each checkpoint, the seeds' mean +- std at the spread epoch."""
    epochs, at = report["checkpoints"], report["spread_epoch"]
    head = [f"LP {e}" for e in epochs] + [f"k-NN {e}" for e in epochs]
    head += [f"LP {at}, {report['seeds']} seeds", f"k-NN {at}, {report['seeds']} seeds"]
    head += [f"pre-training s to {epochs[-1]}"]
    lines = ["| variant | " + " | ".join(head) + " |", "|" + " --- |" * (len(head) + 1)]
    for variant, curve in report["curves"].items():
        by_epoch = {p["epoch"]: p for p in curve}
        cells = [_cell(by_epoch, e, "linprobe") for e in epochs]
        cells += [_cell(by_epoch, e, "knn") for e in epochs]
        s = report["spread"].get(variant)
        for key in ("linprobe", "knn"):
            cells.append(f"{s[key]['mean']:.2f} ± {s[key]['std']:.2f}" if s else "")
        last = by_epoch.get(epochs[-1])
        cells.append(f"{last['pretrain_s']:.1f}" if last else "")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    z = report["random_init"]
    if z is not None:
        flat = [f"{z['linprobe']:.2f}"] * len(epochs) + [f"{z['knn']:.2f}"] * len(epochs)
        lines.append("| random init | " + " | ".join([*flat, "", "", "0"]) + " |")
    return "\n".join(lines)


def _cell(by_epoch: dict[int, dict[str, Any]], epoch: int, key: str) -> str:
    return f"{by_epoch[epoch][key]:.2f}" if epoch in by_epoch else ""


def figure(report: dict[str, Any], path: Path) -> None:
    """LP and k-NN top-1 against epochs and against pre-training wall time, one line per
    variant, the seeds' spread (mean +- std) as error bars at the spread epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    variants = list(report["curves"])
    for row, (key, label) in enumerate((("linprobe", "linear probe"), ("knn", "k-NN"))):
        for col, x_key in enumerate(("epoch", "pretrain_s")):
            ax = axes[row, col]
            for i, (variant, curve) in enumerate(report["curves"].items()):
                xs = [p[x_key] / (60 if col else 1) for p in curve]
                line = ax.plot(xs, [p[key] for p in curve], marker="o", label=variant)[0]
                s = report["spread"].get(variant)
                if col == 0 and s is not None:  # side by side, not on top of each other
                    nudge = 2 ** (0.04 * (i - (len(variants) - 1) / 2))
                    ax.errorbar(
                        report["spread_epoch"] * nudge, s[key]["mean"], yerr=s[key]["std"],
                        color=line.get_color(), capsize=3, fmt="_",
                    )  # fmt: skip
            if col == 0:
                ax.set_xscale("log", base=2)
                ax.set_xticks(report["checkpoints"], [str(e) for e in report["checkpoints"]])
            if report["random_init"] is not None:
                ax.axhline(report["random_init"][key], color="grey", ls="--", label="random init")
            ax.set_xlabel("epochs" if col == 0 else "pre-training wall time (min)")
            ax.set_ylabel(f"{label} top-1 (%)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    subset = report["subset"] or "all"
    fig.suptitle(
        f"Does the gap close? setting {report['setting']}, {subset} pre-training images, "
        f"{report['epochs']}-epoch schedules; error bars: mean ± std of {report['seeds']} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(study: Study, copies: dict[str, Path | None]) -> None:
    """Write ``results.json``, ``results.md`` and ``gap_curves.png`` into the study's
    folder, copy the figure and the JSON where ``copies`` says, and print the table."""
    data = collect(study)
    (study.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    table = markdown(data)
    (study.out / "results.md").write_text(table + "\n")
    figure(data, study.out / "gap_curves.png")
    for name, target in (("gap_curves.png", copies["figure"]), ("results.json", copies["json"])):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(study.out / name, target)
    print(table)


# ---------------------------------------------------------------------------------------
# the command


def _extracted(archive: Path, cache: Path) -> Path:
    """The image folder of the CIFAR-10 archive, extracted once into ``cache``."""
    sys.path.insert(0, str(HERE))
    from equal_budget import extract  # a sibling script

    return extract(archive, cache)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "work", "report"))
    parser.add_argument("--setting", choices=SETTINGS, default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/gap_curves"))
    parser.add_argument(
        "--archive", type=Path, default=HERE.parent.parent / "shared/data/cifar10-jpeg.tar.gz"
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/dsmae/cifar10-jpeg")
    parser.add_argument("--data", type=Path, help="a labelled image folder instead of --archive")
    parser.add_argument("--epochs", type=int, default=80, help="the schedules' length")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--spread-epoch", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--figure", type=Path, help="also copy the figure here")
    parser.add_argument("--json", type=Path, help="also copy results.json here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )  # fmt: skip
    if args.checkpoints[-1] != args.epochs or args.spread_epoch not in args.checkpoints:
        raise SystemExit("--checkpoints must end at --epochs and hold --spread-epoch")
    study = Study(
        args.out, args.data or _extracted(args.archive, args.cache), args.setting, args.epochs,
        tuple(args.checkpoints), args.spread_epoch, args.seeds,
    )  # fmt: skip
    for folder in ("claims", "done", "runs"):
        (study.out / folder).mkdir(parents=True, exist_ok=True)
    if args.action == "work":
        work(study)
        return
    if args.action == "run":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv_work = [sys.executable, __file__, "work", *_passed_on(args, study)]
        workers = []
        for i in range(args.workers):
            with open(study.out / f"worker-{i}.log", "a") as logfile:
                workers.append(subprocess.Popen(argv_work, env=env, stdout=logfile, stderr=logfile))
        codes = [w.wait() for w in workers]
        if any(codes):
            raise SystemExit(f"a worker failed (exit codes {codes}): see {study.out}/worker-*.log")
    report(study, {"figure": args.figure, "json": args.json})


def _passed_on(args: argparse.Namespace, study: Study) -> list[str]:
    """The flags a worker needs to rebuild the same study."""
    return [
        "--setting", args.setting, "--out", str(args.out), "--data", str(study.data),
        "--epochs", str(args.epochs),
        "--checkpoints", *map(str, args.checkpoints), "--spread-epoch", str(args.spread_epoch),
        "--seeds", str(args.seeds),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
