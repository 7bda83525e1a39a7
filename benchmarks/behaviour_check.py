"""Proof that a change of the code leaves the ``dsmae`` command's behaviour as it was
(issue 21, "Behaviour unchanged").

It drives the ``dsmae`` command only as a user does, ``python -m dsmae ...`` in a
subprocess, with the source tree ``--src`` first on ``PYTHONPATH`` (a git worktree's
``src``), so the one script and one virtual environment run any commit:

    git worktree add /work/before f764dff
    python benchmarks/behaviour_check.py snapshot --src /work/before/src --out /tmp/b/before
    python benchmarks/behaviour_check.py snapshot --src src --out /tmp/b/after
    python benchmarks/behaviour_check.py compare /tmp/b/before /tmp/b/after \\
        [--allow steps/print-config/quickstart]
    python benchmarks/behaviour_check.py resume --src src --old /tmp/b/before --out /tmp/b/resume

``snapshot`` runs a fixed table of commands (:func:`snapshot_steps`) on one CPU thread
(``OMP_NUM_THREADS=1``, ``PYTHONHASHSEED=0``, ``--device cpu``) on scikit-learn's digits
and on a few images it writes from them: ``--print-config`` of every shipped preset (and
of none); a tiny ``pretrain`` of each method (dsmae, dsmae-ly, dsmae-lz, mae) with the
k-NN and health monitors on in epoch 2, a checkpoint every epoch and its linear probes;
then for dsmae and mae ``linprobe`` (both recipes), ``knn``, ``finetune``, ``denoise``,
``export`` (and ``--onnx`` where onnx is installed), ``features`` and ``plot`` (of a copy
of the run whose metrics have their timing values frozen, :func:`freeze_timings`: the
figure draws images/s); a tiny ``experiment table3`` on an image folder; and
``bench --json``. It writes
``OUT/behaviour.json`` (sorted keys), what every command did with its timing taken out:

* its printed lines (stdout and stderr apart), normalised by :func:`normalise_lines`: no
  clock time, logger names cut to the level (modules move), durations and rates as
  ``<t>``, the snapshot folder as ``<OUT>``, JSON lines without their timing keys;
* its files: ``metrics.jsonl`` and result JSONs without timing keys (:func:`is_timing_key`)
  and with ``run_id`` and paths normalised (a JSON that needs no normalisation is also
  hashed byte for byte), text files (configs, tables, feature file lists) as lines, the
  SHA-256 of every other file (exports, features, figures), and of checkpoints the SHA-256
  of each tensor of their state (the file bytes hold the run id).

The raw outputs stay in ``OUT`` (``logs/``, ``kept/`` for files a later command
overwrites). ``OUT/old_checkpoints/`` keeps the epoch-1 checkpoint of the dsmae and mae
pre-trainings; ``resume`` continues each with ``--resume`` in a fresh folder with the code
at ``--src`` and checks its metrics from that step on, its checkpoints, probes and figure
equal those of the uninterrupted run of the snapshot ``--old``. ``compare`` prints every
difference of two snapshots (key path, before, after) and exits 1 if there is any that no
``--allow PREFIX`` allows; else a summary of the items compared per kind.

A snapshot takes about 4 minutes on one CPU core. Run it twice on the same code and
``compare`` the two: no difference (the normalisation removes everything that varies).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
SNAPSHOT_FILE = "behaviour.json"
OUT_MARK, SRC_MARK, PYTHON_MARK = "<OUT>", "<SRC>", "<PYTHON>"
RUN_ID_MARK = "<run_id>"

# --------------------------------------------------------------------------- the commands

# the tiny model and run every command shares: seconds on one core
TINY = (
    "--preset", "quickstart", "--device", "cpu", "--epochs", "3",
    "--set", "model.depth=2", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
    "--set", "model.decoder_depth=1", "--set", "model.decoder_dim=32",
    "--set", "model.decoder_heads=2", "--set", "model.regressor_depth=1",
    "--set", "data.subset=256", "--set", "data.workers=0", "--set", "train.warmup_epochs=1",
    "--set", "train.checkpoint_every=1", "--set", "monitor.knn_every=2",
    "--set", "monitor.images_every=2", "--set", "probe.epochs=3",
    "--set", "probe.warmup_epochs=1", "--set", "finetune.workers=0",
    # the quickstart recipe and MLP of before issue 21, which that issue changed: what is
    # checked here is the code, on the same recipe before and after
    "--set", "train.base_lr=3e-3", "--set", "train.ema_every=epoch",
    "--set", "model.mlp_ratio=4",
)  # fmt: skip
EMA_EVERY_STEP = ("--set", "train.ema_every=step")
METHODS = ("dsmae", "dsmae-ly", "dsmae-lz", "mae")
EVALUATED = ("dsmae", "mae")  # the methods every other command runs on
RESUMED = ("dsmae", "mae")  # the methods whose epoch-1 checkpoint is kept for `resume`

# (name, arguments, outputs) of every command on a pre-trained method: {run} is its run
# folder, {m} the method; the outputs are recorded right after the command
EVALUATIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("linprobe-fast", ("linprobe", "--checkpoint", "{run}/last.pt", "--device", "cpu",
                       "--recipe", "fast", "--epochs", "3"), ("{run}/last.linprobe.json",)),
    ("linprobe-mae", ("linprobe", "--checkpoint", "{run}/last.pt", "--device", "cpu",
                      "--recipe", "mae", "--epochs", "2"), ("{run}/last.linprobe.json",)),
    ("knn", ("knn", "--checkpoint", "{run}/last.pt", "--device", "cpu"), ("{run}/last.knn.json",)),
    ("finetune", ("finetune", "--checkpoint", "{run}/last.pt", "--device", "cpu", "--epochs",
                  "1", "--set", "finetune.workers=0", "--out", "finetune/{m}"),
     ("{run}/last.finetune.json", "finetune/{m}")),
    ("denoise", ("denoise", "--checkpoint", "{run}/last.pt", "--device", "cpu", "--out",
                 "figures/{m}-denoise.png", "images/denoise/a.png", "images/denoise/b.png"),
     ("figures/{m}-denoise.png",)),
    ("export", ("export", "--checkpoint", "{run}/last.pt", "--out", "exports/{m}"),
     ("exports/{m}",)),
    ("features", ("features", "--checkpoint", "{run}/last.pt", "--device", "cpu", "--data",
                  "images/features", "--out", "features/{m}.npy"),
     ("features/{m}.npy", "features/{m}.files.txt")),
    ("plot", ("plot", "plot-runs/{m}", "--out", "figures/{m}-curves.png"),
     ("figures/{m}-curves.png",)),
)  # fmt: skip
# the plot draws images/s: it draws a copy of the run's metrics with their timing frozen
FROZEN_RUNS = {"plot": ("{run}", "plot-runs/{m}")}
ONNX_EXPORT = ("export-onnx", ("export", "--checkpoint", "{run}/last.pt", "--onnx", "--out",
                               "exports/{m}-onnx"), ("exports/{m}-onnx",))  # fmt: skip
EXPERIMENT = (
    "experiment", "table3", "--device", "cpu", "--datasets", "cifar10", "--archs", "vit_tiny",
    "--epochs", "1", "--subset", "64", "--probe-epochs", "3",
    "--data", "cifar10=images/experiment", "--results", "experiment",
    "--set", "model.img_size=8", "--set", "model.patch_size=2", "--set", "model.in_chans=1",
    "--set", "model.depth=1", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
    "--set", "model.decoder_depth=1", "--set", "model.decoder_dim=32",
    "--set", "model.decoder_heads=2", "--set", "model.regressor_depth=1",
    "--set", "train.batch_size=32", "--set", "train.warmup_epochs=0",
    "--set", "monitor.knn_every=0", "--set", "monitor.images_every=0", "--set", "data.workers=0",
)  # fmt: skip
BENCH = (
    "bench", "--device", "cpu", "--method", "dsmae", "--arch", "vit_tiny", "--img-size", "8",
    "--patch-size", "2", "--in-chans", "1", "--batch-size", "8", "--steps", "1", "--warmup",
    "1", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
    "--set", "model.decoder_depth=1", "--json",
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One ``python -m dsmae ARGS`` run in the snapshot folder, and the files or folders
    (relative to it) recorded right after it."""

    name: str
    args: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    frozen_run: tuple[str, str] = ()  # (run folder, copy): its metrics, timing frozen


