"""A user's own grid, every choice made on a validation split: ``dsmae experiment grid``.

::

    dsmae experiment grid --preset quickstart --vary model.method=mae,dsmae \\
        --vary train.base_lr=2e-3,8e-3,3e-2 --select train.base_lr --seeds 5 --workers 2

A grid pre-trains one cell per combination of the ``--vary`` values and seed, each on
top of the same ``--preset`` / ``--config`` / ``--set`` settings, and reads each by
:func:`~dsmae.evaluation.validation.score_encoder`: k-NN on a validation split carved
once from the labelled train split (the only figure anything is chosen by), and k-NN and
the fast linear probe on the test split.

With ``--select KEY`` the grid tunes ``KEY`` for each combination of the other keys: every
value of ``KEY`` runs on seed 0, the one with the best validation k-NN (the first of the
given order on a tie) runs on the other seeds, and the test figures of that choice are
reported as mean +- std over the seeds. Without it every combination runs on every seed.

Cells are resumable and shared: a cell's folder under ``RESULTS/cells/`` is named by its
method, seed and a digest of every setting of its run that differs from the library's
defaults (:func:`cell_identity`), so two grids that ask for the same run (in the same
``--results``) run it once. A cell pre-trained with other settings than asked stops the
grid before any work, naming the keys that differ; an evaluation made with other
settings (split, bank, probe, k-NN vote) is kept beside the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsmae.config import (
    Config,
    ConfigError,
    build_config,
    flat_config,
    parse_assignment,
    resumable_keys,
    typed_value,
)
from dsmae.experiments.cells import finished_checkpoint, pretraining_seconds

log = logging.getLogger(__name__)

FIGURES = ("val_knn", "test_knn", "test_linprobe")  # what score_encoder gives, in %
RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class GridSpec:
    """What a grid runs.

    Attributes:
        vary: ``(key, values)`` pairs, one per ``--vary``: every combination is a cell.
        seeds: seeds 0 .. seeds-1 (``train.seed``).
        select: a key of ``vary`` chosen on the validation split (None: none).
        preset, files, overrides: the settings every cell shares, as
            :func:`~dsmae.config.build_config` takes them.
        val_fraction: the share of each class of the train split held out for validation.
        split_seed: the seed of that split (and of the bank's sample).
        bank: at most this many labelled train images as the k-NN bank and the probe's
            training set (a stratified sample; None: all the rest of the train split).
    """

    vary: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: int = 1
    select: str | None = None
    preset: str | None = None
    files: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Any], ...] = ()
    val_fraction: float = 0.1
    split_seed: int = 0
    bank: int | None = None

    def validate(self) -> None:
        """Refuse an impossible grid, naming the flag."""
        keys = [k for k, _ in self.vary]
        if not keys:
            raise ConfigError("a grid needs at least one --vary KEY=V1,V2,...", "--vary")
        for key, values in self.vary:
            if keys.count(key) > 1:
                raise ConfigError(f"--vary {key} is given twice; list its values once", "--vary")
            if not values:
                raise ConfigError(f"--vary {key}= lists no value", "--vary")
            if len(set(map(value_text, values))) < len(values):
                raise ConfigError(f"--vary {key} lists a value twice", "--vary")
            if key in dict(self.overrides):
                raise ConfigError(f"{key} is both varied and --set: give it once", "--vary")
        if self.select is not None and self.select not in keys:
            raise ConfigError(
                f"--select {self.select} is not a --vary key ({', '.join(keys)})", "--select"
            )
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {self.seeds}", "--seeds")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"--val-fraction must be in (0, 1), got {self.val_fraction}", "--val-fraction"
            )
        if self.bank is not None and self.bank < 1:
            raise ConfigError(f"--bank must be >= 1, got {self.bank}", "--bank")

    def evaluation(self) -> dict[str, Any]:
        """The split settings every cell of the grid is evaluated with."""
        return {"val_fraction": self.val_fraction, "split_seed": self.split_seed, "bank": self.bank}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vary"] = {k: list(v) for k, v in self.vary}
        d["overrides"] = dict(self.overrides)
        return d


@dataclass(frozen=True)
class Cell:
    """One pre-training of a grid: the ``--vary`` values (in their order) and the seed."""

    values: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def label(self) -> str:
        """``method=mae,base_lr=0.008,seed=1``: each key by its last part."""
        parts = [f"{k.split('.')[-1]}={value_text(v)}" for k, v in self.values]
        return ",".join([*parts, f"seed={self.seed}"])


def parse_vary(text: str) -> tuple[str, tuple[Any, ...]]:
    """``"train.base_lr=1e-3,3e-3"`` -> ``("train.base_lr", (0.001, 0.003))``: each value
    read as YAML, as ``--set`` reads it, and typed as the config key holds it; commas
    inside brackets belong to a list value (``data.crop_scale=[0.2,1.0],[0.5,1.0]``).

    Raises:
        ConfigError: not ``KEY=V1,...``, an unknown key, or a value of the wrong type.
    """
    key, sep, rest = text.partition("=")
    if not sep or not key.strip() or not rest.strip():
        raise ConfigError(f"--vary {text!r} is not of the form section.key=V1,V2,...", "--vary")
    values, depth, start = [], 0, 0
    for i, char in enumerate(rest + ","):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            value = parse_assignment(f"{key.strip()}={rest[start:i].strip()}")[1]
            values.append(typed_value(key.strip(), value))
            start = i + 1
    return key.strip(), tuple(values)


def value_text(value: Any) -> str:
    """A value as the table and the JSON show it (and as duplicates are found)."""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def combinations(spec: GridSpec) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the ``--vary`` values, the first key's slowest."""
    keys = [k for k, _ in spec.vary]
    return [
        tuple(zip(keys, combo, strict=True))
        for combo in itertools.product(*dict(spec.vary).values())
    ]


def group_of(spec: GridSpec, values: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """The values of the keys other than the selected one: the combination a choice is
    made for."""
    return tuple((k, v) for k, v in values if k != spec.select)


def cell_config(spec: GridSpec, cell: Cell, results: Path | None = None) -> Config:
    """The pre-training config of ``cell``: the grid's settings, its values and seed,
    and (given ``results``) its folder :func:`cell_folder`."""
    overrides = {**dict(spec.overrides), **dict(cell.values), "train.seed": cell.seed}
    cfg = build_config(spec.preset, spec.files, overrides)
    if results is None:
        return cfg
    return dataclasses.replace(cfg, out=str(cell_folder(results, cfg)))


def cell_identity(cfg: Config) -> dict[str, Any]:
    """What makes a cell's run what it is: every setting that differs from the library's
    defaults, but those that may change on a resume (where and how it runs, the
    monitors and evaluations: :func:`~dsmae.config.resumable_keys`), as dotted keys."""
    skip = tuple(resumable_keys())

    def flat(config: Config) -> dict[str, Any]:
        values = flat_config(config.to_dict())
        return {k: v for k, v in values.items() if not k.startswith(skip)}

    default = flat(build_config())
    return {k: v for k, v in flat(cfg).items() if default.get(k) != v}


def cell_folder(results: Path, cfg: Config) -> Path:
    """``RESULTS/cells/<method>-seed<seed>-<digest of cell_identity>``."""
    identity = json.dumps(cell_identity(cfg), sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    return results / "cells" / f"{cfg.model.method}-seed{cfg.train.seed}-{digest}"


# ------------------------------------------------------------------------------ a cell


def evaluation_key(cfg: Config, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a cell's figures depend on beyond its run: the split settings, the
    data, the pooling, the k-NN vote and the probe."""
    from dsmae.evaluation.results import evaluation_settings

    return {
        **evaluation,
        "pool": cfg.probe.pool,
        "knn_k": cfg.monitor.knn_k,
        "knn_temperature": cfg.monitor.knn_temperature,
        "probe": evaluation_settings(cfg.probe, cfg.data.source),
    }


def _digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


_SPLITS: dict[tuple[Any, ...], Any] = {}  # a worker's labelled splits, loaded once


def _splits(cfg: Config, evaluation: Mapping[str, Any]) -> Any:
    from dsmae.evaluation.validation import grid_splits

    d, m = cfg.data, cfg.model
    key = (d.source, d.root, m.in_chans, m.img_size, *sorted(evaluation.items()))
    if key not in _SPLITS:
        _SPLITS[key] = grid_splits(
            d, m, evaluation["val_fraction"], evaluation["split_seed"], evaluation["bank"]
        )
    return _SPLITS[key]


def run_cell(cfg: Config, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Pre-train the cell ``cfg`` describes (unless its folder holds the finished run;
    an interrupted one resumes) and evaluate it, unless an evaluation with the same
    settings is in its folder. Returns (and writes as ``grid-eval-<digest>.json``) its
    figures, wall time and rate."""
    import torch

    from dsmae.checkpoint import Checkpoint
    from dsmae.pretrain import pretrain
    from dsmae.runtime import resolve_device
    from dsmae.writes import atomic_write_text

    folder = Path(cfg.out)
    settings = evaluation_key(cfg, evaluation)
    saved = folder / f"grid-eval-{_digest(settings)}.json"
    checkpoint = finished_checkpoint(folder / "last.pt", cfg)
    if checkpoint is not None and saved.is_file():
        return json.loads(saved.read_text())
    if checkpoint is None:
        pretrain(cfg, resume="auto")
        checkpoint = Checkpoint.read(folder / "last.pt")
    splits = _splits(checkpoint.config, evaluation)
    started = time.perf_counter()
    figures = _score(checkpoint, checkpoint.config, splits, resolve_device(cfg.train.device))
    step, batch = int(checkpoint.state["step"]), cfg.train.batch_size
    seconds = pretraining_seconds(folder / "metrics.jsonl", step, batch)
    result = {
        **figures,
        "seed": cfg.train.seed,
        "folder": str(folder),
        "epochs": cfg.train.epochs,
        "steps": step,
        "pretrain_s": seconds,
        "img_per_s": step * batch / seconds if seconds else None,
        "eval_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "split": splits.record,
        "settings": settings,
        "identity": cell_identity(cfg),
    }
    atomic_write_text(saved, json.dumps(result, indent=2, default=str) + "\n", "result")
    return result


def run_random_init(cfg: Config, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of the cell's architecture at random initialisation, with the
    normalisation its run measured, encoder and probe seeded 0 whatever the cell's seed:
    the floor every cell should clear. Kept in the cell's folder as
    ``grid-random-init-<digest>.json``, as its own figures are."""
    from dsmae.checkpoint import Checkpoint
    from dsmae.runtime import resolve_device
    from dsmae.writes import atomic_write_text

    folder = Path(cfg.out)
    saved = folder / f"grid-random-init-{_digest(evaluation_key(cfg, evaluation))}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    checkpoint = Checkpoint.read(folder / "last.pt")
    seed0 = dataclasses.replace(checkpoint.config.train, seed=0)  # whichever cell came first
    config = dataclasses.replace(checkpoint.config, train=seed0)
    splits = _splits(config, evaluation)
    device = resolve_device(cfg.train.device)
    figures = _score(checkpoint, config, splits, device, random_init=True)
    result = {**figures, "seed": 0, "folder": RANDOM_INIT, "split": splits.record}
    atomic_write_text(saved, json.dumps(result, indent=2, default=str) + "\n", "result")
    return result


def _score(
    checkpoint: Any, cfg: Config, splits: Any, device: Any, random_init: bool = False
) -> dict[str, float]:
    from dsmae.evaluation.validation import score_encoder

    encoder = checkpoint.encoder(random_init=random_init, seed=0)
    figures = score_encoder(encoder, cfg, splits, device)
    log.info(
        "%s: validation k-NN %.2f%%, test k-NN %.2f%%, test linear probe %.2f%%",
        RANDOM_INIT if random_init else cfg.out,
        *(figures[f] for f in FIGURES),
    )
    return figures


# ------------------------------------------------------------------------------ the grid


@dataclass
class GridOutcome:
    """What a grid ran: every cell's result by cell, the choice made for each group
    (``select``), the random-init floor, and what the grid wrote."""

    spec: GridSpec
    cells: dict[Cell, dict[str, Any]]
    chosen: dict[tuple[tuple[str, Any], ...], Any]
    random_init: dict[str, Any] | None
    written: list[Path] = dataclasses.field(default_factory=list)


def choose(
    spec: GridSpec, group: tuple[tuple[str, Any], ...], seed0: Mapping[Any, dict[str, Any]]
) -> Any:
    """The value of ``spec.select`` with the best validation k-NN among ``seed0`` (value
    -> that cell's result on seed 0) for ``group``; the first of ``--vary``'s order on a
    tie. Reads nothing but ``val_knn``."""
    assert spec.select is not None
    order = dict(spec.vary)[spec.select]
    best = max(range(len(order)), key=lambda i: (seed0[order[i]]["val_knn"], -i))
    log.info(
        "%s: %s=%s has the best validation k-NN (%s)",
        ",".join(f"{k}={value_text(v)}" for k, v in group) or "grid",
        spec.select,
        value_text(order[best]),
        ", ".join(f"{value_text(v)}: {seed0[v]['val_knn']:.2f}" for v in order),
    )
    return order[best]


def first_cells(spec: GridSpec) -> list[Cell]:
    """The cells that run before any choice: with ``select``, every combination on
    seed 0; without, every combination on every seed."""
    seeds = range(1) if spec.select else range(spec.seeds)
    return [Cell(values, s) for values in combinations(spec) for s in seeds]


def chosen_cells(spec: GridSpec, group: tuple[tuple[str, Any], ...], value: Any) -> list[Cell]:
    """The other seeds of the choice ``value`` for ``group``."""
    values = tuple((k, value if k == spec.select else dict(group)[k]) for k, _ in spec.vary)
    return [Cell(values, s) for s in range(1, spec.seeds)]


def run_spec(
    spec: GridSpec,
    results: str | Path,
    name: str = "grid",
    workers: int = 1,
    plot: bool = False,
) -> GridOutcome:
    """Run grid ``spec`` into ``results`` (resuming what is there) and write its table
    ``NAME.md``, every cell in ``NAME.json`` and, with ``plot``, ``NAME.png``.

    ``workers`` cells run side by side, each in a process of its own
    (:mod:`~dsmae.experiments.workers`: one thread each on a CPU, one GPU each where
    there are GPUs); 1 runs them here, one after another.

    Raises:
        ConfigError: an impossible grid or cell config, or a cell folder that holds a run
            of other settings; all found before any cell runs.
        WriteError: ``results`` cannot be written.
    """
    from dsmae.data.sources import check_available
    from dsmae.experiments.grid_report import write_report
    from dsmae.experiments.workers import CellPool
    from dsmae.runtime import progress
    from dsmae.writes import WriteError, unwritable_reason

    spec.validate()
    results = Path(results)
    planned = {c: cell_config(spec, c, results) for c in _every_possible_cell(spec)}
    for source, root, download in sorted({(c.data.source, c.data.root, c.data.download)
                                          for c in planned.values()}):  # fmt: skip
        check_available(source, root=root, download=download)
    for cfg in planned.values():  # a stale cell stops the grid before any work
        finished_checkpoint(Path(cfg.out) / "last.pt", cfg)
    why = unwritable_reason(results)
    if why is not None:
        raise WriteError(f"could not write results {results}: {why}")
    evaluation = spec.evaluation()
    done: dict[Cell, dict[str, Any]] = {}
    chosen: dict[tuple[tuple[str, Any], ...], Any] = {}
    random_init = None
    first = first_cells(spec)
    groups = len({group_of(spec, c.values) for c in first}) if spec.select else 0
    total = len(first) + groups * (spec.seeds - 1)
    with CellPool(workers, results / "logs") as pool, progress(total, name, "cell") as bar:
        for cell in first:
            pool.submit(cell, run_cell, planned[cell], evaluation)
        for cell, result in pool.results():
            if cell == RANDOM_INIT:
                random_init = result
                continue
            if not done:  # the floor, with the normalisation the first run measured
                pool.submit(RANDOM_INIT, run_random_init, planned[cell], evaluation)
            done[cell] = result
            bar.update(1)
            log.info("grid %s: %d of %d cells done: %s", name, len(done), total, cell.label)
            for group, value in _new_choices(spec, done, chosen):
                chosen[group] = value
                for follow in chosen_cells(spec, group, value):
                    pool.submit(follow, run_cell, planned[follow], evaluation)
    outcome = GridOutcome(spec, done, chosen, random_init)
    outcome.written = write_report(outcome, results, name, plot)
    return outcome


def _every_possible_cell(spec: GridSpec) -> Iterator[Cell]:
    """Every cell the grid may run, whatever it chooses: built up front, so that an
    impossible value is refused before any work."""
    seeds = spec.seeds
    for values in combinations(spec):
        yield from (Cell(values, s) for s in range(seeds))


def _new_choices(
    spec: GridSpec, done: Mapping[Cell, dict[str, Any]], chosen: Mapping[Any, Any]
) -> list[tuple[tuple[tuple[str, Any], ...], Any]]:
    """The groups whose seed-0 candidates are all done and have no choice yet, each with
    its choice."""
    if spec.select is None:
        return []
    by_group: dict[tuple[tuple[str, Any], ...], dict[Any, dict[str, Any]]] = {}
    for cell, result in done.items():
        if cell.seed == 0:
            value = dict(cell.values)[spec.select]
            by_group.setdefault(group_of(spec, cell.values), {})[value] = result
    wanted = len(dict(spec.vary)[spec.select])
    return [
        (group, choose(spec, group, seed0))
        for group, seed0 in by_group.items()
        if group not in chosen and len(seed0) == wanted
    ]


def reported_cells(outcome: GridOutcome) -> list[tuple[tuple[tuple[str, Any], ...], list[Cell]]]:
    """The rows of the table: each reported combination (with ``select``, each group's
    choice) and its cells over the seeds, in the order of ``--vary``."""
    spec, rows = outcome.spec, []
    for values in combinations(spec):
        if spec.select is not None:
            group = group_of(spec, values)
            if outcome.chosen.get(group, object()) != dict(values)[spec.select]:
                continue
        cells = [Cell(values, s) for s in range(spec.seeds) if Cell(values, s) in outcome.cells]
        if cells:
            rows.append((values, cells))
    return rows


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}``; std is the sample standard deviation (0 for one)."""
    import statistics

    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}
