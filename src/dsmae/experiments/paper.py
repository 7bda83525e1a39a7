"""The paper's experiments as resumable grids: ``dsmae experiment table2|table3|noise-ratio|
lambda`` (SPEC section 7). A user's own grid, tuned on a validation split:
:mod:`dsmae.experiments.grid`.

A grid is a list of cells; each cell pre-trains one model from the paper's preset for its
data set and backbone (with the cell's method, noise ratio or lambda) and evaluates it by
the grid's protocols. A cell whose ``last.pt`` has every step is not pre-trained again,
and an evaluation on disk made with the same settings is not run again, so an interrupted
grid continues where it stopped; a cell pre-trained with other settings stops the grid
with the keys that differ, and every data set of the grid is checked before the first
cell runs. The table
(``results/<name>.md`` and ``.csv``) puts our numbers beside the paper's and states the
settings that produced them; ``noise-ratio`` and ``lambda`` also draw their curve (the
paper's Fig. 3 and Fig. 4) as ``results/<name>.png``.

The modules that import torch or matplotlib are imported by the functions that use them:
``dsmae --help`` reads :data:`GRIDS` from here and must not wait for them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsmae.config import ARCHS, Config, ConfigError, available_presets, build_config
from dsmae.experiments.cells import finished_checkpoint
from dsmae.experiments.grid import GridOutcome, GridSpec, run_spec
from dsmae.writes import WriteError, atomic_write_text, unwritable_reason, write_figure, written

if TYPE_CHECKING:
    from dsmae.checkpoint import Checkpoint

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "stl10")
# backbones of each data set in the paper (Table 2), and the one of its ablations
BACKBONES = {"cifar10": ("vit_tiny", "vit_small"), "cifar100": ("vit_tiny", "vit_small"),
             "stl10": ("vit_small", "vit_base")}  # fmt: skip
SHORT = {"cifar10": "C10", "cifar100": "C100", "stl10": "STL", "vit_tiny": "T",
         "vit_small": "S", "vit_base": "B"}  # fmt: skip

# SPEC section 7: (dataset, arch) -> top-1 %
PAPER_TABLE2 = {
    ("scratch", "finetune"): [73.88, 79.86, 51.55, 56.17, 77.98, 82.41],
    ("mae", "finetune"): [88.77, 90.26, 65.93, 66.51, 85.63, 86.38],
    ("dsmae", "finetune"): [89.76, 91.94, 67.23, 67.77, 86.31, 87.86],
    ("mae", "linprobe"): [73.77, 76.78, 48.22, 51.89, 76.10, 80.16],
    ("dsmae", "linprobe"): [75.53, 76.98, 50.17, 53.84, 78.56, 82.79],
}
TABLE2_COLUMNS = [(d, a) for d in DATASETS for a in BACKBONES[d]]
PAPER_TABLE3 = {  # ViT-S, 300 epochs, linear probe: C10, C100, STL
    "dsmae-ly": [74.20, 49.74, 75.35],
    "dsmae-lz": [68.93, 44.51, 61.83],
    "dsmae": [76.98, 53.84, 78.56],
}
NOISE_RATIOS = (0.75, 0.8, 0.85, 0.9, 0.95)
LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
GRIDS = ("table2", "table3", "noise-ratio", "lambda")


@dataclass(frozen=True)
class Cell:
    """One pre-training (``method`` on ``dataset`` with ``arch``, ``changes`` on top of the
    preset) and the protocols that evaluate it."""

    dataset: str
    arch: str
    method: str
    protocols: tuple[str, ...]  # "linprobe", "finetune", "scratch" (finetune from random init)
    changes: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        extra = "".join(f"-{k.split('.')[-1]}{v}" for k, v in self.changes)
        return f"{self.dataset}-{self.arch}-{self.method}{extra}"


@dataclass
class GridSettings:
    """What shrinks or redirects a grid (all optional)."""

    datasets: Sequence[str] | None = None
    archs: Sequence[str] | None = None
    epochs: int | None = None  # pre-training epochs (paper: 500, ablation 300)
    subset: int | None = None  # pre-training images
    finetune_epochs: int | None = None
    probe_epochs: int | None = None
    data: Mapping[str, str] = dataclasses.field(default_factory=dict)  # dataset -> folder
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every cell
    device: str | None = None


def grid_cells(name: str, settings: GridSettings) -> list[Cell]:
    """The cells of grid ``name``, restricted to ``settings.datasets`` / ``archs``."""
    if name not in GRIDS:
        raise ConfigError(f"unknown experiment {name!r}; one of: {', '.join(GRIDS)}")
    datasets = list(settings.datasets or DATASETS)
    for d in datasets:
        if d not in DATASETS:
            raise ConfigError(f"--datasets: {d!r} is not one of {', '.join(DATASETS)}")

    def archs(dataset: str, default: Sequence[str]) -> list[str]:
        return [a for a in default if settings.archs is None or a in settings.archs]

    cells: list[Cell] = []
    for d in datasets:
        if name == "table2":
            for a in archs(d, BACKBONES[d]):
                cells.append(Cell(d, a, "mae", ("finetune", "linprobe")))
                cells.append(Cell(d, a, "dsmae", ("finetune", "linprobe", "scratch")))
        elif name == "table3":
            for a in archs(d, ["vit_small"] if settings.archs is None else settings.archs):
                for method in ("dsmae-ly", "dsmae-lz", "dsmae"):
                    cells.append(Cell(d, a, method, ("linprobe",)))
        else:
            key, values = (
                ("model.noise_ratio", NOISE_RATIOS)
                if name == "noise-ratio"
                else ("model.lam", LAMBDAS)
            )
            for a in archs(d, ["vit_small"] if settings.archs is None else settings.archs):
                for value in values:
                    cells.append(Cell(d, a, "dsmae", ("finetune",), ((key, value),)))
    if not cells:
        raise ConfigError(f"no cell of {name} matches --datasets/--archs")
    return cells


def cell_settings(cell: Cell, settings: GridSettings, grid: str) -> tuple[str, dict[str, Any]]:
    """The preset and overrides of a cell's pre-training config: the paper's preset for
    its data set and backbone (for a pairing the paper did not run, the data set's first
    preset with the backbone changed), the cell's changes and the grid's settings on top."""
    preset = f"{cell.dataset}-{cell.arch.replace('_', '-')}"
    if preset not in available_presets():
        preset = f"{cell.dataset}-{BACKBONES[cell.dataset][0].replace('_', '-')}"
    values: dict[str, Any] = {
        "model.method": cell.method,
        "model.arch": cell.arch,
        "model.noise_ratio": None,  # the method's own default unless the cell sweeps it
        **dict(cell.changes),
    }
    if grid == "table3":
        values["train.epochs"] = 300  # the paper's ablation
    shrink = {
        "train.epochs": settings.epochs,
        "data.subset": settings.subset,
        "data.source": settings.data.get(cell.dataset),
        "finetune.epochs": settings.finetune_epochs,
        "probe.epochs": settings.probe_epochs,
        "train.device": settings.device,
    }
    values.update({k: v for k, v in shrink.items() if v is not None})
    values.update(settings.overrides)
    if settings.epochs is not None and "train.warmup_epochs" not in settings.overrides:
        # a shortened run keeps the warm-up a tenth of it at most
        cfg = build_config(preset, overrides=values)
        values["train.warmup_epochs"] = min(cfg.train.warmup_epochs, max(cfg.train.epochs // 10, 1))
    return preset, values


def cell_config(cell: Cell, settings: GridSettings, runs: Path, grid: str) -> Config:
    """The pre-training config of a cell (:func:`cell_settings`), in ``runs/<cell name>``."""
    preset, values = cell_settings(cell, settings, grid)
    return build_config(preset, overrides={"out": str(runs / cell.name), **values})


def run_tuned_sweep(
    name: str,
    settings: GridSettings,
    spec: GridSpec,
    results: str | Path = "results",
    workers: int = 1,
    plot: bool = False,
) -> list[GridOutcome]:
    """The sweep ``name`` ("noise-ratio" or "lambda") as a tuned grid
    (:func:`~dsmae.experiments.grid.run_spec`) for each data set and backbone: its values
    varied beside ``spec.vary``, ``spec.select`` chosen for each of them on the validation
    split, read by k-NN and the linear probe over ``spec.seeds`` seeds. Tables
    ``results/<name>/<name>-<dataset>-<arch>.md`` (and ``.json``, ``.png``)."""
    if name not in ("noise-ratio", "lambda"):
        raise ConfigError(f"--select tunes the noise-ratio and lambda sweeps, not {name}")
    cells = grid_cells(name, settings)
    outcomes = []
    for column in sorted({(c.dataset, c.arch) for c in cells}, key=_column_order):
        sweep = [c for c in cells if (c.dataset, c.arch) == column]
        ((key, _),) = sweep[0].changes
        preset, values = cell_settings(sweep[0], settings, name)
        values.pop(key)
        tuned = dataclasses.replace(
            spec,
            vary=((key, tuple(dict(c.changes)[key] for c in sweep)), *spec.vary),
            preset=preset,
            overrides=tuple(values.items()),
        )
        table = f"{name}-{column[0]}-{column[1]}"
        outcomes.append(run_spec(tuned, Path(results) / name, table, workers, plot))
    return outcomes


def run_cell(cell: Cell, cfg: Config) -> dict[str, dict[str, float]]:
    """Pre-train (unless finished) and evaluate one cell; its top-1 by protocol, as
    ``{"top1": ..., "top1_cls": ...}`` (the [CLS] probe beside a linear probe on pooled
    patch tokens).

    An evaluation already on disk is reused only if it was made with the same settings
    (the whole probe or fine-tune section, pooling included, and the data); otherwise it
    is run again and kept beside it.
    """
    from dsmae.checkpoint import Checkpoint
    from dsmae.pretrain import pretrain

    path = Path(cfg.out) / "last.pt"
    checkpoint = finished_checkpoint(path, cfg)
    if checkpoint is not None:
        log.info("%s: pre-training already done", cell.name)
    else:
        pretrain(cfg, resume="auto")
        checkpoint = Checkpoint.read(path)
    scores: dict[str, dict[str, float]] = {}
    for protocol in cell.protocols:
        if protocol == "linprobe":
            scores[protocol] = {"top1": _linprobe(checkpoint, cfg, cfg.probe.pool)}
            if cfg.probe.pool != "cls":
                scores[protocol]["top1_cls"] = _linprobe(checkpoint, cfg, "cls")
        else:
            scores[protocol] = {"top1": _finetune(checkpoint, cfg, protocol == "scratch")}
    return scores


def _cached_top1(path: Path, settings: dict[str, Any], pool: str, scratch: bool) -> float | None:
    """The top-1 of the result of ``settings`` saved at ``path`` or beside it (where a
    result of other settings holds ``path``), if there is one."""
    from dsmae.evaluation.results import find_result

    identity = {"pool": pool, "data": settings["data"], "random_init": scratch}
    saved = find_result(path, {**identity, "settings": settings})
    if saved is None:
        if path.is_file():
            log.info("%s was made with other evaluation settings: evaluating again", path)
        return None
    return saved["top1"]


def _linprobe(checkpoint: Checkpoint, cfg: Config, pool: str) -> float:
    """The linear probe of a cell with the grid's probe settings and ``pool``, on the
    checkpoint's data, with the grid's ``train.device`` and ``train.seed``."""
    from dsmae.evaluation.linprobe import linprobe
    from dsmae.evaluation.results import evaluation_settings, result_path

    probe = dataclasses.replace(cfg.probe, pool=pool)
    settings = evaluation_settings(probe, cfg.data.source)
    top1 = _cached_top1(result_path(checkpoint.path, "linprobe", pool=pool), settings, pool, False)
    if top1 is None:  # the grid's evaluation settings, even for a cell pre-trained under others
        changes = {"train.device": cfg.train.device, "train.seed": cfg.train.seed}
        tested = build_config(overrides=changes, base=checkpoint.config)
        probed = dataclasses.replace(tested, probe=probe)
        top1 = linprobe(checkpoint, probed).top1
    return top1


def _finetune(checkpoint: Checkpoint, cfg: Config, scratch: bool) -> float:
    """The fine-tuning of a cell (from random init for ``scratch``) with the grid's recipe
    on the checkpoint's config (its measured normalisation)."""
    from dsmae.evaluation.finetune import finetune
    from dsmae.evaluation.results import evaluation_settings, result_path

    saved = dataclasses.replace(checkpoint.config, finetune=cfg.finetune, train=cfg.train)
    settings = evaluation_settings(cfg.finetune, saved.data.source)
    path = result_path(checkpoint.path, "finetune", scratch, cfg.finetune.pool)
    top1 = _cached_top1(path, settings, cfg.finetune.pool, scratch)
    if top1 is None:
        top1 = finetune(checkpoint, saved, random_init=scratch).top1
    return top1