def pretrain_args(method: str, *extra: str, out: str = "") -> tuple[str, ...]:
    """The ``dsmae`` arguments of the tiny pre-training of ``method`` (with ``extra``
    arguments) into ``out`` (default ``runs/METHOD``)."""
    return ("pretrain", *TINY, *extra, "--method", method, "--out", out or f"runs/{method}")


def snapshot_steps(presets: Sequence[str], onnx: bool) -> list[Step]:
    """Every command of a snapshot, in order: ``presets`` are the shipped presets' names,
    ``onnx`` whether ``export --onnx`` can run."""
    steps = [Step("print-config/(none)", ("pretrain", "--print-config"))]
    steps += [Step(f"print-config/{p}", ("pretrain", "--preset", p, "--print-config"))
              for p in presets]  # fmt: skip
    steps += [Step(f"{m}/pretrain", pretrain_args(m), (f"runs/{m}",)) for m in METHODS]
    # the teacher moved every step (the quickstart's since issue 21), not per epoch
    every_step = pretrain_args("dsmae", *EMA_EVERY_STEP, out="runs/dsmae-ema-step")
    steps.append(Step("dsmae/pretrain-ema-every-step", every_step, ("runs/dsmae-ema-step",)))
    evaluations = [*EVALUATIONS, ONNX_EXPORT] if onnx else list(EVALUATIONS)
    for method in EVALUATED:
        for name, args, outputs in evaluations:
            fill = {"run": f"runs/{method}", "m": method}
            frozen = tuple(f.format(**fill) for f in FROZEN_RUNS.get(name, ()))
            steps.append(Step(f"{method}/{name}", tuple(a.format(**fill) for a in args),
                              tuple(o.format(**fill) for o in outputs), frozen))  # fmt: skip
    steps.append(Step("experiment", EXPERIMENT, ("experiment",)))
    steps.append(Step("bench", BENCH))
    return steps


