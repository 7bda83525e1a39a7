"""The dsmae command: pre-train (pretrain), evaluate (linprobe, knn), look (denoise, plot),
take the encoder away (export, features), measure (bench) and write shards (shards).

Common options are flags; any other config value is reachable with --set
section.key=value or a YAML file (--config), on top of a --preset.

Every flag that sets a config value does so one way: each command's table maps the flag
(its argparse destination) to a dotted config key, and :func:`config_changes` collects the
ones given, on top of the command's --set values. The flags several commands share are
declared once, in parent parsers. Nothing here imports torch before the arguments are
parsed (the commands import what they run), so ``dsmae --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dsmae.config import POOLS, ConfigError, available_presets, build_config, parse_assignment
from dsmae.preemption import PREEMPTED_EXIT, CommandSignals, Preempted, Stopped
from dsmae.writes import WriteError

log = logging.getLogger("dsmae")

# ------------------------------------------------------------------ flags -> config keys

# flag -> (config key, type) of the flags only pretrain has; each sets its key
PRETRAIN_FLAGS: dict[str, tuple[str, type]] = {
    "--method": ("model.method", str),
    "--arch": ("model.arch", str),
    "--img-size": ("model.img_size", int),
    "--patch-size": ("model.patch_size", int),
    "--in-chans": ("model.in_chans", int),
    "--epochs": ("train.epochs", int),
    "--batch-size": ("train.batch_size", int),
    "--micro-batch": ("train.micro_batch", int),
    "--noise-ratio": ("model.noise_ratio", float),
    "--lam": ("model.lam", float),
    "--out": ("out", str),
    "--time-budget": ("train.time_budget", str),
}
# ... where a flag says more than the key it sets
PRETRAIN_FLAG_OPTIONS: dict[str, dict[str, str]] = {
    "--time-budget": {
        "metavar": "DURATION",
        "help": "sets train.time_budget: a wall-clock budget such as 90s, 10m or 2h; "
        "train.epochs becomes the most that fit (at most --epochs), their schedules ending "
        "on time",
    },
}
# argparse destination -> config key, of the shared flags (parent parsers below)
DATA_KEYS = {
    "data": "data.source",
    "data_root": "data.root",
    "download": "data.download",
    "skip_bad_images": "data.skip_bad_images",
}
RUN_KEYS = {"device": "train.device", "seed": "train.seed"}
# ... and of each command's own flags
PRETRAIN_KEYS = {flag[2:].replace("-", "_"): key for flag, (key, _) in PRETRAIN_FLAGS.items()}
LINPROBE_KEYS = {
    "pool": "probe.pool",
    "recipe": "probe.recipe",
    "epochs": "probe.epochs",
    "batch_size": "probe.batch_size",
}
KNN_KEYS = {"pool": "probe.pool", "k": "monitor.knn_k", "temperature": "monitor.knn_temperature"}
FINETUNE_KEYS = {"epochs": "finetune.epochs", "batch_size": "finetune.batch_size"}
# ... and of the arguments that are no config key but a parameter of the function a
# command calls (named by its errors)
FEATURES_KEYS = {"batch_size": "batch_size"}
BENCH_KEYS = {
    "micro_batch": "train.micro_batch",
    "compile": "train.compile",
    "depth": "model.depth",
    "embed_dim": "model.embed_dim",
    "num_heads": "model.num_heads",
}


def config_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The config values a command's arguments set, as dotted keys: its ``--set``
    assignments, then every flag of its table (``args.keys``) that was given."""
    changes = dict(parse_assignment(a) for a in getattr(args, "assign", ()))
    given = {key: getattr(args, dest) for dest, key in args.keys.items()}
    changes.update({key: value for key, value in given.items() if value is not None})
    return changes


# ------------------------------------------------------------------ shared flags


Flag = tuple[str, dict[str, Any]]  # a flag's name and its add_argument options

