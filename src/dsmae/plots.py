"""Pre-training curves of a run folder as one PNG (``dsmae plot RUN_DIR``).

Reads ``metrics.jsonl``: the step lines (loss terms, learning rate, teacher momentum,
throughput, skipped steps) and the monitor lines (k-NN top-1, each loss term's share of
the encoder gradient); the last line of each step wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from dsmae.config import ConfigError
from dsmae.data.images import DataError
from dsmae.metrics import read_metrics
from dsmae.writes import check_output_file, write_figure

LOSSES = (("loss", "L (total)"), ("loss_y", "L_y (pixels)"), ("loss_z", "L_z (features)"))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records that have it, one value per step."""
    by_step = {r["step"]: r[key] for r in records if key in r and r.get(key) is not None}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of ``run_dir`` into ``out`` (default ``RUN_DIR/curves.png``).

    Panels: the loss terms (log scale), the k-NN top-1 against epoch (when monitored),
    the encoder gradient of each weighted loss term and their cosine (when monitored),
    the learning rate and teacher momentum, and images/s.

    Raises:
        ConfigError: ``out`` does not end in a figure format's extension (``.png``,
            ``.pdf``, ``.svg``, ...).
        DataError: no ``metrics.jsonl`` with step lines in ``run_dir``.
        WriteError: ``out``'s folder cannot be written.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig = Figure(figsize=(15, 7), layout="constrained")
    formats = sorted(fig.canvas.get_supported_filetypes())
    if out.suffix[1:].lower() not in formats:
        raise ConfigError(
            f"--out {out}: a figure's format comes from its extension, one of "
            f"{', '.join('.' + f for f in formats)}",
            "--out",
        )
    check_output_file(out, "--out", "figure", inputs=[run_dir / "metrics.jsonl"])
    steps_lines, monitored = _read_run(run_dir)
    axes = fig.subplots(2, 3)
    _draw_losses(axes[0, 0], steps_lines)
    _draw_knn(axes[0, 1], [r for r in monitored if "knn_top1" in r])
    _draw_gradient_share(axes[0, 2], [r for r in monitored if "health_grad_norm_y" in r])
    _draw_schedules(axes[1, 0], steps_lines)
    _draw_throughput(axes[1, 1], steps_lines)
    axes[1, 2].set_axis_off()
    fig.suptitle(str(run_dir))
    return write_figure(fig, out, dpi=100)


def _read_run(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The step lines and the monitor lines of ``run_dir/metrics.jsonl``.

    Raises:
        DataError: no such file, an unreadable one, or one without step lines.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir} has no metrics.jsonl: not a dsmae pretrain run folder")
    try:
        records = read_metrics(path)
    except ValueError as err:
        raise DataError(str(err)) from None
    steps_lines = [r for r in records if "loss" in r]
    if not steps_lines:
        raise DataError(f"{path} has no step lines yet (the run logs every train.log_every)")
    return steps_lines, [r for r in records if "epoch" in r and "loss" not in r]


def _draw_losses(ax: Axes, steps_lines: list[dict[str, Any]]) -> None:
    """The loss terms a run logs, against step, on a log scale."""
    for key, label in LOSSES:
        steps, values = _series(steps_lines, key)
        if steps:
            ax.plot(steps, values, label=label, linewidth=1)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="pre-training loss")
    ax.legend()


def _draw_knn(ax: Axes, knn: list[dict[str, Any]]) -> None:
    """The k-NN monitor's top-1 against epoch, or a note that there is none."""
    if knn:
        by_epoch = {r["epoch"]: r["knn_top1"] for r in knn}
        epochs = sorted(by_epoch)
        ax.plot(epochs, [by_epoch[e] for e in epochs], marker="o")
        ax.set(xlabel="epoch", ylabel="top-1 (%)", title="k-NN monitor (test split)")
    else:
        ax.text(0.5, 0.5, "no k-NN monitor lines", ha="center", va="center")
        ax.set_axis_off()


def _draw_gradient_share(ax: Axes, lines: list[dict[str, Any]]) -> None:
    """The norm of the encoder gradient of each weighted loss term against epoch (log
    scale) and, on a second axis, their cosine; or a note that there is none."""
    if not lines:
        ax.text(0.5, 0.5, "no gradient-share monitor lines", ha="center", va="center")
        ax.set_axis_off()
        return
    by_epoch = {r["epoch"]: r for r in lines}
    epochs = sorted(by_epoch)
    for key, label in (("health_grad_norm_y", "lam L_y"), ("health_grad_norm_z", "(1-lam) L_z")):
        if key in by_epoch[epochs[0]]:
            ax.plot(epochs, [by_epoch[e][key] for e in epochs], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="|encoder gradient|", yscale="log", title="gradient share")
    ax.legend(loc="lower left")
    if "health_grad_cosine_y_z" in by_epoch[epochs[0]]:
        twin = ax.twinx()
        cosines = [by_epoch[e]["health_grad_cosine_y_z"] for e in epochs]
        twin.plot(epochs, cosines, color="tab:grey", linestyle="--")
        twin.set_ylabel("cosine of the two gradients", color="tab:grey")


def _draw_schedules(ax: Axes, steps_lines: list[dict[str, Any]]) -> None:
    """The learning rate and, on a second axis, the teacher momentum (where logged)."""
    steps, lr = _series(steps_lines, "lr")
    ax.plot(steps, lr, color="tab:blue")
    ax.set(xlabel="step", ylabel="learning rate", title="schedules")
    steps, momentum = _series(steps_lines, "momentum")
    if steps:
        twin = ax.twinx()
        twin.plot(steps, momentum, color="tab:orange")
        twin.set_ylabel("teacher momentum", color="tab:orange")


def _draw_throughput(ax: Axes, steps_lines: list[dict[str, Any]]) -> None:
    """Images per second against step; the title counts the skipped non-finite steps."""
    steps, rate = _series(steps_lines, "img_per_s")
    ax.plot(steps, rate)
    ax.set(xlabel="step", ylabel="images / s", title="throughput")
    steps, skipped = _series(steps_lines, "skipped_steps")
    if skipped and skipped[-1]:
        ax.set_title(f"throughput ({int(skipped[-1])} non-finite steps skipped)")