# ------------------------------------------------------------------------- normalisation

TIMING_KEYS = frozenset({
    "wall_s", "img_per_s", "setup_s", "compile_s", "peak_mem_mb", "step_ms", "data_ms",
    "data_share", "parts_ms", "sum_parts_ms", "mfu", "parts_mfu", "achieved_gflops",
    "matmul_peak_gflops", "matmul_size", "matmul_dtype", "matmul_peaks",
    "self_cpu_time_total", "self_device_time_total", "time", "timestamp", "elapsed", "eta",
})  # fmt: skip
TIMING_SUFFIXES = ("_s", "_ms", "_mb", "_seconds", "_per_s")
CLOCK = re.compile(r"^\d{2}:\d{2}:\d{2}(?:[.,]\d+)? ")
LOGGER = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:img/s|it/s|s/it|ms|s|min|h)\b")
PROGRESS_BAR = re.compile(r"\d+%\|")
WARNING_PLACE = re.compile(r"^\S+\.py:\d+: (?=\w*Warning)")


def is_timing_key(key: str) -> bool:
    """Whether a metrics or result key holds a duration, a rate, a memory peak or a
    hardware-speed reading (which vary from run to run), e.g. ``wall_s``, ``img_per_s``."""
    return key in TIMING_KEYS or key.endswith(TIMING_SUFFIXES)


def replace_paths(text: str, places: Mapping[str, str]) -> str:
    """``text`` with every path of ``places`` (path -> mark, longest first) by its mark."""
    for path in sorted(places, key=len, reverse=True):
        text = text.replace(path, places[path])
    return text


def normalise_json(value: Any, places: Mapping[str, str]) -> Any:
    """A JSON value without timing keys (at any depth), ``run_id`` as ``<run_id>`` and
    the paths of ``places`` as their marks in every string."""
    if isinstance(value, Mapping):
        return {
            str(k): RUN_ID_MARK if k == "run_id" else normalise_json(v, places)
            for k, v in value.items()
            if not is_timing_key(str(k))
        }
    if isinstance(value, list | tuple):
        return [normalise_json(v, places) for v in value]
    if isinstance(value, str):
        return replace_paths(value, places)
    return value