def run_grid(name: str, settings: GridSettings, results: str | Path = "results") -> Path:
    """Run every cell of grid ``name`` and write ``results/<name>.md``, ``.csv`` (and
    ``.png`` for the curves). Returns the markdown file."""
    from dsmae.data.sources import check_available

    results = Path(results)
    runs = results / name
    cells = grid_cells(name, settings)
    configs = [cell_config(c, settings, runs, name) for c in cells]  # all refused up front
    for source, root, download in sorted({(c.data.source, c.data.root, c.data.download)
                                          for c in configs}):  # fmt: skip
        check_available(source, root=root, download=download)
    why = unwritable_reason(results)  # before any cell runs
    if why is not None:
        raise WriteError(f"could not write results {results}: {why}")
    rows: list[dict[str, Any]] = []
    for i, (cell, cfg) in enumerate(zip(cells, configs, strict=True)):
        log.info("experiment %s: cell %d of %d: %s", name, i + 1, len(cells), cell.name)
        for protocol, scores in run_cell(cell, cfg).items():
            rows.append(
                {
                    "dataset": cell.dataset,
                    "arch": cell.arch,
                    "method": "scratch" if protocol == "scratch" else cell.method,
                    "protocol": "finetune" if protocol == "scratch" else protocol,
                    **{k.split(".")[-1]: v for k, v in cell.changes},
                    "top1": scores["top1"],
                    "top1_cls": scores.get("top1_cls"),
                    "paper": paper_value(name, cell, protocol),
                }
            )
    with written("results", results):
        results.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(results / f"{name}.csv", table.getvalue(), "results")
    markdown = results / f"{name}.md"
    atomic_write_text(markdown, table_markdown(name, rows, configs[0], settings), "results")
    if name in ("noise-ratio", "lambda"):
        draw_curve(name, rows, results / f"{name}.png")
    return markdown