# The flags several commands share, each declared once; _parent() makes parsers of them.
CHECKPOINT_FLAG: Flag = (
    "--checkpoint", {"required": True, "help": "a checkpoint written by dsmae pretrain"}
)  # fmt: skip
SKIP_BAD_IMAGES_FLAG: Flag = ("--skip-bad-images", {
    "action": "store_true", "default": None,
    "help": "skip (and count) image files that cannot be read instead of stopping",
})  # fmt: skip
DATA_ROOT_FLAG: Flag = ("--data-root", {"help": "where torchvision data sets live"})
DOWNLOAD_FLAG: Flag = ("--download", {
    "action": "store_true", "default": None, "help": "download a torchvision data set"
})  # fmt: skip
RANDOM_INIT_FLAG: Flag = ("--random-init", {
    "action": "store_true",
    "help": "evaluate the same architecture at random initialisation (baseline)",
})  # fmt: skip
POOL_FLAG: Flag = ("--pool", {
    "choices": POOLS,
    "help": "avg: mean of the patch tokens (default, what DSMAE trains); cls: the [CLS] token",
})  # fmt: skip


def _data_flag(default: str) -> Flag:
    """--data; ``default``: what it is when not given."""
    return ("--data", {"help": f"data set or image folder (default: {default})"})


def _device_flag(default: str | None) -> Flag:
    """--device; ``default`` None: the config's train.device."""
    choice = default or "the config's train.device"
    help = f"cpu, cuda[:N], mps or auto (default: {choice})"
    return ("--device", {"default": default, "help": help})


def _seed_flag(default: int | None) -> Flag:
    """--seed; ``default`` None: the config's train.seed."""
    choice = "the config's train.seed" if default is None else default
    return ("--seed", {"type": int, "default": default, "help": f"random seed (default: {choice})"})


# --device and --seed of the commands with a config: the config's unless given
CONFIG_RUN = (_device_flag(None), _seed_flag(None))


def _data_flags(default: str) -> list[Flag]:
    """The data flags; ``default``: what --data is when not given."""
    return [_data_flag(default), DATA_ROOT_FLAG, DOWNLOAD_FLAG, SKIP_BAD_IMAGES_FLAG]


def _add_flags(p: argparse.ArgumentParser, *flags: Flag) -> None:
    for name, options in flags:
        p.add_argument(name, **options)


def _parent(*flags: Flag) -> argparse.ArgumentParser:
    """A parent parser (for ``parents=``) holding ``flags``."""
    p = argparse.ArgumentParser(add_help=False)
    _add_flags(p, *flags)
    return p


def _add_set_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): any config value, collected in ``args.assign``."""
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="assign", help=help
    )


def _add_config_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--config FILE`` (repeatable): YAML files of config values."""
    p.add_argument("--config", action="append", default=[], metavar="FILE", help=help)


# ------------------------------------------------------------------ commands


# how a pre-training starts (or only shows its config)
PRETRAIN_START_FLAGS: tuple[Flag, ...] = (
    ("--resume", {"metavar": "CHECKPOINT|auto",
                  "help": "continue from a checkpoint; auto: the newest one in --out (none: "
                          "start afresh)"}),
    ("--force", {"action": "store_true",
                 "help": "resume from a checkpoint made with other settings"}),
    ("--overwrite", {"action": "store_true",
                     "help": "start a fresh run in an --out folder that holds another run"}),
    ("--print-config", {"action": "store_true",
                        "help": "print the resolved config as YAML and exit"}),
)  # fmt: skip


def _add_pretrain(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train an encoder (DSMAE, its ablations or MAE)",
        parents=[_parent(*_data_flags("the preset's"), *CONFIG_RUN)],
    )
    p.add_argument(
        "--preset", help=f"start from a shipped preset: {', '.join(available_presets())}"
    )
    _add_config_flag(p, "YAML file of config values, applied after the preset (repeatable)")
    _add_set_flag(p, "any config value, e.g. train.warmup_epochs=5 (repeatable)")
    for flag, (key, kind) in PRETRAIN_FLAGS.items():
        options = {"help": f"sets {key}", **PRETRAIN_FLAG_OPTIONS.get(flag, {})}
        p.add_argument(flag, type=kind, **options)
    _add_flags(p, *PRETRAIN_START_FLAGS)
    p.set_defaults(run=_run_pretrain, keys={**PRETRAIN_KEYS, **DATA_KEYS, **RUN_KEYS})


