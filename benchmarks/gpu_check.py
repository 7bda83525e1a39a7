"""The stages of ``benchmarks/gpu_check.sh``; each is run, and time-limited, on its own.

    python3 benchmarks/gpu_check.py STAGE RESULTS_DIR [--device cuda] [--seconds 120]
        [--data FOLDER] [--rows tiny|small] [--budget S] [--shrink]

Stages (each writes its own files into RESULTS_DIR, so one that fails leaves the others):

- ``env``: the machine, torch/timm versions and a bf16 8192^3 matmul (the MFU
  denominator): ``env.json``.
- ``bench --rows tiny|small``: ``dsmae bench`` (:func:`dsmae.bench.run_bench`, in this
  process) for dsmae and mae at ViT-Tiny 32/2 (batch 1024) or ViT-Small 96/6 (batch
  256), bf16, eager and compiled: ``bench-METHOD-ARCH-MODE.json``. A benchmark that would
  not finish inside ``--budget`` seconds is skipped and says so.
- ``pretrain-dsmae`` / ``pretrain-mae``: ``dsmae pretrain`` of the cifar10-vit-tiny preset
  (SPEC defaults) at batch 1024 on the CIFAR-10 folder ``--data`` for about ``--seconds``
  of training: the epochs are chosen from the step rate that ``bench`` measured, so that
  warm-up and cosine finish inside that time. ``pretrain-METHOD/`` and
  ``pretrain-METHOD.json``.
- ``eval``: the avg-pooled linear probe and k-NN (full train/test split) of both and of
  the random-init encoder, six ``dsmae`` commands at once: ``eval.json``.
- ``summary``: ``summary.json`` and the markdown table ``summary.md``, printed.

``--shrink`` runs the same flow with tiny models and batches, compiled steps on Dynamo's
``aot_eager`` backend rather than a CPU Inductor build (for the CPU test).
Nothing here installs anything: it runs with the interpreter that runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_check")

PAPER_EPOCHS = 500  # SPEC section 5
CIFAR10_TRAIN = 50_000
WARMUP_SHARE = 20 / 500  # SPEC section 5: 20 warm-up epochs of 500
SCIENCE = {"preset": "cifar10-vit-tiny", "batch": 1024}
# (method, arch, img, patch, batch, extra config): stage 2's steps, most needed first
BENCH = [
    ("dsmae", "vit_tiny", 32, 2, 1024),
    ("mae", "vit_tiny", 32, 2, 1024),
    ("dsmae", "vit_small", 96, 6, 256),
    ("mae", "vit_small", 96, 6, 256),
]
MODES = {  # name: config overrides; "blocks" only for the first row (regional compilation)
    "eager": {"train.compile": False},
    "compiled": {"train.compile": True, "train.compile_scope": "model"},
    "compiled-blocks": {"train.compile": True, "train.compile_scope": "blocks"},
}
# --shrink: the same flow at toy sizes, for a CPU test
TINY_MODEL = {
    "model.depth": 1,
    "model.embed_dim": 32,
    "model.num_heads": 2,
    "model.decoder_depth": 1,
    "model.regressor_depth": 1,
}
SHRUNK_COMPILE = {"train.compile_backend": "aot_eager"}  # Dynamo's path, not a CPU Inductor build
TINY_BENCH = [
    ("dsmae", "vit_tiny", 16, 4, 8),
    ("mae", "vit_tiny", 16, 4, 8),
    ("dsmae", "vit_small", 8, 2, 4),
    ("mae", "vit_small", 8, 2, 4),
]


def _write(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- stages


def stage_env(results: Path, args: argparse.Namespace) -> None:
    import timm
    import torch

    from dsmae.bench import device_name, matmul_peak_gflops

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = 8192 if cuda and not args.shrink else 256
    peak = matmul_peak_gflops(dev, dtype, size=size, repeats=10)
    env = {
        "device": device_name(dev),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "cpus": os.cpu_count(),
        "matmul_size": size,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tflops": peak / 1e3,
    }
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        env["gpu_memory_gib"] = props.total_memory / 2**30
        env["multiprocessors"] = props.multi_processor_count
    _write(results / "env.json", env)
    print(json.dumps(env, indent=2))


def bench_plan(rows: str, shrink: bool) -> list[tuple[str, str, int, int, int, str]]:
    """The benchmarks of a bench stage, in the order they run: "tiny" (the science model)
    and "small", each with dsmae and mae, eager and compiled; "small" ends with dsmae at
    ViT-Tiny under regional compilation."""
    table = TINY_BENCH if shrink else BENCH
    chosen = table[:2] if rows == "tiny" else table[2:]
    plan = []
    for method, arch, img, patch, batch in chosen:
        plan += [(method, arch, img, patch, batch, mode) for mode in ("eager", "compiled")]
    if rows == "small":
        method, arch, img, patch, batch = table[0]
        plan.append((method, arch, img, patch, batch, "compiled-blocks"))
    return plan


def stage_bench(results: Path, args: argparse.Namespace) -> None:
    from dsmae.bench import format_report, run_bench

    deadline = time.monotonic() + args.budget
    only = set(args.only.split(",")) if args.only else None
    for method, arch, img, patch, batch, mode in bench_plan(args.rows, args.shrink):
        name = f"bench-{method}-{arch}-{mode}"
        if only is not None and name.removeprefix("bench-") not in only:
            continue
        overrides = dict(MODES[mode])
        if args.shrink:
            overrides.update(TINY_MODEL | (SHRUNK_COMPILE if mode != "eager" else {}))
        left = deadline - time.monotonic()
        need = 15 if mode == "eager" or args.shrink else 60
        if left < need:  # a compile would not finish: say so rather than be killed
            _write(results / f"{name}.json", {"skipped": f"{left:.0f} s left of the stage"})
            continue
        started = time.monotonic()
        try:
            result = run_bench(
                method, arch, img, patch, batch, steps=10, warmup=3, device=args.device,
                overrides=overrides,
            )  # fmt: skip
        except Exception as err:  # one failure must not cost the other rows
            log.exception("%s failed", name)
            result = {"error": f"{type(err).__name__}: {err}"}
        else:
            print(format_report(result), flush=True)
        result["wall_s"] = time.monotonic() - started
        result["command"] = _bench_command(method, arch, img, patch, batch, args.device, overrides)
        _write(results / f"{name}.json", result)
        _release_gpu_memory()


def _bench_command(
    method: str, arch: str, img: int, patch: int, batch: int, device: str, overrides: dict
) -> str:
    """The ``dsmae bench`` command line that measures the same thing."""
    argv = ["dsmae", "bench", "--method", method, "--arch", arch, "--img-size", str(img),
            "--patch-size", str(patch), "--batch-size", str(batch), "--steps", "10",
            "--device", device]  # fmt: skip
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(argv)


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_rate(results: Path, method: str, shrink: bool) -> tuple[float | None, str]:
    """The measured img/s of the science model's step, and the mode that reached it:
    compiled (the pre-training default on CUDA) where that worked, else eager."""
    arch = (TINY_BENCH if shrink else BENCH)[0][1]
    for mode in ("compiled", "compiled-blocks", "eager"):
        found = _read(results / f"bench-{method}-{arch}-{mode}.json") or {}
        if found.get("img_per_s"):
            return found["img_per_s"], mode
    return None, "eager"


def schedule(seconds: float, img_per_s: float, batch: int, images: int) -> tuple[int, int]:
    """Epochs (and warm-up epochs, the paper's 20/500 share) that take about ``seconds``
    at ``img_per_s``, counting whole steps of ``batch`` (a partial last batch is dropped)."""
    per_epoch = (images // batch) * batch
    epochs = max(1, math.floor(seconds * img_per_s / per_epoch))
    return epochs, max(1, round(epochs * WARMUP_SHARE))


def stage_pretrain(results: Path, args: argparse.Namespace, method: str) -> None:
    if not args.data:
        raise SystemExit("pretrain needs --data (the CIFAR-10 folder)")
    batch = 16 if args.shrink else SCIENCE["batch"]
    rate, mode = step_rate(results, method, args.shrink)
    train_images = _count_images(Path(args.data) / "train")
    if rate is None:  # no bench figure: assume a slow step and say so
        rate, mode = 1000.0 if args.device.startswith("cuda") else 50.0, "eager (rate assumed)"
    epochs, warmup = schedule(args.seconds, rate, batch, train_images)
    out = results / f"pretrain-{method}"
    argv = [
        sys.executable, "-m", "dsmae", "pretrain", "--preset", SCIENCE["preset"],
        "--method", method, "--data", args.data, "--batch-size", str(batch),
        "--epochs", str(epochs), "--set", f"train.warmup_epochs={warmup}",
        "--set", "monitor.knn_every=0", "--set", "monitor.images_every=0",
        "--set", "train.checkpoint_every=0", "--set", "train.checkpoint_minutes=0",
        "--set", "train.log_every=20", "--device", args.device, "--out", str(out),
    ]  # fmt: skip
    compiled = mode.startswith("compiled")
    argv += ["--set", f"train.compile={str(compiled).lower()}"]
    if compiled:
        argv += [
            "--set",
            f"train.compile_scope={'blocks' if mode == 'compiled-blocks' else 'model'}",
        ]
    if args.shrink:
        argv += [a for key, value in TINY_MODEL.items() for a in ("--set", f"{key}={value}")]
        argv += ["--img-size", "16", "--patch-size", "4", "--set", "train.log_every=2"]
        argv += [a for key, value in SHRUNK_COMPILE.items() for a in ("--set", f"{key}={value}")]
    print("$", shlex.join(argv[2:]), flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, check=False)
    record = {
        "method": method,
        "planned_seconds": args.seconds,
        "bench_img_per_s": rate,
        "step_mode": mode,
        "epochs": epochs,
        "warmup_epochs": warmup,
        "batch_size": batch,
        "train_images": train_images,
        "returncode": done.returncode,
        "wall_s": time.monotonic() - started,
        "command": shlex.join(["dsmae", *argv[3:]]),
    }
    record.update(_training_figures(out))
    _write(results / f"pretrain-{method}.json", record)
    print(json.dumps(record, indent=2))


def _count_images(folder: Path) -> int:
    from dsmae.data.sources import find_image_files

    return len(find_image_files(folder))


def _training_figures(out: Path) -> dict[str, Any]:
    """From a run's metrics.jsonl: the last loss, the steady img/s (median of the lines
    after the first), the compile time and the training time (set-up and compilation
    excluded)."""
    from dsmae.metrics import read_metrics

    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [r for r in read_metrics(path) if "loss" in r]
    if not lines:
        return {}
    timed = [r["img_per_s"] for r in lines if "img_per_s" in r]
    rates = sorted(timed[1:] or timed) or [0.0]  # one line only: its rate, warm-up and all
    compile_s = next((r["compile_s"] for r in lines if "compile_s" in r), 0.0)
    setup_s = next((r["setup_s"] for r in lines if "setup_s" in r), 0.0)
    last = lines[-1]
    return {
        "steps": last["step"],
        "epochs_done": last["epoch"] + 1,
        "last_loss": last["loss"],
        "img_per_s": rates[len(rates) // 2],
        "setup_s": setup_s,
        "compile_s": compile_s,
        "train_s": last.get("wall_s", math.nan) - setup_s - compile_s,
        "peak_mem_mb": last.get("peak_mem_mb"),
    }


def stage_eval(results: Path, args: argparse.Namespace) -> None:
    jobs = {}
    for method in ("dsmae", "mae"):
        checkpoint = results / f"pretrain-{method}" / "last.pt"
        if checkpoint.is_file():
            jobs[(method, "linprobe")] = ["linprobe", "--checkpoint", str(checkpoint)]
            jobs[(method, "knn")] = ["knn", "--checkpoint", str(checkpoint)]
    if jobs:  # the random-init baseline: the same ViT, from the first checkpoint
        first = next(iter(jobs.values()))[2]
        jobs[("random init", "linprobe")] = ["linprobe", "--checkpoint", first, "--random-init"]
        jobs[("random init", "knn")] = ["knn", "--checkpoint", first, "--random-init"]
    extra = ["--epochs", "2"] if args.shrink else []
    # the six run at once: share the cores rather than each spinning up one thread per core
    threads = str(max(1, (os.cpu_count() or 1) // max(len(jobs), 1)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    running = {}
    for key, argv in jobs.items():
        full = [sys.executable, "-m", "dsmae", *argv, "--pool", "avg", "--device", args.device]
        if key[1] == "linprobe":
            full += extra
        log_file = (results / f"eval-{key[0].replace(' ', '-')}-{key[1]}.log").open("w")
        child = subprocess.Popen(full, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        running[key] = (child, full)
    table: dict[str, dict[str, Any]] = {}
    for (who, protocol), (proc, full) in running.items():
        code = proc.wait()
        checkpoint = Path(full[full.index("--checkpoint") + 1])
        name = f"{checkpoint.stem}.{protocol}{'-random-init' if who == 'random init' else ''}"
        found = _read(checkpoint.with_name(f"{name}.json")) if code == 0 else None
        table.setdefault(who, {})[protocol] = found or {"returncode": code}
        table[who][f"{protocol}_command"] = shlex.join(["dsmae", *full[3:]])
    _write(results / "eval.json", table)
    print(json.dumps(table, indent=2))


# ----------------------------------------------------------------------------- summary


def summarise(results: Path) -> tuple[dict[str, Any], str]:
    """Everything the stages wrote, and the markdown table of it."""
    summary: dict[str, Any] = {"env": _read(results / "env.json"), "bench": {}}
    for path in sorted(results.glob("bench-*.json"), key=lambda p: p.stat().st_mtime):
        summary["bench"][path.stem.removeprefix("bench-")] = _read(path)  # in the order run
    for method in ("dsmae", "mae"):
        summary[f"pretrain-{method}"] = _read(results / f"pretrain-{method}.json")
    summary["eval"] = _read(results / "eval.json")
    summary["stages"] = {
        path.stem: path.read_text().strip() for path in sorted(results.glob("*.rc"))
    }
    summary["projection_500_epochs_min"] = _projection(summary)
    return summary, _table(summary)


def _projection(summary: dict[str, Any]) -> dict[str, float]:
    """Minutes of the paper's 500-epoch CIFAR-10 ViT-Tiny pre-training (50k images), at
    each measured rate of the dsmae step."""
    out = {}
    for name, result in summary["bench"].items():
        if name.startswith("dsmae-vit_tiny") and result and result.get("img_per_s"):
            out[f"bench {name}"] = PAPER_EPOCHS * CIFAR10_TRAIN / result["img_per_s"] / 60
    run = summary.get("pretrain-dsmae") or {}
    if run.get("img_per_s"):
        out["pretrain dsmae"] = PAPER_EPOCHS * CIFAR10_TRAIN / run["img_per_s"] / 60
    return out


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"


def _num(value: Any, fmt: str = ".0f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _table(summary: dict[str, Any]) -> str:
    env = summary["env"] or {}
    lines = [
        f"GPU check on {env.get('device', '?')}: torch {env.get('torch', '?')}, timm "
        f"{env.get('timm', '?')}; {env.get('matmul_dtype', '?')} {env.get('matmul_size', '?')}^3 "
        f"matmul {_num(env.get('matmul_tflops'), '.1f')} TFLOP/s",
        "",
        "| step | mode | batch | img/s | MFU | peak mem (MiB) | data share | compile (s) "
        "| host syncs/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in summary["bench"].items():
        r = r or {}
        method, arch, mode = name.split("-", 2) if name.count("-") >= 2 else (name, "", "")
        if "img_per_s" not in r:
            reason = r.get("error") or r.get("skipped") or "no result"
            lines.append(f"| {method} {arch} | {mode} | | {reason[:60]} | | | | | |")
            continue
        lines.append(
            f"| {method} {arch} {r['img_size']}/{r['patch_size']} | {mode} | {r['batch_size']} "
            f"| {_num(r['img_per_s'])} | {_pct(r['mfu'])} | {_num(r['peak_mem_mb'])} "
            f"| {_pct(r['data_share'])} | {_num(r.get('compile_s'), '.1f')} "
            f"| {_num(r.get('host_syncs_per_step'), 'd')} |"
        )
    lines += [
        "",
        "| method | epochs (warm-up) | train s | img/s | compile s | last loss "
        "| linear probe (avg) | k-NN (avg) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    evals = summary["eval"] or {}
    for method in ("dsmae", "mae", "random init"):
        run = summary.get(f"pretrain-{method}") or {}
        e = evals.get(method, {})
        probe = (e.get("linprobe") or {}).get("top1")
        knn = (e.get("knn") or {}).get("top1")
        lines.append(
            f"| {method} | {run.get('epochs', '-')} ({run.get('warmup_epochs', '-')}) "
            f"| {_num(run.get('train_s'))} | {_num(run.get('img_per_s'))} "
            f"| {_num(run.get('compile_s'), '.1f')} | {_num(run.get('last_loss'), '.4f')} "
            f"| {_num(probe, '.2f')} | {_num(knn, '.2f')} |"
        )
    lines.append("")
    for name, minutes in summary["projection_500_epochs_min"].items():
        lines.append(f"500-epoch CIFAR-10 ViT-Tiny pre-training at the {name} rate: "
                     f"{minutes:.1f} min")  # fmt: skip
    return "\n".join(lines) + "\n"


def stage_summary(results: Path, args: argparse.Namespace) -> None:
    summary, table = summarise(results)
    _write(results / "summary.json", summary)
    (results / "summary.md").write_text(table)
    print(table)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "stage", choices=("env", "bench", "pretrain-dsmae", "pretrain-mae", "eval", "summary")
    )
    parser.add_argument("results", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=120.0, help="pre-training time")
    parser.add_argument("--rows", choices=("tiny", "small"), default="tiny", help="bench rows")
    parser.add_argument("--budget", type=float, default=150.0, help="bench stage seconds")
    parser.add_argument("--only", help="bench: only these, e.g. mae-vit_tiny-eager,...")
    parser.add_argument("--data", help="the CIFAR-10 folder (train/ and test/)")
    parser.add_argument("--shrink", action="store_true", help="toy sizes (CPU test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.results.mkdir(parents=True, exist_ok=True)
    if args.stage.startswith("pretrain-"):
        stage_pretrain(args.results, args, args.stage.removeprefix("pretrain-"))
    else:
        {"env": stage_env, "bench": stage_bench, "eval": stage_eval, "summary": stage_summary}[
            args.stage
        ](args.results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