def freeze_timings(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metrics records whose timing values (:func:`is_timing_key`) are fixed numbers,
    ``1000 + step``: what a figure drawn from them shows no longer varies."""
    return [
        {k: 1000.0 + r["step"] if is_timing_key(k) and isinstance(v, int | float) else v
         for k, v in r.items()}
        for r in records
    ]  # fmt: skip


def normalise_line(line: str, places: Mapping[str, str]) -> str | None:
    """One printed line without what varies from run to run, or None for a progress bar.

    ``12:01:02 INFO dsmae.engine: epoch 1/3: loss 0.7, 1506 img/s, 1 s elapsed, ETA 3 s``
    -> ``INFO: epoch 1/3: loss 0.7, <t>, <t> elapsed, ETA <t>``; a line holding a JSON
    object -> that object without timing keys, keys sorted."""
    line = replace_paths(line.split("\r")[-1].rstrip(), places)
    if PROGRESS_BAR.search(line):
        return None
    stripped = line.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return json.dumps(normalise_json(parsed, places), sort_keys=True)
    line = LOGGER.sub(r"\1: ", CLOCK.sub("", line))
    line = WARNING_PLACE.sub("<file>: ", line)
    return DURATION.sub("<t>", line)


def normalise_lines(text: str, places: Mapping[str, str]) -> list[str]:
    """The printed ``text`` as normalised lines (:func:`normalise_line`), bars left out."""
    printed = text.split("\n")  # not splitlines(): a bar's carriage returns end no line
    if printed[-1] == "":
        printed.pop()
    lines = (normalise_line(line, places) for line in printed)
    return [line for line in lines if line is not None]


# ----------------------------------------------------------------------------- recording

SKIPPED_FILES = frozenset({".lock"})
SKIPPED_FOLDERS = frozenset({"tensorboard", "__pycache__"})
TEXT_SUFFIXES = (".txt", ".yaml", ".yml", ".md", ".csv")


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_state(value: Any, places: Mapping[str, str]) -> Any:
    """A loaded checkpoint as JSON: each tensor as ``dtype shape sha256:HEX`` of its bytes,
    ``run_id`` as ``<run_id>``, paths as marks."""
    import torch

    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.sha256(data.tobytes()).hexdigest()
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)} sha256:{digest}"
    if isinstance(value, Mapping):
        return {
            str(k): RUN_ID_MARK if k == "run_id" else checkpoint_state(v, places)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [checkpoint_state(v, places) for v in value]
    if isinstance(value, str):
        return replace_paths(value, places)
    return value


def record_file(path: Path, places: Mapping[str, str]) -> dict[str, Any]:
    """What a file holds, timing taken out: ``{"kind": ..., "data": ...}``."""
    if path.suffix == ".pt":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        return {"kind": "checkpoint", "data": checkpoint_state(state, places)}
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {"kind": "metrics", "data": normalise_json(records, places)}
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        data = normalise_json(raw, places)
        record: dict[str, Any] = {"kind": "json", "data": data}
        if json.dumps(data, sort_keys=True) == json.dumps(raw, sort_keys=True):
            record["sha256"] = sha256_file(path)  # nothing varies: its bytes are kept too
        return record
    if path.suffix in TEXT_SUFFIXES:
        return {"kind": "text", "data": replace_paths(path.read_text(), places).splitlines()}
    return {"kind": "sha256", "data": sha256_file(path)}


def record_output(path: Path, places: Mapping[str, str]) -> dict[str, Any] | None:
    """A file's record (:func:`record_file`), or a folder's (its files' records by
    relative path, lock files and TensorBoard events left out); None where absent."""
    if path.is_file():
        return record_file(path, places)
    if not path.is_dir():
        return None
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if file.name in SKIPPED_FILES or SKIPPED_FOLDERS & set(relative.parts[:-1]):
            continue
        files[relative.as_posix()] = record_file(file, places)
    return {"kind": "folder", "data": files}


def subprocess_env(src: Path) -> dict[str, str]:
    """The environment of every ``dsmae`` run: ``src`` first on the path, one thread,
    fixed hashing, no GPU, no terminal."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(src),
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "MPLBACKEND": "Agg",
        "TQDM_DISABLE": "1",
    }


def dsmae_location(src: Path) -> Path:
    """The ``dsmae`` package the subprocesses import; it must be the one under ``src``."""
    done = subprocess.run(
        [sys.executable, "-c", "import dsmae; print(dsmae.__file__)"],
        env=subprocess_env(src), cwd="/", capture_output=True, text=True, check=True,
    )  # fmt: skip
    location = Path(done.stdout.strip()).resolve()
    if not location.is_relative_to(src):
        sys.exit(f"error: dsmae is imported from {location}, not from --src {src}")
    return location