def _frozen_protocol_parents() -> list[argparse.ArgumentParser]:
    """The flags of the protocols on frozen features (linprobe, knn)."""
    data = _data_flags("the pre-training data")
    run = (RANDOM_INIT_FLAG, POOL_FLAG, _device_flag("auto"), _seed_flag(0))
    return [_parent(CHECKPOINT_FLAG, *data, *run)]


def _add_linprobe(sub: Any) -> None:
    p = sub.add_parser(
        "linprobe",
        help="linear-probe top-1 of a checkpoint's frozen encoder",
        parents=_frozen_protocol_parents(),
    )
    p.add_argument("--epochs", type=int, help="probe epochs")
    p.add_argument("--batch-size", type=int, help="probe batch size")
    p.add_argument(
        "--recipe",
        choices=("fast", "mae"),
        help="fast: SGD on features computed once; mae: MAE's own recipe (LARS, the encoder "
        "run live on random-resized crops and flips every epoch); default: the checkpoint's "
        "probe.recipe (fast unless set)",
    )
    p.set_defaults(run=_run_linprobe, keys={**DATA_KEYS, **RUN_KEYS, **LINPROBE_KEYS})


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint's encoder fully (MAE's recipe); --random-init",
        parents=[_parent(CHECKPOINT_FLAG, *_data_flags("the pre-training data"), *CONFIG_RUN)],
    )
    p.add_argument(
        "--random-init", action="store_true", help="the same recipe from random init (scratch)"
    )
    _add_config_flag(
        p, "YAML file of finetune/data/train values on top of the checkpoint's (repeatable)"
    )
    _add_set_flag(p, "any finetune/data/train value, e.g. finetune.layer_decay=0.65")
    p.add_argument("--epochs", type=int, help="sets finetune.epochs")
    p.add_argument("--batch-size", type=int, help="sets finetune.batch_size")
    p.add_argument("--out", help="folder for metrics.jsonl and TensorBoard (default: none)")
    p.set_defaults(run=_run_finetune, keys={**DATA_KEYS, **RUN_KEYS, **FINETUNE_KEYS})


def _add_experiment(sub: Any) -> None:
    from dsmae.experiments import GRIDS

    p = sub.add_parser(
        "experiment",
        help="run a grid of the paper (resumable) and write its table",
        parents=[_parent(_device_flag(None))],
    )
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
    p.add_argument("--results", default="results", help="where tables and runs go (results)")
    p.set_defaults(run=_run_experiment)


def _add_knn(sub: Any) -> None:
    p = sub.add_parser(
        "knn",
        help="k-NN top-1 (cosine, temperature-weighted) on frozen features",
        parents=_frozen_protocol_parents(),
    )
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (0.07)")
    p.set_defaults(run=_run_knn, keys={**DATA_KEYS, **RUN_KEYS, **KNN_KEYS})


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write the encoder in timm's Hub layout (model.safetensors + config.json), "
        "optionally as ONNX too, and push it to the Hugging Face Hub",
        parents=[_parent(CHECKPOINT_FLAG, POOL_FLAG)],
    )
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--teacher", action="store_true", help="export the EMA teacher instead")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the files of a non-empty --out folder"
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write encoder.onnx: normalised images -> pooled features, any batch size "
        '(needs pip install "dsmae[onnx]")',
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="then upload the export to this Hugging Face Hub model repo (USER/NAME; created "
        'if need be): timm.create_model("hf-hub:USER/NAME", pretrained=True) loads it',
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.set_defaults(run=_run_export)


