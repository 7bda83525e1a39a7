"""The figures of the "Which one should I use?" study, from what its stages wrote:

    python benchmarks/which_one/figures.py RESULTS OUT_DIR

- ``which_one.png``: at each scale (digits, CIFAR-10), the test k-NN and linear probe of
  mae, dsmae-ly and dsmae at their chosen learning rates, mean +- std over the seeds,
  beside random init, mae pre-trained for dsmae's wall time and (CIFAR-10) dsmae for as
  many epochs;
- ``gradient_share.png``: at each scale, the norm of the student encoder's gradient of
  ``lam * L_y`` and of ``(1 - lam) * L_z`` against the epoch, and their cosine, from the
  gradient-share runs' ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

SCALES = {"digits": "digits (20 epochs, 5 seeds)", "cifar": "CIFAR-10 (40 epochs, 3 seeds)"}
RUNS = {"digits": "digits (20 epochs, seed 0)", "cifar": "CIFAR-10 (40 epochs, seed 0)"}
FIGURES = {"test_knn": "test k-NN top-1 (%)", "test_linprobe": "test linear probe top-1 (%)"}


def _rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def methods_figure(results: Path, out: Path) -> Path:
    """Each scale a row, each figure a column: one error bar per method."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(len(SCALES), len(FIGURES), squeeze=False)
    for row, (scale, title) in enumerate(SCALES.items()):
        data = json.loads((results / scale / "methods.json").read_text())
        bars = [(r["values"]["model.method"], r) for r in data["rows"]]
        bars += [("mae\n(dsmae's time)", r) for r in _rows(results / scale / "mae-equal-time.json")]
        bars += [("dsmae\n(as many epochs)", r) for r in _rows(results / scale / "dsmae-long.json")]
        for col, (key, label) in enumerate(FIGURES.items()):
            ax = axes[row, col]
            for x, (_, r) in enumerate(bars):
                ax.errorbar(x, r[key]["mean"], yerr=r[key]["std"], fmt="o", capsize=4)
            ax.set_xticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
            ax.axhline(data["random_init"][key], color="grey", ls="--", label="random init")
            ax.set(ylabel=label, title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Each method at the learning rate its validation k-NN chose; mean ± std")
    path = out / "which_one.png"
    fig.savefig(path, dpi=110)
    return path


def gradient_figure(results: Path, out: Path) -> Path:
    """Each scale a panel: the two gradient norms (log scale) and their cosine."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, len(SCALES), squeeze=False)[0]
    for ax, (scale, title) in zip(axes, RUNS.items(), strict=True):
        metrics = results / f"{scale}-gradient-share" / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        lines = [r for r in lines if "health_grad_norm_y" in r]
        epochs = [r["epoch"] for r in lines]
        for key, label in (("health_grad_norm_y", "lam L_y"),
                           ("health_grad_norm_z", "(1 - lam) L_z")):  # fmt: skip
            ax.plot(epochs, [r[key] for r in lines], marker="o", label=label)
        ax.set(yscale="log", xlabel="epoch", ylabel="|encoder gradient|", title=title)
        ax.legend(loc="lower left", fontsize=8)
        twin = ax.twinx()
        twin.plot(epochs, [r["health_grad_cosine_y_z"] for r in lines], color="grey", ls="--")
        twin.set_ylabel("cosine of the two gradients", color="grey")
    fig.suptitle("How much each loss term moves the student encoder (dsmae, chosen lr)")
    path = out / "gradient_share.png"
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    results, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    print(methods_figure(results, out), gradient_figure(results, out))
