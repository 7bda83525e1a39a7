"""The ``dsmae`` command: pre-train (``pretrain``), evaluate (``linprobe``, ``knn``), look
(``denoise``, ``plot``), take the encoder away (``export``, ``features``) and measure
(``bench``).

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

from dsmae.checkpoint import CheckpointError
from dsmae.config import POOLS, ConfigError, available_presets, build_config, parse_assignment
from dsmae.data.sources import DataError
from dsmae.engine import DivergedError
from dsmae.preemption import PREEMPTED_EXIT, Preempted
from dsmae.runtime import keep_freed_memory
from dsmae.writes import WriteError

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
        "--skip-bad-images",
        action="store_true",
        help="skip (and count) image files that cannot be read instead of stopping",
    )
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT|auto",
        help="continue from a checkpoint; auto: the newest one in --out (none: start afresh)",
    )
    p.add_argument(
        "--force", action="store_true", help="resume from a checkpoint made with other settings"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in an --out folder that holds another run",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.set_defaults(run=_run_pretrain)


def _add_linprobe(sub: Any) -> None:
    p = sub.add_parser("linprobe", help="linear-probe top-1 of a checkpoint's frozen encoder")
    _add_frozen_data_flags(p)
    p.add_argument("--epochs", type=int, help="probe epochs")
    p.add_argument("--batch-size", type=int, help="probe batch size")
    p.add_argument(
        "--recipe",
        choices=("fast", "mae"),
        help="fast: SGD on features computed once; mae: MAE's own recipe (LARS, the encoder "
        "run live on random-resized crops and flips every epoch); default: the checkpoint's "
        "probe.recipe (fast unless set)",
    )
    p.set_defaults(run=_run_linprobe)


def _add_frozen_data_flags(p: argparse.ArgumentParser) -> None:
    """The data flags of the protocols on frozen features (linprobe, knn)."""
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dsmae pretrain")
    p.add_argument("--data", help="data set or image folder (default: the pre-training data)")
    p.add_argument("--data-root", help="where torchvision data sets live")
    p.add_argument("--download", action="store_true", help="download a torchvision data set")
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip image files that cannot be read"
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate the same architecture at random initialisation (baseline)",
    )
    p.add_argument(
        "--pool",
        choices=POOLS,
        help="avg: mean of the patch tokens (default, what DSMAE trains); cls: the [CLS] token",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a checkpoint's encoder fully (MAE's recipe); --random-init"
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dsmae pretrain")
    p.add_argument("--data", help="data set or image folder (default: the pre-training data)")
    p.add_argument("--data-root", help="where torchvision data sets live")
    p.add_argument("--download", action="store_true", help="download a torchvision data set")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument(
        "--random-init", action="store_true", help="the same recipe from random init (scratch)"
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML file of finetune/data/train values on top of the checkpoint's (repeatable)",
    )
    _add_set_flag(p, "any finetune/data/train value, e.g. finetune.layer_decay=0.65")
    p.add_argument("--epochs", type=int, help="sets finetune.epochs")
    p.add_argument("--batch-size", type=int, help="sets finetune.batch_size")
    p.add_argument("--out", help="folder for metrics.jsonl and TensorBoard (default: none)")
    p.add_argument("--device", help="sets train.device")
    p.add_argument("--seed", type=int, help="sets train.seed")
    p.set_defaults(run=_run_finetune)


def _add_experiment(sub: Any) -> None:
    from dsmae.experiments import GRIDS

    p = sub.add_parser("experiment", help="run a grid of the paper (resumable) and write its table")
    p.add_argument("name", choices=GRIDS, help="which table or figure")
    p.add_argument("--datasets", nargs="+", help="subset of cifar10 cifar100 stl10")
    p.add_argument("--archs", nargs="+", help="subset of vit_tiny vit_small vit_base")
    p.add_argument("--epochs", type=int, help="pre-training epochs of every cell")
    p.add_argument("--subset", type=int, help="pre-training images of every cell")
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--probe-epochs", type=int)
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DATASET=FOLDER",
        help="read a data set from an image folder, e.g. cifar10=/data/cifar10 (repeatable)",
    )
    _add_set_flag(p, "any config value for every cell, e.g. model.patch_size=4")
    p.add_argument("--device")
    p.add_argument("--results", default="results", help="where tables and runs go (results)")
    p.set_defaults(run=_run_experiment)


def _add_knn(sub: Any) -> None:
    p = sub.add_parser("knn", help="k-NN top-1 (cosine, temperature-weighted) on frozen features")
    _add_frozen_data_flags(p)
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (0.07)")
    p.set_defaults(run=_run_knn)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="write the encoder for timm: model.safetensors + config.json")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dsmae pretrain")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--teacher", action="store_true", help="export the EMA teacher instead")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the files of a non-empty --out folder"
    )
    p.set_defaults(run=_run_export)


def _add_features(sub: Any) -> None:
    p = sub.add_parser("features", help="embeddings of every image of a folder, as .npy")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dsmae pretrain")
    p.add_argument("--data", required=True, help="a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="the .npy file (file names: OUT.files.txt)")
    p.add_argument(
        "--pool", choices=POOLS, help="avg (mean of the patch tokens, default) or cls ([CLS])"
    )
    p.add_argument("--teacher", action="store_true", help="use the EMA teacher")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_run_features)


def _add_denoise(sub: Any) -> None:
    p = sub.add_parser("denoise", help="noisy / denoised / original figure for any images")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dsmae pretrain")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", default="denoise.png", help="the PNG to write (denoise.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_run_denoise)


def _add_plot(sub: Any) -> None:
    p = sub.add_parser("plot", help="pre-training curves of a run folder as PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of dsmae pretrain")
    p.add_argument("--out", help="the PNG to write (default RUN_DIR/curves.png)")
    p.set_defaults(run=_run_plot)


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
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the step, as pretrain (default: on for CUDA, off on CPU)",
    )
    p.add_argument(
        "--parts", action="store_true", help="also time each part alone (student, teacher, heads)"
    )
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
    if args.skip_bad_images:
        overrides["data.skip_bad_images"] = True
    return build_config(args.preset, args.config, overrides)


def _run_pretrain(args: argparse.Namespace) -> None:
    from dsmae.engine import pretrain
    from dsmae.evaluation.linprobe import linprobe

    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    result = pretrain(cfg, resume=args.resume, force=args.force, overwrite=args.overwrite)
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

    changes = {
        "pool": args.pool,
        "recipe": args.recipe,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
    }
    result = linprobe(
        args.checkpoint,
        data=args.data,
        data_root=args.data_root,
        download=args.download or None,
        skip_bad_images=args.skip_bad_images or None,
        random_init=args.random_init,
        probe_overrides={k: v for k, v in changes.items() if v is not None},
        device=args.device,
        seed=args.seed,
    )
    label = "random-init encoder" if args.random_init else "pre-trained encoder"
    print(
        f"linear probe top-1 ({label}, last epoch of {result.epochs}): {result.top1:.2f}% "
        f"[{result.recipe} recipe]"
    )


def _run_finetune(args: argparse.Namespace) -> None:
    from dsmae.checkpoint import checkpoint_config, load_checkpoint
    from dsmae.config import override_config
    from dsmae.evaluation.finetune import finetune

    overrides = dict(parse_assignment(a) for a in args.assign)
    flags = {
        "data.source": args.data,
        "data.root": args.data_root,
        "data.download": args.download or None,
        "data.skip_bad_images": args.skip_bad_images or None,
        "finetune.epochs": args.epochs,
        "finetune.batch_size": args.batch_size,
        "train.device": args.device,
        "train.seed": args.seed,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    saved = checkpoint_config(load_checkpoint(args.checkpoint), args.checkpoint)
    cfg = override_config(saved, args.config, overrides)
    result = finetune(args.checkpoint, cfg, random_init=args.random_init, out=args.out)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    label = "random init (scratch)" if args.random_init else "pre-trained encoder"
    print(
        f"fine-tune top-1 ({label}, last epoch of {result.epochs}): {result.top1:.2f}% "
        f"(best epoch, for reference only: {result.best_top1:.2f}% at epoch {result.best_epoch})"
    )


def _run_experiment(args: argparse.Namespace) -> None:
    from dsmae.experiments import GridSettings, run_grid

    data = {}
    for item in args.data:
        name, sep, folder = item.partition("=")
        if not sep:
            raise ConfigError(f"--data {item!r} is not of the form DATASET=FOLDER")
        data[name] = folder
    settings = GridSettings(
        datasets=args.datasets,
        archs=args.archs,
        epochs=args.epochs,
        subset=args.subset,
        finetune_epochs=args.finetune_epochs,
        probe_epochs=args.probe_epochs,
        data=data,
        overrides=dict(parse_assignment(a) for a in args.assign),
        device=args.device,
    )
    table = run_grid(args.name, settings, args.results)
    print(table.read_text(), end="")
    print(f"table: {table} (and {table.with_suffix('.csv')})")


def _run_knn(args: argparse.Namespace) -> None:
    from dsmae.evaluation.knn import knn_eval

    result = knn_eval(
        args.checkpoint,
        k=args.k,
        temperature=args.temperature,
        pool=args.pool,
        data=args.data,
        data_root=args.data_root,
        download=args.download or None,
        skip_bad_images=args.skip_bad_images or None,
        random_init=args.random_init,
        device=args.device,
        seed=args.seed,
    )
    label = "random-init encoder" if args.random_init else "pre-trained encoder"
    print(f"k-NN top-1 ({label}, k={result.k}, {result.pool}): {result.top1:.2f}%")


def _run_export(args: argparse.Namespace) -> None:
    from dsmae.export import export_encoder

    out = export_encoder(args.checkpoint, args.out, teacher=args.teacher, overwrite=args.overwrite)
    print(f"encoder written to {out}: model.safetensors, config.json")


def _run_features(args: argparse.Namespace) -> None:
    from dsmae.evaluation.frozen import folder_features

    feats, names = folder_features(
        args.checkpoint,
        args.data,
        args.out,
        pool=args.pool,
        teacher=args.teacher,
        skip_bad_images=args.skip_bad_images,
        device=args.device,
        batch_size=args.batch_size,
    )
    print(f"features: {feats}; their image files, in order: {names}")


def _run_denoise(args: argparse.Namespace) -> None:
    from dsmae.visualize import denoise_files

    report = denoise_files(
        args.checkpoint, args.images, args.out, seed=args.seed, device=args.device
    )
    print(
        f"{report.figure}: {report.images} image(s); PSNR on the corrupted patches: input "
        f"{report.psnr_input:.2f} dB, reconstruction {report.psnr_output:.2f} dB"
    )


def _run_plot(args: argparse.Namespace) -> None:
    from dsmae.plots import plot_run

    print(f"curves: {plot_run(args.run_dir, args.out)}")


def _run_bench(args: argparse.Namespace) -> None:
    from dsmae.bench import format_report, run_bench, to_json

    overrides = dict(parse_assignment(a) for a in args.assign)
    if args.micro_batch is not None:
        overrides["train.micro_batch"] = args.micro_batch
    if args.compile is not None:
        overrides["train.compile"] = args.compile
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
        parts_time=args.parts,
    )
    print(to_json(result) if args.json else format_report(result))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsmae", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_linprobe(sub)
    _add_finetune(sub)
    _add_knn(sub)
    _add_experiment(sub)
    _add_denoise(sub)
    _add_plot(sub)
    _add_export(sub)
    _add_features(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    keep_freed_memory()
    return _run_command(args)


# What a user can cause (bad input, a full disk, a folder in use), reported in one line.
USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    DivergedError,
    FileNotFoundError,
    WriteError,
)


def _run_command(args: argparse.Namespace) -> int:
    """Run the subcommand; every error a user can cause is one line on stderr and exit
    status 2, a stop on a signal is exit status 75 (after its checkpoint), Ctrl-C
    elsewhere is 130. Anything else is a bug: its traceback, under a line that says so."""
    prefix = f"dsmae {args.command}"
    try:
        args.run(args)
    except Preempted as stop:
        print(f"{prefix}: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT
    except USER_ERRORS as err:
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        print(
            f"{prefix}: internal error, a bug in dsmae: please report it as an issue of the "
            "project, with the command and the traceback below",
            file=sys.stderr,
        )
        raise
    return 0
