"""What a grid writes: ``NAME.md`` (the table), ``NAME.json`` (every cell) and, when
asked, ``NAME.png`` (the test figures with their error bars)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from dsmae.experiments.grid import (
    FIGURES,
    Cell,
    GridOutcome,
    group_of,
    mean_std,
    reported_cells,
    value_text,
)
from dsmae.writes import atomic_write_text, write_figure

LABELS = {"val_knn": "val k-NN", "test_knn": "test k-NN", "test_linprobe": "test linear probe"}


def report(outcome: GridOutcome) -> dict[str, Any]:
    """The grid as one JSON-able object: its spec, the machine, every cell, the rows of
    the table (each reported combination's figures as mean +- std over its seeds; with
    ``select``, every candidate's validation k-NN beside the choice) and the floor."""
    import torch

    spec = outcome.spec
    rows = []
    for values, cells in reported_cells(outcome):
        results = [outcome.cells[c] for c in cells]
        row: dict[str, Any] = {"values": dict(values), "seeds": [c.seed for c in cells]}
        for key in (*FIGURES, "pretrain_s", "img_per_s"):
            numbers = [r[key] for r in results if r.get(key) is not None]
            row[key] = mean_std(numbers) if numbers else None
        if spec.select is not None:
            group = group_of(spec, values)
            row["selected"] = {spec.select: dict(values)[spec.select]}
            row["candidates"] = [
                {"value": v, "val_knn": outcome.cells[c]["val_knn"]}
                for v in dict(spec.vary)[spec.select]
                if (c := Cell(_with(values, spec.select, v), 0)) in outcome.cells
            ]
            row["group"] = dict(group)
        rows.append(row)
    cells = [
        {"values": dict(c.values), **r}
        for c, r in sorted(outcome.cells.items(), key=lambda item: item[0].label)
    ]
    split = next(iter(outcome.cells.values()))["split"] if outcome.cells else None
    return {
        "spec": spec.to_dict(),
        "split": split,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rows": rows,
        "random_init": outcome.random_init,
        "cells": cells,
    }


def _with(values: tuple[tuple[str, Any], ...], key: str, value: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((k, value if k == key else v) for k, v in values)


def _pm(stats: dict[str, Any] | None, digits: int = 2) -> str:
    if stats is None:
        return ""
    if len(stats["values"]) == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(data: dict[str, Any], name: str) -> str:
    """The table: one row per reported combination, its figures as mean ± std over the
    seeds (sample std), its pre-training time and rate; the settings above it."""
    spec, split = data["spec"], data["split"] or {}
    keys = list(spec["vary"])
    select = spec["select"]
    shown = [k for k in keys if k != select]
    head = [k.split(".")[-1] for k in shown]
    if select:
        head += [f"chosen {select.split('.')[-1]}", "val k-NN of each candidate (seed 0)"]
    head += ["val k-NN", "test k-NN", "test linear probe", "seeds", "pre-training s", "img/s"]
    lines = [
        f"# {name}",
        "",
        _settings_line(spec, split),
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for row in data["rows"]:
        cells = [value_text(row["values"][k]) for k in shown]
        if select:
            chosen = row["selected"][select]
            cells.append(value_text(chosen))
            cells.append(
                ", ".join(
                    f"{'**' if c['value'] == chosen else ''}{value_text(c['value'])}: "
                    f"{c['val_knn']:.2f}{'**' if c['value'] == chosen else ''}"
                    for c in row["candidates"]
                )
            )
        cells += [_pm(row[f]) for f in ("val_knn", "test_knn", "test_linprobe")]
        cells += [str(len(row["seeds"])), _pm(row["pretrain_s"], 0), _pm(row["img_per_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    floor = data["random_init"]
    if floor is not None:
        leading = len(shown) + (2 if select else 0)  # >= 1: a grid varies a key
        numbers = [f"{floor[f]:.2f}" for f in ("val_knn", "test_knn", "test_linprobe")]
        cells = ["random init", *[""] * (leading - 1), *numbers, "1", "0", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _shown_path(path: str) -> str:
    """``path`` relative to the working folder where it lies below it, else normalised:
    ``/repo/benchmarks/x/../settings/a.yaml`` read in ``/repo`` shows as
    ``benchmarks/settings/a.yaml``."""
    normal = os.path.normpath(os.path.abspath(path))
    inside = os.path.relpath(normal)
    return normal if inside.startswith(os.pardir) else inside


def _settings_line(spec: dict[str, Any], split: dict[str, Any]) -> str:
    base = [f"preset {spec['preset']}"] if spec["preset"] else []
    base += [f"config {_shown_path(f)}" for f in spec["files"]]
    base += [f"{k}={value_text(v)}" for k, v in spec["overrides"].items()]
    vary = "; ".join(f"{k} in {', '.join(map(value_text, v))}" for k, v in spec["vary"].items())
    chosen = (
        f" {spec['select']} chosen by the validation k-NN of seed 0, then run on every seed."
        if spec["select"]
        else ""
    )
    bank = split.get("num_bank", "?")
    return (
        f"Every cell: {'; '.join(base) or 'the defaults'}. Varied: {vary}; seeds 0-"
        f"{spec['seeds'] - 1}.{chosen} Validation: {split.get('num_val', '?')} images "
        f"({spec['val_fraction']:.0%} of each class of the train split, seed "
        f"{spec['split_seed']}); k-NN bank and probe training set: {bank} other train images; "
        f"test: {split.get('num_test', '?')} images. Figures: top-1 %, mean ± sample std over "
        "the seeds; the test split chose nothing."
    )


def figure(data: dict[str, Any], path: Path) -> Path:
    """Test k-NN and test linear probe of each row with its error bar (± std over the
    seeds), the random-init floor as a dashed line."""
    from matplotlib.figure import Figure

    rows = data["rows"]
    spec = data["spec"]
    labels = [
        "\n".join(
            f"{k.split('.')[-1]}={value_text(v)}"
            for k, v in row["values"].items()
            if len(spec["vary"][k]) > 1 or k == spec["select"]
        )
        for row in rows
    ]
    fig = Figure(figsize=(max(5.0, 1.2 * len(rows) + 2), 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("test_knn", "test_linprobe"), strict=True):
        xs = range(len(rows))
        means = [row[key]["mean"] for row in rows]
        stds = [row[key]["std"] for row in rows]
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=4)
        if data["random_init"] is not None:
            ax.axhline(data["random_init"][key], color="grey", ls="--", label="random init")
            ax.legend(fontsize=8)
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel(f"{LABELS[key]} top-1 (%)")
        ax.grid(alpha=0.3)
    seeds = max((len(r["seeds"]) for r in rows), default=1)
    fig.suptitle(f"mean ± std over up to {seeds} seeds", fontsize=9)
    return write_figure(fig, path, dpi=110)


def write_report(outcome: GridOutcome, results: Path, name: str, plot: bool) -> list[Path]:
    """Write ``NAME.md``, ``NAME.json`` and (``plot``) ``NAME.png`` into ``results``."""
    data = report(outcome)
    table = atomic_write_text(results / f"{name}.md", markdown(data, name), "results")
    blob = atomic_write_text(
        results / f"{name}.json", json.dumps(data, indent=2, default=str) + "\n", "results"
    )
    paths = [table, blob]
    if plot and data["rows"]:
        paths.append(figure(data, results / f"{name}.png"))
    return paths
