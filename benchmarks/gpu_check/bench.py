"""The ``bench`` stage: step rates, MFU, each speed switch's A/B."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from .plan import (
    BENCH,
    CUDA_ONLY,
    MODES,
    PROFILED,
    SHRUNK_COMPILE,
    SWITCHES,
    TINY_BENCH,
    TINY_MODEL,
    _write,
    log,
)


def bench_plan(
    rows: str, shrink: bool, cuda: bool = True
) -> list[tuple[str, str, int, int, int, str]]:
    """The benchmarks of a bench stage, in the order they run.

    "rates": the science step (ViT-Tiny 32/2) of dsmae and mae compiled, as pre-training
    runs it: the rates the pre-training stages plan with. "speed": the rest of the MFU
    table, the science step eager, ViT-Small 96/6 eager and compiled, then dsmae at
    ViT-Tiny under regional compilation and with each of :data:`SWITCHES` (those of
    :data:`CUDA_ONLY` only on CUDA).
    """
    table = TINY_BENCH if shrink else BENCH
    if rows == "rates":
        return [(*row, "compiled") for row in table[:2]]
    plan = [(*row, "eager") for row in table[:2]]
    plan += [(*row, mode) for row in table[2:] for mode in ("eager", "compiled")]
    modes = ["compiled-blocks", *(m for m in SWITCHES if cuda or m not in CUDA_ONLY)]
    return plan + [(*table[0], mode) for mode in modes]


def _mode_overrides(mode: str) -> dict[str, Any]:
    """The config of a bench mode: one of :data:`MODES`, or a switch on top of "compiled"."""
    if mode in MODES:
        return dict(MODES[mode])
    return {**MODES["compiled"], **SWITCHES[mode]}


def stage_bench(results: Path, args: argparse.Namespace) -> None:
    from dsmae.bench import format_report, run_bench

    deadline = time.monotonic() + args.budget
    only = set(args.only.split(",")) if args.only else None
    cuda = args.device.startswith("cuda")
    steps, warmup = (2, 1) if args.shrink else (10, 3)
    for method, arch, img, patch, batch, mode in bench_plan(args.rows, args.shrink, cuda):
        name = f"bench-{method}-{arch}-{mode}"
        if only is not None and name.removeprefix("bench-") not in only:
            continue
        overrides = _mode_overrides(mode)
        if args.shrink:
            overrides.update(TINY_MODEL | (SHRUNK_COMPILE if mode != "eager" else {}))
        left = deadline - time.monotonic()
        need = 15 if mode == "eager" or args.shrink else 60
        if left < need:  # a compile would not finish: say so rather than be killed
            _write(results / f"{name}.json", {"skipped": f"{left:.0f} s left of the stage"})
            continue
        started = time.monotonic()
        try:
            profile = results / f"profile-{name}.json" if name == PROFILED else None
            result = run_bench(
                method, arch, img, patch, batch, steps=steps, warmup=warmup, device=args.device,
                overrides=overrides, profile=profile,
            )  # fmt: skip
        except Exception as err:  # one failure must not cost the other rows
            log.exception("%s failed", name)
            result = {"error": f"{type(err).__name__}: {err}"}
        else:
            print(format_report(result), flush=True)
        result["wall_s"] = time.monotonic() - started
        shape = (method, arch, img, patch, batch)
        result["command"] = _bench_command(*shape, args.device, overrides, steps)
        _write(results / f"{name}.json", result)
        _release_gpu_memory()


def _bench_command(
    method: str,
    arch: str,
    img: int,
    patch: int,
    batch: int,
    device: str,
    overrides: dict,
    steps: int,
) -> str:
    """The ``dsmae bench`` command line that measures the same thing."""
    argv = ["dsmae", "bench", "--method", method, "--arch", arch, "--img-size", str(img),
            "--patch-size", str(patch), "--batch-size", str(batch), "--steps", str(steps),
            "--device", device]  # fmt: skip
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(argv)


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
