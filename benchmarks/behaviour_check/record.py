"""A snapshot: every command run in a subprocess, what it printed and wrote recorded, normalised."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .commands import (
    FORMAT,
    OUT_MARK,
    PYTHON_MARK,
    RESUMED,
    RUN_ID_MARK,
    SNAPSHOT_FILE,
    SRC_MARK,
    Step,
    pretrain_args,
    snapshot_steps,
)
from .normalise import freeze_timings, normalise_json, normalise_lines, replace_paths

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
