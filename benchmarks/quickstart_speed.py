"""The quickstart's pre-training time and probe: a baseline commit against this tree,
measured on the same machine in the same run.

    python benchmarks/quickstart_speed.py [--baseline 43dcd2f] [--repeats 2] [--work DIR]

Each repeat runs ``dsmae pretrain --preset quickstart`` (the README's first command:
pre-training on scikit-learn's digits, then the linear probe of the encoder and of the
same encoder at random init) once with the baseline's source and once with this tree's,
alternately (so drift of the machine's speed falls on both), with the same Python and
packages. The baseline's source is ``git archive``d into ``--work`` (a new temporary
folder unless given); nothing is written into the repository.

Printed: the machine, then per run the pre-training seconds (``wall_s`` of the last
metrics line: from the start of ``pretrain()`` to its last step), images/s, the whole
command's wall time and the probe top-1; then the medians and the speed-up (the
baseline's median pre-training seconds over this tree's). Time it on an otherwise idle
machine; ``--json`` also writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import yaml
from runs import pretrain_args

REPO = Path(__file__).resolve().parents[1]
BASELINE = "43dcd2f"  # the "before": the quickstart as it was on 2026-11-27


def machine() -> str:
    """The CPU model and the number of cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def export_source(rev: str, work: Path) -> Path:
    """The ``src`` folder of commit ``rev``, extracted under ``work``."""
    folder = work / f"src-{rev}"
    if not folder.is_dir():
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
    return folder / "src"


def run_quickstart(src: Path, out: Path) -> dict[str, Any]:
    """``dsmae pretrain --preset quickstart --out OUT`` with ``src`` first on the path:
    its pre-training seconds and images/s (the last metrics line), the command's wall
    time and the pre-trained encoder's linear-probe top-1."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "dsmae", *pretrain_args(preset="quickstart")]
    started = time.perf_counter()
    subprocess.run([*command, "--out", str(out)], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if "loss" in r][-1]
    probe = json.loads((out / "last.linprobe.json").read_text())
    batch_size = yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"]
    images = last["step"] * batch_size
    return {
        "pretrain_s": last["wall_s"],
        "img_per_s": images / last["wall_s"],
        "command_s": wall,
        "probe_top1": probe["top1"],
        "epochs": last["epoch"] + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternately")
    parser.add_argument("--work", type=Path, help="where runs go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="quickstart-speed-"))
    sources = {args.baseline: export_source(args.baseline, work), "this tree": REPO / "src"}
    print(f"machine: {machine()}\nruns in {work}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    for repeat in range(args.repeats):
        for name, src in sources.items():
            out = work / f"run-{name.replace(' ', '-')}-{repeat}"
            result = run_quickstart(src, out)
            runs[name].append(result)
            print(
                f"{name:>10}  pre-training {result['pretrain_s']:6.1f} s  "
                f"{result['img_per_s']:6.0f} img/s  command {result['command_s']:6.1f} s  "
                f"{result['epochs']} epochs  probe {result['probe_top1']:.2f}%",
                flush=True,
            )
    median = {
        name: {key: statistics.median(r[key] for r in found) for key in found[0]}
        for name, found in runs.items()
    }
    speedup = median[args.baseline]["pretrain_s"] / median["this tree"]["pretrain_s"]
    for name, figures in median.items():
        print(
            f"median {name:>10}: pre-training {figures['pretrain_s']:.1f} s, command "
            f"{figures['command_s']:.1f} s, probe {figures['probe_top1']:.2f}%"
        )
    print(f"pre-training speed-up over {args.baseline}: {speedup:.2f}x")
    if args.json is not None:
        figures = {"machine": machine(), "runs": runs, "median": median, "speedup": speedup}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
