"""The command line: ``run`` (workers, then the report), ``work`` (one worker) and ``report``."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from .reporting import report
from .study import BENCHMARKS, SETTINGS, Study
from .tasks import work


def _extracted(archive: Path, cache: Path) -> Path:
    """The image folder of the CIFAR-10 archive, extracted once into ``cache``."""
    from equal_budget import extract  # a sibling script (benchmarks/ is on the path)

    return extract(archive, cache)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    package = sys.modules[__package__].__doc__ or ""
    parser = argparse.ArgumentParser(description=package.splitlines()[0])
    parser.add_argument("action", choices=("run", "work", "report"))
    parser.add_argument("--setting", choices=SETTINGS, default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/gap_curves"))
    parser.add_argument(
        "--archive", type=Path, default=BENCHMARKS.parent.parent / "shared/data/cifar10-jpeg.tar.gz"
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
        package = Path(__file__).resolve().parent  # run as python benchmarks/gap_curves
        argv_work = [sys.executable, str(package), "work", *_passed_on(args, study)]
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
