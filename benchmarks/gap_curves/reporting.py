"""The report: every number in results.json, the table, the figure."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch
from runs import setting_values

from .study import SETTINGS, VARIANTS, Study


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
        "overrides": setting_values(SETTINGS[study.setting]["file"]),
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
