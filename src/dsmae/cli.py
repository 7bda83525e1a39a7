"""The ``dsmae`` command: ``dsmae pretrain``, ``dsmae linprobe`` and ``dsmae bench``.

Common options are flags; any other config value is reachable with ``--set
section.key=value`` or a YAML file (``--config``), on top of a ``--preset``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from dsmae.config import ConfigError, available_presets, build_config, parse_assignment
from dsmae.data.sources import DataError

log = logging.getLogger("dsmae")

# flag -> (config key, type); each becomes an override of the preset/config files.
COMMON_FLAGS: dict[str, tuple[str, type]] = {
    "--method": ("model.method", str),
    "--arch": ("model.arch", str),
    "--data": ("data.source", str),
    "--data-root": ("data.root", str),
    "--img-size": ("model.img_size", int),
    "--patch-size": ("model.patch_size", int),
    "--in-chans": ("model.in_chans", int),
    "--epochs": ("train.epochs", int),
    "--batch-size": ("train.batch_size", int),
    "--micro-batch": ("train.micro_batch", int),
    "--noise-ratio": ("model.noise_ratio", float),
    "--lam": ("model.lam", float),
    "--out": ("out", str),
    "--device": ("train.device", str),
    "--seed": ("train.seed", int),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_set_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): any config value, collected in ``args.assign``."""
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="assign", help=help
    )


def _add_pretrain(sub: Any) -> None:
    p = sub.add_parser("pretrain", help="pre-train an encoder (DSMAE, its ablations or MAE)")
    p.add_argument(
        "--preset", help=f"start from a shipped preset: {', '.join(available_presets())}"
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML file of config values, applied after the preset (repeatable)",
    )
    _add_set_flag(p, "any config value, e.g. train.warmup_epochs=5 (repeatable)")
    for flag, (key, kind) in COMMON_FLAGS.items():
        p.add_argument(flag, type=kind, dest=_dest(flag), help=f"sets {key}")
    p.add_argument("--download", action="store_true", help="download a torchvision data set")
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT|auto",
        help="continue from a checkpoint; auto: the newest one in --out (none: start afresh)",
    )
    p.add_argument(
        "--force", action="store_true", help="resume from a checkpoint made with other settings"
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.set_defaults(run=_run_pretrain)


def _add_linprobe(sub: Any) -> None:
    p = sub.add_parser("linprobe", help="linear-probe top-1 of a checkpoint's frozen encoder")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dsmae pretrain")
    p.add_argument("--data", help="data set or image folder (default: the pre-training data)")
    p.add_argument("--data-root", help="where torchvision data sets live")
    p.add_argument("--download", action="store_true", help="download a torchvision data set")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="probe the same architecture at random initialisation (baseline)",
    )
    p.add_argument("--pool", choices=("token", "avg"), help="[CLS] token or mean of patch tokens")
    p.add_argument("--epochs", type=int, help="probe epochs")
    p.add_argument("--batch-size", type=int, help="probe batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_linprobe)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="time one pre-training step on a synthetic batch: img/s, memory, FLOPs, MFU"
    )
    p.add_argument("--method", required=True, help="dsmae, dsmae-ly, dsmae-lz or mae")
    p.add_argument("--arch", required=True, help="vit_tiny, vit_small or vit_base")
    p.add_argument("--img-size", type=int, required=True)
    p.add_argument("--patch-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (default)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--micro-batch", type=int, help="micro-batch (default: the whole batch)")
    p.add_argument("--depth", type=int, help="encoder depth (default: from --arch)")
    p.add_argument("--embed-dim", type=int, help="encoder width (default: from --arch)")
    p.add_argument("--num-heads", type=int, help="encoder heads (default: from --arch)")
    _add_set_flag(p, "any other config value, e.g. model.decoder_depth=2 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=_run_bench)


def config_from_args(args: argparse.Namespace) -> Any:
    """The resolved Config of ``dsmae pretrain``'s arguments."""
    overrides = dict(parse_assignment(a) for a in args.assign)
    for flag, (key, _) in COMMON_FLAGS.items():
        value = getattr(args, _dest(flag))
        if value is not None:
            overrides[key] = value
    if args.download:
        overrides["data.download"] = True
    return build_config(args.preset, args.config, overrides)


def _run_pretrain(args: argparse.Namespace) -> None:
    from dsmae.engine import pretrain
    from dsmae.evaluation.linprobe import linprobe

    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    result = pretrain(cfg, resume=args.resume, force=args.force)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    print(f"checkpoint: {result.checkpoint}")
    figure = result.out / "denoise.png"
    if figure.exists():
        print(f"denoising figure (noisy / denoised / original): {figure}")
    if cfg.probe.after_pretrain:
        device = cfg.train.device
        trained = linprobe(result.checkpoint, device=device, seed=cfg.train.seed)
        print(f"linear probe top-1, pre-trained encoder: {trained.top1:.2f}%")
        if cfg.probe.random_baseline:
            baseline = linprobe(
                result.checkpoint, random_init=True, device=device, seed=cfg.train.seed
            )
            print(f"linear probe top-1, same encoder at random init: {baseline.top1:.2f}%")
    print(f"pre-training took {result.seconds:.0f} s")


def _run_linprobe(args: argparse.Namespace) -> None:
    from dsmae.evaluation.linprobe import linprobe

    changes = {"pool": args.pool, "epochs": args.epochs, "batch_size": args.batch_size}
    result = linprobe(
        args.checkpoint,
        data=args.data,
        data_root=args.data_root,
        download=args.download or None,
        random_init=args.random_init,
        probe_overrides={k: v for k, v in changes.items() if v is not None},
        device=args.device,
        seed=args.seed,
    )
    label = "random-init encoder" if args.random_init else "pre-trained encoder"
    print(f"linear probe top-1 ({label}, last epoch of {result.epochs}): {result.top1:.2f}%")


def _run_bench(args: argparse.Namespace) -> None:
    from dsmae.bench import format_report, run_bench, to_json

    overrides = dict(parse_assignment(a) for a in args.assign)
    if args.micro_batch is not None:
        overrides["train.micro_batch"] = args.micro_batch
    for key in ("depth", "embed_dim", "num_heads"):
        if getattr(args, key) is not None:
            overrides[f"model.{key}"] = getattr(args, key)
    result = run_bench(
        args.method,
        args.arch,
        args.img_size,
        args.patch_size,
        args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        in_chans=args.in_chans,
        seed=args.seed,
        overrides=overrides,
    )
    print(to_json(result) if args.json else format_report(result))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsmae", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_linprobe(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.run(args)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"dsmae {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