def paper_value(grid: str, cell: Cell, protocol: str) -> float | None:
    """The paper's top-1 for a cell's protocol, where it reports one."""
    if grid == "table2":
        method = "scratch" if protocol == "scratch" else cell.method
        kind = "finetune" if protocol == "scratch" else protocol
        column = TABLE2_COLUMNS.index((cell.dataset, cell.arch))
        return PAPER_TABLE2[(method, kind)][column]
    if grid == "table3" and cell.arch == "vit_small":
        return PAPER_TABLE3[cell.method][DATASETS.index(cell.dataset)]
    return None


def table_markdown(
    name: str, rows: list[dict[str, Any]], example: Config, settings: GridSettings
) -> str:
    """The grid's table in the paper's layout (rows: methods; columns: data set x
    backbone), each cell "ours (paper)", under a line stating the settings."""
    changed = []
    for key, value in dataclasses.asdict(settings).items():
        if isinstance(value, dict):
            changed += [f"{k}={v}" for k, v in value.items()]
        elif value is not None:
            changed.append(f"{key}={','.join(value) if isinstance(value, list) else value}")
    t, f, p = example.train, example.finetune, example.probe
    with_cls = any(r["top1_cls"] is not None for r in rows)
    lines = [
        f"# {name}",
        "",
        f"Settings: pre-training {t.epochs} epochs, batch {t.batch_size}, "
        f"images {example.data.subset or 'all'}; fine-tuning {f.epochs} epochs "
        f"({f.pool}-pooled); linear probe {p.epochs} epochs on {p.pool}-pooled features "
        f"({p.recipe} recipe). Changed from the paper: {'; '.join(changed) or 'none'}.",
        "Top-1 % of the LAST epoch on the test split; the paper's in parentheses."
        + (
            " [CLS]: the same linear probe on the [CLS] token, which no DSMAE loss trains "
            "(SPEC section 6), shown for reference."
            if with_cls
            else ""
        ),
        "",
    ]
    columns = sorted({(r["dataset"], r["arch"]) for r in rows}, key=_column_order)
    fixed = ("dataset", "arch", "method", "protocol", "top1", "top1_cls", "paper")
    extra = [k for k in rows[0] if k not in fixed]
    keys = sorted({(r["method"], r["protocol"], *(r[k] for k in extra)) for r in rows},
                  key=lambda k: (k[1], _method_order(k[0]), *k[2:]))  # fmt: skip
    head = ["method", "protocol", *extra]
    for d, a in columns:
        head += [f"{SHORT[d]} {SHORT[a]}"] + ([f"{SHORT[d]} {SHORT[a]} [CLS]"] if with_cls else [])
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key in keys:
        cells = []
        for d, a in columns:
            match = [r for r in rows if (r["method"], r["protocol"], *(r[k] for k in extra))
                     == key and (r["dataset"], r["arch"]) == (d, a)]  # fmt: skip
            r = match[0] if match else None
            paper = f" ({r['paper']:.2f})" if r and r["paper"] is not None else ""
            cells.append(f"{r['top1']:.2f}{paper}" if r else "")
            if with_cls:
                cells.append(f"{r['top1_cls']:.2f}" if r and r["top1_cls"] is not None else "")
        lines.append("| " + " | ".join([*map(str, key), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _column_order(column: tuple[str, str]) -> tuple[int, int]:
    return DATASETS.index(column[0]), list(ARCHS).index(column[1])


def _method_order(method: str) -> int:
    order = ("scratch", "mae", "dsmae-ly", "dsmae-lz", "dsmae")
    return order.index(method) if method in order else len(order)


def draw_curve(name: str, rows: list[dict[str, Any]], out: Path) -> Path:
    """Top-1 against the swept value, one line per data set x backbone (Fig. 3 / 4)."""
    from matplotlib.figure import Figure

    key = "noise_ratio" if name == "noise-ratio" else "lam"
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for d, a in sorted({(r["dataset"], r["arch"]) for r in rows}, key=_column_order):
        points = sorted((r[key], r["top1"]) for r in rows if (r["dataset"], r["arch"]) == (d, a))
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=f"{d} {a}")
    ax.set(xlabel="noise ratio r" if key == "noise_ratio" else "lambda",
           ylabel="fine-tune top-1 (%)", title=name)  # fmt: skip
    ax.legend()
    return write_figure(fig, out, dpi=100)