def _add_features(sub: Any) -> None:
    p = sub.add_parser(
        "features",
        help="embeddings of every image of a folder, as .npy",
        parents=[_parent(CHECKPOINT_FLAG, SKIP_BAD_IMAGES_FLAG, _device_flag("auto"))],
    )
    p.add_argument("--data", required=True, help="a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="the .npy file (file names: OUT.files.txt)")
    p.add_argument(
        "--pool", choices=POOLS, help="avg (mean of the patch tokens, default) or cls ([CLS])"
    )
    p.add_argument("--teacher", action="store_true", help="use the EMA teacher")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (never an input)"
    )
    p.set_defaults(run=_run_features, keys=FEATURES_KEYS)


def _add_denoise(sub: Any) -> None:
    p = sub.add_parser(
        "denoise",
        help="noisy / denoised / original figure for any images",
        parents=[_parent(CHECKPOINT_FLAG, _device_flag("auto"), _seed_flag(0))],
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", default="denoise.png", help="the PNG to write (denoise.png)")
    p.set_defaults(run=_run_denoise)


def _add_plot(sub: Any) -> None:
    p = sub.add_parser("plot", help="pre-training curves of a run folder as PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of dsmae pretrain")
    p.add_argument("--out", help="the PNG to write (default RUN_DIR/curves.png)")
    p.set_defaults(run=_run_plot)


def _add_shards(sub: Any) -> None:
    p = sub.add_parser(
        "shards",
        help="write an image folder as WebDataset shards, to stream with --data",
        parents=[_parent(_seed_flag(0))],
    )
    p.add_argument(
        "folder",
        metavar="FOLDER",
        help="the images --data FOLDER pre-trains on (train/ where it has one); class "
        "sub-folders give labels",
    )
    p.add_argument("out", metavar="OUT", help="folder for shard-000000.tar, shard-000001.tar, ...")
    p.add_argument("--shard-size", type=int, required=True, metavar="N", help="images per shard")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the shards an OUT folder holds already"
    )
    p.set_defaults(run=_run_shards)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time one pre-training step on a synthetic batch: img/s, memory, FLOPs, MFU",
        parents=[_parent(_device_flag("auto"), _seed_flag(0))],
    )
    p.add_argument("--method", required=True, help="dsmae, dsmae-ly, dsmae-lz or mae")
    p.add_argument("--arch", required=True, help="vit_tiny, vit_small or vit_base")
    p.add_argument("--img-size", type=int, required=True)
    p.add_argument("--patch-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
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
    p.add_argument(
        "--profile",
        metavar="TRACE.json",
        help="also profile a few steps: their trace (chrome://tracing, Perfetto) to this file, "
        "the operators the time goes to in the report",
    )
    p.add_argument("--depth", type=int, help="encoder depth (default: from --arch)")
    p.add_argument("--embed-dim", type=int, help="encoder width (default: from --arch)")
    p.add_argument("--num-heads", type=int, help="encoder heads (default: from --arch)")
    _add_set_flag(p, "any other config value, e.g. model.decoder_depth=2 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=_run_bench, keys=BENCH_KEYS)


# ------------------------------------------------------------------ running them


def _run_pretrain(args: argparse.Namespace) -> None:
    from dsmae.engine import pretrain

    cfg = build_config(args.preset, args.config, config_changes(args))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    result = pretrain(cfg, resume=args.resume, force=args.force, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    done = f"after pre-training finished: {result.checkpoint} is complete"
    probe = f"dsmae linprobe --checkpoint {shlex.quote(str(result.checkpoint))}"
    unprobed = (
        f"{done}; its linear probe did not run: {probe}" if cfg.probe.after_pretrain else done
    )
    with _kept_when_stopped(unprobed):
        if result.stop_requested is not None:
            raise Stopped(result.stop_requested)
        print(f"checkpoint: {result.checkpoint}")
        figure = result.out / "denoise.png"
        if figure.exists():
            print(f"denoising figure (noisy / denoised / original): {figure}")
    if cfg.probe.after_pretrain:
        with _kept_when_stopped(f"{done}; its linear probe did not finish: {probe}"):
            device_and_seed = {"train.device": cfg.train.device, "train.seed": cfg.train.seed}
            _probe_after_pretrain(result.checkpoint, device_and_seed, cfg.probe.random_baseline)
        done += " and probed"
    with _kept_when_stopped(done):
        print(f"pre-training took {result.seconds:.0f} s")


@contextlib.contextmanager
def _kept_when_stopped(kept: str) -> Iterator[None]:
    """A stop signal in the body is reported as stopping ``kept`` ("after ...")."""
    try:
        yield
    except Stopped as stop:
        raise Stopped(stop.signal_name, kept) from None


def _probe_after_pretrain(path: Path, changes: Mapping[str, Any], random_baseline: bool) -> None:
    """The linear probe of a fresh checkpoint (read once) by its own probe settings, with
    ``changes``; with ``random_baseline`` also of its architecture at random init."""
    from dsmae.checkpoint import Checkpoint
    from dsmae.evaluation.linprobe import linprobe
    from dsmae.evaluation.results import evaluation_config

    checkpoint = Checkpoint.read(path)
    cfg = evaluation_config(checkpoint.config, changes)
    trained = linprobe(checkpoint, cfg)
    print(f"linear probe top-1, pre-trained encoder: {trained.top1:.2f}%")
    _print_unsaved(trained)
    if random_baseline:
        baseline = linprobe(checkpoint, cfg, random_init=True)
        print(f"linear probe top-1, same encoder at random init: {baseline.top1:.2f}%")
        _print_unsaved(baseline)


def _print_unsaved(result: Any) -> None:
    """All of an evaluation's result (an ``EvalResult``) on stdout where its file could
    not be written: nothing is lost."""
    if result.saved is None:
        print(f"result (not saved to {result.path}): {result.to_json()}")


def _frozen_protocol(args: argparse.Namespace, protocol: Any) -> Any:
    """Run ``protocol`` (linprobe or knn_eval) on --checkpoint, read once, with the
    command's flags set on its config (as given: not validated)."""
    from dsmae.checkpoint import Checkpoint
    from dsmae.evaluation.results import evaluation_config

    checkpoint = Checkpoint.read(args.checkpoint)
    cfg = evaluation_config(checkpoint.config, config_changes(args))
    return protocol(checkpoint, cfg, random_init=args.random_init)


def _encoder_label(args: argparse.Namespace) -> str:
    return "random-init encoder" if args.random_init else "pre-trained encoder"


def _run_linprobe(args: argparse.Namespace) -> None:
    from dsmae.evaluation.linprobe import linprobe

    result = _frozen_protocol(args, linprobe)
    print(
        f"linear probe top-1 ({_encoder_label(args)}, last epoch of {result.epochs}): "
        f"{result.top1:.2f}% [{result.recipe} recipe]"
    )
    _print_unsaved(result)


def _run_knn(args: argparse.Namespace) -> None:
    from dsmae.evaluation.knn import knn_eval

    result = _frozen_protocol(args, knn_eval)
    print(f"k-NN top-1 ({_encoder_label(args)}, k={result.k}, {result.pool}): {result.top1:.2f}%")
    _print_unsaved(result)


def _run_finetune(args: argparse.Namespace) -> None:
    from dsmae.checkpoint import Checkpoint
    from dsmae.config import override_config
    from dsmae.evaluation.finetune import finetune

    checkpoint = Checkpoint.read(args.checkpoint)
    cfg = override_config(checkpoint.config, args.config, config_changes(args))
    result = finetune(checkpoint, cfg, random_init=args.random_init, out=args.out)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    label = "random init (scratch)" if args.random_init else "pre-trained encoder"
    print(
        f"fine-tune top-1 ({label}, last epoch of {result.epochs}): {result.top1:.2f}% "
        f"(best epoch, for reference only: {result.best_top1:.2f}% at epoch {result.best_epoch})"
    )
    _print_unsaved(result)


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


def _run_export(args: argparse.Namespace) -> None:
    from dsmae.export import (
        CONFIG_FILE,
        ONNX_FILE,
        WEIGHTS_FILE,
        check_repo_id,
        export_encoder,
        push_to_hub,
    )

    if args.private and args.push_to_hub is None:
        raise ConfigError("--private makes the repo of --push-to-hub private: give both")
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)  # before any work
    out = export_encoder(
        args.checkpoint,
        args.out,
        teacher=args.teacher,
        pool=args.pool or "avg",
        onnx=args.onnx,
        overwrite=args.overwrite,
    )
    files = [WEIGHTS_FILE, CONFIG_FILE, *([ONNX_FILE] if args.onnx else [])]
    print(f"encoder written to {out}: {', '.join(files)}")
    if args.push_to_hub is not None:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f'pushed to {url}: timm.create_model("hf-hub:{args.push_to_hub}", pretrained=True)')


def _run_features(args: argparse.Namespace) -> None:
    from dsmae.checkpoint import Checkpoint
    from dsmae.features import folder_features

    feats, names = folder_features(
        Checkpoint.read(args.checkpoint),
        args.data,
        args.out,
        pool=args.pool,
        teacher=args.teacher,
        skip_bad_images=bool(args.skip_bad_images),
        device=args.device,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
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


def _run_shards(args: argparse.Namespace) -> None:
    from dsmae.data.shard_writer import write_shards

    written = write_shards(
        args.folder, args.out, args.shard_size, seed=args.seed, overwrite=args.overwrite
    )
    labels = f"{len(written.classes)} classes" if written.classes else "unlabelled"
    print(f"{written.images} images ({labels}) in {written.shards} shard(s): {written.pattern}")
    print(
        f"pre-train on them with: --data {shlex.quote(written.pattern)} "
        f"--set data.samples_per_epoch={written.images}"
    )


def _run_bench(args: argparse.Namespace) -> None:
    from dsmae.bench import format_report, run_bench, to_json

    shape = (args.method, args.arch, args.img_size, args.patch_size, args.batch_size)
    result = run_bench(
        *shape,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        in_chans=args.in_chans,
        seed=args.seed,
        overrides=config_changes(args),
        parts_time=args.parts,
        profile=args.profile,
    )
    print(to_json(result) if args.json else format_report(result))


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    """The ``dsmae`` parser: one subcommand a ``_run_*`` function (``args.run``)."""
    description = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="dsmae", description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_pretrain, _add_linprobe, _add_finetune, _add_knn, _add_experiment,
                _add_denoise, _add_plot, _add_export, _add_features, _add_bench,
                _add_shards):  # fmt: skip
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from dsmae.runtime import keep_freed_memory

    keep_freed_memory()
    with CommandSignals():
        return _run_command(args)


def user_errors() -> tuple[type[Exception], ...]:
    """What a user can cause (bad input, a full disk, a folder in use), reported in one
    line. Imported when needed: their modules import torch."""
    from dsmae.checkpoint import CheckpointError
    from dsmae.data.sources import DataError
    from dsmae.engine import DivergedError

    errors = (ConfigError, DataError, CheckpointError, DivergedError, FileNotFoundError)
    return (*errors, WriteError)


def _naming_the_flag(err: Exception, args: argparse.Namespace) -> str:
    """``err``'s message, followed by the flag that set the config key at fault (its
    ``key``), where a flag of the command did: ``probe.epochs: must be >= 1, got 0 (set
    by --epochs)``."""
    text, key = str(err), getattr(err, "key", None)
    for dest, mapped in getattr(args, "keys", {}).items():
        if key is not None and mapped == key and getattr(args, dest, None) is not None:
            return f"{text} (set by --{dest.replace('_', '-')})"
    return text


def _run_command(args: argparse.Namespace) -> int:
    """Run the subcommand; every error a user can cause is one line on stderr and exit
    status 2, a stop on a signal is exit status 75 (after its checkpoint), Ctrl-C
    elsewhere is 130. Anything else is a bug: its traceback, under a line that says so."""
    prefix = f"dsmae {args.command}"
    try:
        args.run(args)
    except (Preempted, Stopped) as stop:
        print(f"{prefix}: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT
    except user_errors() as err:
        print(f"{prefix}: error: {_naming_the_flag(err, args)}", file=sys.stderr)
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