def places_of(folder: Path, src: Path) -> dict[str, str]:
    """The paths that differ between snapshots (the folder, the source tree, the
    interpreter's prefix) and their marks."""
    return {str(folder): OUT_MARK, str(src): SRC_MARK, sys.prefix: PYTHON_MARK}


def run_step(step: Step, folder: Path, src: Path, places: Mapping[str, str]) -> dict[str, Any]:
    """Run one step in ``folder`` (after writing its frozen run copy) and record what it
    printed and wrote; the raw output goes to ``folder/logs/``, copies of its output files
    to ``folder/kept/``."""
    if step.frozen_run:
        run, copy = (folder / p for p in step.frozen_run)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        copy.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(r) + "\n" for r in freeze_timings(records)]
        (copy / "metrics.jsonl").write_text("".join(lines))
    done = subprocess.run(
        [sys.executable, "-m", "dsmae", *step.args], cwd=folder, env=subprocess_env(src),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    log = folder / "logs" / f"{step.name.replace('/', '--')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ dsmae {' '.join(step.args)}\n# rc {done.returncode}\n"
                   f"# stdout\n{done.stdout}# stderr\n{done.stderr}")  # fmt: skip
    files = {}
    for output in step.outputs:
        record = record_output(folder / output, places)
        if record is None:
            continue
        files[output] = record
        if (folder / output).is_file():
            kept = folder / "kept" / step.name / output
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / output, kept)
    return {
        "command": list(step.args),
        "returncode": done.returncode,
        "stdout": normalise_lines(done.stdout, places),
        "stderr": normalise_lines(done.stderr, places),
        "files": files,
    }


def write_images(folder: Path) -> None:
    """The input images, from scikit-learn's digits (grey 8x8, values 0..240): two for
    ``denoise``; a nested folder of PNG, JPEG and upper-case names and a text file for
    ``features``; ``train/`` and ``test/`` class folders (20 and 6 a class) for
    ``experiment``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * 15).astype(np.uint8)

    def save(index: int, relative: str) -> None:
        target = folder / "images" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[index]).save(target)

    save(0, "denoise/a.png")
    save(1, "denoise/b.png")
    for index, name in enumerate(("b.png", "a.jpg", "sub/c.png", "sub/D.PNG", "sub/deep/e.png")):
        save(10 + index, f"features/{name}")
    (folder / "images" / "features" / "notes.txt").write_text("not an image\n")
    taken: Counter[tuple[str, int]] = Counter()
    for index, label in enumerate(digits.target.tolist()):
        split = "train" if taken["train", label] < 20 else "test"
        if taken[split, label] >= (20 if split == "train" else 6):
            continue
        taken[split, label] += 1
        save(index, f"experiment/{split}/class{label}/{index:04d}.png")


def keep_old_checkpoints(folder: Path, method: str) -> dict[str, Any]:
    """Copy the first periodic checkpoint of ``method``'s run to ``old_checkpoints/``;
    returns what ``resume`` needs: the checkpoint, its step, the command, the step name."""
    run = folder / "runs" / method
    first = sorted(run.glob("checkpoint-*.pt"))[0]
    kept = folder / "old_checkpoints" / f"{method}-{first.name}"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(first, kept)
    import torch

    step = torch.load(kept, map_location="cpu", weights_only=True)["step"]
    return {
        "checkpoint": kept.relative_to(folder).as_posix(),
        "step": int(step),
        "command": list(pretrain_args(method)),
        "run": f"runs/{method}",
        "pretrain_step": f"{method}/pretrain",
    }


def snapshot(src: Path, out: Path) -> int:
    """Run every step on the code at ``src`` into the new folder ``out``; write
    ``out/behaviour.json``. Returns 0, or 1 where a command failed."""
    src, out = src.resolve(), out.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: --out {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    dsmae_location(src)
    places = places_of(out, src)
    write_images(out)
    presets = sorted(p.stem for p in (src / "dsmae" / "presets").glob("*.yaml"))
    onnx = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript"))
    steps = snapshot_steps(presets, onnx)
    results: dict[str, Any] = {}
    resume_from: dict[str, Any] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for number, step in enumerate(steps, 1):
        began = time.perf_counter()
        results[step.name] = run_step(step, out, src, places)
        timings[step.name] = round(time.perf_counter() - began, 2)
        rc = results[step.name]["returncode"]
        print(f"[{number}/{len(steps)}] {step.name}: rc {rc}, {timings[step.name]:.1f} s",
              flush=True)  # fmt: skip
        method = step.name.split("/")[0]
        if step.name.endswith("/pretrain") and method in RESUMED and rc == 0:
            resume_from[method] = keep_old_checkpoints(out, method)
    snapshot_data = {
        "format": FORMAT,
        "environment": {"onnx": onnx, "python": sys.version.split()[0]},
        "resume_from": resume_from,
        "steps": results,
    }
    write_json(out / SNAPSHOT_FILE, snapshot_data)
    timings["total"] = round(time.perf_counter() - started, 1)
    write_json(out / "timings.json", timings)
    failed = [name for name, r in results.items() if r["returncode"] != 0]
    print(f"{len(steps)} commands in {timings['total']:.0f} s -> {out / SNAPSHOT_FILE}")
    if failed:
        print(f"failed: {', '.join(failed)} (see {out / 'logs'})")
    return 1 if failed else 0


def write_json(path: Path, value: Any) -> None:
    """``value`` as canonical JSON: sorted keys, indented, one final newline."""
    path.write_text(json.dumps(value, sort_keys=True, indent=1) + "\n")


def load_snapshot(path: Path) -> dict[str, Any]:
    """A snapshot's ``behaviour.json``, given it or its folder."""
    file = path / SNAPSHOT_FILE if path.is_dir() else path
    return json.loads(file.read_text())


