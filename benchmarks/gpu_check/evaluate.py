"""The ``eval`` stage: linear probe and k-NN of every pre-training and of random init."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from .plan import EQUAL_TIME, _read, _write


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
