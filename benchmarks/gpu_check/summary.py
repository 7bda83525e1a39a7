"""The ``summary`` stage: one JSON and one table of every figure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .plan import CIFAR10_TRAIN, EQUAL_TIME, PAPER_EPOCHS, _read, _write
from .smoke import smoke_table


def summarise(results: Path) -> tuple[dict[str, Any], str]:
    """Everything the stages wrote, and the markdown table of it."""
    summary: dict[str, Any] = {
        "smoke": _read(results / "smoke.json"),
        "env": _read(results / "env.json"),
        "bench": {},
    }
    for path in sorted(results.glob("bench-*.json"), key=lambda p: p.stat().st_mtime):
        summary["bench"][path.stem.removeprefix("bench-")] = _read(path)  # in the order run
    for method in ("dsmae", "mae", "mae-equal-time"):
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
    runs = {"dsmae": "dsmae", "mae": "mae", EQUAL_TIME: "mae-equal-time", "random init": ""}
    for method, name in runs.items():
        run = summary.get(f"pretrain-{name}") or {}
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
    if summary["smoke"]:
        lines += ["Every command once (smoke):", "", smoke_table(summary["smoke"])]
    for name, minutes in summary["projection_500_epochs_min"].items():
        lines.append(f"500-epoch CIFAR-10 ViT-Tiny pre-training at the {name} rate: "
                     f"{minutes:.1f} min")  # fmt: skip
    return "\n".join(lines) + "\n"


def stage_summary(results: Path, args: argparse.Namespace) -> None:
    summary, table = summarise(results)
    _write(results / "summary.json", summary)
    (results / "summary.md").write_text(table)
    print(table)