# ---------------------------------------------------------------------------- comparison

MISSING = "<missing>"


@dataclass(frozen=True)
class Difference:
    """One difference of two snapshots: where (``a/b/[3]``), and the two values."""

    path: str
    before: Any
    after: Any


def _is_lines(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def differences(before: Any, after: Any, path: str = "") -> list[Difference]:
    """Every difference between two JSON values, by key path (keys joined by ``/``, list
    items as ``[i]``); lists of lines compared as a diff (``[i:j]``), values as canonical
    JSON (so NaN equals NaN)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(before.keys() | after.keys()):
            where = f"{path}/{key}" if path else key
            if key not in after:
                found.append(Difference(where, before[key], MISSING))
            elif key not in before:
                found.append(Difference(where, MISSING, after[key]))
            else:
                found += differences(before[key], after[key], where)
        return found
    if _is_lines(before) and _is_lines(after) and (before or after):
        matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
        return [
            Difference(f"{path}[{i1}:{i2}]", before[i1:i2], after[j1:j2])
            for tag, i1, i2, j1, j2 in matcher.get_opcodes()
            if tag != "equal"
        ]
    if isinstance(before, list) and isinstance(after, list):
        found = []
        for index in range(max(len(before), len(after))):
            b = before[index] if index < len(before) else MISSING
            a = after[index] if index < len(after) else MISSING
            found += differences(b, a, f"{path}[{index}]")
        return found
    if json.dumps(before, sort_keys=True) != json.dumps(after, sort_keys=True):
        return [Difference(path, before, after)]
    return []


def item_kind(key: str, value: Any, kind: str) -> str:
    """The kind of the items under ``key`` (inside ``kind``), for the counts of
    :func:`count_items`."""
    if isinstance(value, Mapping) and "kind" in value and "data" in value:
        return str(value["kind"])
    if key in ("stdout", "stderr"):
        return "print-config lines" if kind == "print-config" else "printed lines"
    if key.startswith("print-config/"):
        return "print-config"
    if key in ("returncode", "command"):
        return key
    return kind


def count_items(value: Any, kind: str = "other") -> Counter[str]:
    """How many values (lines, numbers, hashes) a snapshot holds, per kind."""
    counts: Counter[str] = Counter()
    if isinstance(value, Mapping):
        for key, child in value.items():
            if key == "kind" and "data" in value:
                continue  # a record's label, not an item
            counts += count_items(child, item_kind(str(key), child, kind))
    elif isinstance(value, list):
        for child in value:
            counts += count_items(child, kind)
    else:
        counts[kind] += 1
    return counts


def allowed(difference: Difference, prefixes: Sequence[str]) -> bool:
    """Whether a difference lies under one of the ``--allow`` key-path prefixes."""
    return any(difference.path.startswith(prefix) for prefix in prefixes)


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 400 else text[:400] + "..."


def compare(before: Path, after: Path, allow: Sequence[str]) -> int:
    """Print every difference between two snapshots; 1 if any is not allowed, else 0."""
    old, new = load_snapshot(before), load_snapshot(after)
    found = differences(old, new)
    refused = [d for d in found if not allowed(d, allow)]
    for difference in found:
        mark = "allowed " if allowed(difference, allow) else ""
        print(f"{mark}{difference.path}\n  before: {_shown(difference.before)}\n"
              f"  after:  {_shown(difference.after)}")  # fmt: skip
    counts = count_items(old)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    if refused:
        print(f"{len(refused)} difference(s) ({len(found) - len(refused)} allowed); "
              f"compared {summary}")  # fmt: skip
        return 1
    print(f"no difference ({len(found)} allowed); compared {summary}")
    return 0


# -------------------------------------------------------------------------------- resume

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt$")


def resumed_differences(
    before: Mapping[str, Any], after: Mapping[str, Any], step: int
) -> list[Difference]:
    """The differences between the run folder record of the uninterrupted run
    (``before``) and that of the run resumed at ``step`` (``after``): the metrics after
    ``step`` and every file, but the periodic checkpoints up to ``step``."""
    found = []
    for name, record in before.items():
        written = CHECKPOINT_NAME.search(name)
        if written and int(written.group(1)) <= step:
            continue
        if name not in after:
            found.append(Difference(name, record, MISSING))
        elif record["kind"] == "metrics":
            later = [[r for r in rec["data"] if r["step"] > step] for rec in (record, after[name])]
            if not later[0]:
                found.append(Difference(name, "no metrics after the resumed step", later[1]))
            found += differences(later[0], later[1], name)
        else:
            found += differences(record, after[name], name)
    return found


def resume(src: Path, old: Path, out: Path) -> int:
    """Continue each checkpoint kept by the snapshot ``old`` with the code at ``src`` in
    the new folder ``out``; 0 when every resumed run ends as the uninterrupted one."""
    src, old, out = src.resolve(), old.resolve(), out.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: --out {out} is not empty")
    dsmae_location(src)
    before = load_snapshot(old)
    places = places_of(out, src)
    report: dict[str, Any] = {}
    for method, kept in sorted(before["resume_from"].items()):
        target = out / kept["checkpoint"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old / kept["checkpoint"], target)
        step = Step(f"{method}/resume", (*kept["command"], "--resume", kept["checkpoint"]),
                    (kept["run"],))  # fmt: skip
        done = run_step(step, out, src, places)
        uninterrupted = before["steps"][kept["pretrain_step"]]["files"][kept["run"]]["data"]
        resumed = done["files"].get(kept["run"], {"data": {}})["data"]
        found = resumed_differences(uninterrupted, resumed, kept["step"])
        if done["returncode"] != 0:
            found.insert(0, Difference("returncode", 0, done["returncode"]))
        passed = not found
        report[method] = {"step": kept["step"], "passed": passed,
                          "differences": [d.__dict__ for d in found]}  # fmt: skip
        print(f"{method}: resumed at step {kept['step']}: {'PASS' if passed else 'FAIL'} "
              f"({len(uninterrupted)} files compared)")  # fmt: skip
        for difference in found:
            print(f"  {difference.path}\n    before: {_shown(difference.before)}\n"
                  f"    after:  {_shown(difference.after)}")  # fmt: skip
    write_json(out / "resume.json", report)
    return 0 if report and all(r["passed"] for r in report.values()) else 1


# ---------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shot = commands.add_parser("snapshot", help="run every command, write OUT/behaviour.json")
    shot.add_argument("--src", type=Path, required=True, help="the source tree (its src/)")
    shot.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    again = commands.add_parser("resume", help="resume the checkpoints a snapshot kept")
    again.add_argument("--src", type=Path, required=True, help="the source tree (its src/)")
    again.add_argument("--old", type=Path, required=True, help="the snapshot folder")
    again.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    both = commands.add_parser("compare", help="every difference of two snapshots")
    both.add_argument("before", type=Path, help="a snapshot folder or its behaviour.json")
    both.add_argument("after", type=Path, help="a snapshot folder or its behaviour.json")
    both.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                      help="a key path prefix whose differences are expected "
                           "(repeatable), e.g. steps/print-config/quickstart")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "snapshot":
        return snapshot(args.src, args.out)
    if args.command == "resume":
        return resume(args.src, args.old, args.out)
    return compare(args.before, args.after, args.allow)


if __name__ == "__main__":
    sys.exit(main())
