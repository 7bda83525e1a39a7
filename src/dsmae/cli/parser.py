"""The subcommands of ``dsmae``: each ``add_*`` declares one's flags (the shared ones
from :mod:`dsmae.cli.flags`) and the function that runs it (:mod:`dsmae.cli.commands`)."""

from __future__ import annotations

import argparse
from typing import Any

from dsmae.cli import commands
from dsmae.cli.flags import (
    BENCH_KEYS,
    CHECKPOINT_FLAG,
    CONFIG_RUN,
    DATA_KEYS,
    FEATURES_KEYS,
    FINETUNE_KEYS,
    KNN_KEYS,
    LINPROBE_KEYS,
    POOL_FLAG,
    PRETRAIN_FLAG_OPTIONS,
    PRETRAIN_FLAGS,
    PRETRAIN_KEYS,
    RANDOM_INIT_FLAG,
    RUN_KEYS,
    SKIP_BAD_IMAGES_FLAG,
    Flag,
    add_config_flag,
    add_flags,
    add_set_flag,
    data_flags,
    device_flag,
    parent,
    seed_flag,
    spoken_list,
)
from dsmae.config import (
    ARCHS,
    METHODS,
    POOLS,
    PROBE_RECIPES,
    MonitorConfig,
    available_presets,
)

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
        parents=[parent(*data_flags("the preset's"), *CONFIG_RUN)],
    )
    p.add_argument(
        "--preset", help=f"start from a shipped preset: {', '.join(available_presets())}"
    )
    add_config_flag(p, "YAML file of config values, applied after the preset (repeatable)")
    add_set_flag(p, "any config value, e.g. train.warmup_epochs=5 (repeatable)")
    for flag, (key, kind) in PRETRAIN_FLAGS.items():
        options = {"help": f"sets {key}", **PRETRAIN_FLAG_OPTIONS.get(flag, {})}
        p.add_argument(flag, type=kind, **options)
    add_flags(p, *PRETRAIN_START_FLAGS)
    p.set_defaults(run=commands.run_pretrain, keys={**PRETRAIN_KEYS, **DATA_KEYS, **RUN_KEYS})


def _frozen_protocol_parents() -> list[argparse.ArgumentParser]:
    """The flags of the protocols on frozen features (linprobe, knn)."""
    data = data_flags("the pre-training data")
    run = (RANDOM_INIT_FLAG, POOL_FLAG, device_flag("auto"), seed_flag(0))
    return [parent(CHECKPOINT_FLAG, *data, *run)]


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
        choices=PROBE_RECIPES,
        help="fast: SGD on features computed once; mae: MAE's own recipe (LARS, the encoder "
        "run live on random-resized crops and flips every epoch); default: the checkpoint's "
        "probe.recipe (fast unless set)",
    )
    p.set_defaults(run=commands.run_linprobe, keys={**DATA_KEYS, **RUN_KEYS, **LINPROBE_KEYS})


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint's encoder fully (MAE's recipe); --random-init",
        parents=[parent(CHECKPOINT_FLAG, *data_flags("the pre-training data"), *CONFIG_RUN)],
    )
    p.add_argument(
        "--random-init", action="store_true", help="the same recipe from random init (scratch)"
    )
    add_config_flag(
        p, "YAML file of finetune/data/train values on top of the checkpoint's (repeatable)"
    )
    add_set_flag(p, "any finetune/data/train value, e.g. finetune.layer_decay=0.65")
    p.add_argument("--epochs", type=int, help="sets finetune.epochs")
    p.add_argument("--batch-size", type=int, help="sets finetune.batch_size")
    p.add_argument("--out", help="folder for metrics.jsonl and TensorBoard (default: none)")
    p.set_defaults(run=commands.run_finetune, keys={**DATA_KEYS, **RUN_KEYS, **FINETUNE_KEYS})


# how a grid chooses: on a validation split, over seeds, in worker processes
SELECTION_FLAGS: tuple[Flag, ...] = (
    ("--vary", {"action": "append", "default": [], "metavar": "KEY=V1,V2,...",
                "help": "a config key and its values (repeatable): every combination is a "
                        "cell"}),
    ("--select", {"metavar": "KEY",
                  "help": "a --vary key to choose for each combination of the others: the "
                          "value with the best validation k-NN on seed 0, then run on every "
                          "seed"}),
    ("--seeds", {"type": int, "default": 1, "help": "seeds 0..N-1 of each reported cell (1)"}),
    ("--workers", {"type": int, "default": 1,
                   "help": "cells side by side, a process each (CPU: the cores shared; GPUs: "
                           "one each); default 1"}),
    ("--val-fraction", {"type": float, "default": 0.1,
                        "help": "share of each class of the train split held out to choose "
                                "by (0.1)"}),
    ("--split-seed", {"type": int, "default": 0, "help": "seed of the validation split (0)"}),
    ("--bank", {"type": int, "metavar": "N",
                "help": "at most N labelled train images as k-NN bank and probe training "
                        "set (default: all but the validation images)"}),
    ("--plot", {"action": "store_true", "help": "also draw the test figures as NAME.png"}),
)  # fmt: skip
RESULTS_FLAG: Flag = (
    "--results", {"default": "results", "help": "where tables and runs go (results)"}
)  # fmt: skip


def _add_experiment(sub: Any) -> None:
    from dsmae.experiments import DATASETS, GRIDS

    p = sub.add_parser(
        "experiment",
        help="a grid of the paper, or your own tuned on a validation split (resumable)",
    )
    grids = p.add_subparsers(dest="name", required=True, metavar="GRID")
    paper = parent(
        ("--datasets", {"nargs": "+", "help": f"subset of {' '.join(DATASETS)}"}),
        ("--archs", {"nargs": "+", "help": f"subset of {' '.join(ARCHS)}"}),
        ("--epochs", {"type": int, "help": "pre-training epochs of every cell"}),
        ("--subset", {"type": int, "help": "pre-training images of every cell"}),
        ("--finetune-epochs", {"type": int}),
        ("--probe-epochs", {"type": int}),
        ("--data", {"action": "append", "default": [], "metavar": "DATASET=FOLDER",
                    "help": "read a data set from an image folder, e.g. cifar10=/data/cifar10 "
                            "(repeatable)"}),
        RESULTS_FLAG, device_flag(None),
    )  # fmt: skip
    sweeps = {"noise-ratio": "model.noise_ratio (Fig. 3)", "lambda": "model.lam (Fig. 4)"}
    for name in GRIDS:
        tuned = name in sweeps
        g = grids.add_parser(
            name,
            help=f"the paper's {name} grid" + (f": {sweeps[name]}" if tuned else ""),
            parents=[paper, *([parent(*SELECTION_FLAGS)] if tuned else [])],
            description=(
                f"The paper's {name} grid. With --select (and the --vary values it chooses "
                "among), each value of the sweep is tuned on a validation split and read by "
                "k-NN and the linear probe over --seeds seeds, as dsmae experiment grid does."
                if tuned
                else None
            ),
        )
        add_set_flag(g, "any config value for every cell, e.g. model.patch_size=4")
        g.set_defaults(run=commands.run_experiment)
    _add_grid(grids)


def _add_grid(grids: Any) -> None:
    g = grids.add_parser(
        "grid",
        help="your own grid: every combination of --vary values, each choice made on a "
        "validation split, test figures as mean +- std over seeds",
        parents=[
            parent(*data_flags("the preset's"), device_flag(None), *SELECTION_FLAGS, RESULTS_FLAG)
        ],
    )
    g.add_argument("--preset", help=f"every cell starts from it: {', '.join(available_presets())}")
    add_config_flag(g, "YAML file of config values for every cell (repeatable)")
    add_set_flag(g, "any config value for every cell, e.g. train.epochs=20 (repeatable)")
    g.add_argument("--epochs", type=int, help="sets train.epochs")
    g.add_argument("--subset", type=int, help="sets data.subset: pre-training images")
    g.add_argument("--name", default="grid", help="the table's name: NAME.md, .json, .png (grid)")
    g.set_defaults(
        run=commands.run_user_grid,
        keys={
            **DATA_KEYS,
            "device": "train.device",
            "epochs": "train.epochs",
            "subset": "data.subset",
        },
    )


def _add_knn(sub: Any) -> None:
    p = sub.add_parser(
        "knn",
        help="k-NN top-1 (cosine, temperature-weighted) on frozen features",
        parents=_frozen_protocol_parents(),
    )
    p.add_argument(
        "--k",
        type=int,
        help="neighbours (default: the checkpoint's monitor.knn_k, "
        f"{MonitorConfig.knn_k} unless set)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        help="vote temperature (default: the checkpoint's monitor.knn_temperature, "
        f"{MonitorConfig.knn_temperature} unless set)",
    )
    p.set_defaults(run=commands.run_knn, keys={**DATA_KEYS, **RUN_KEYS, **KNN_KEYS})


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write the encoder in timm's Hub layout (model.safetensors + config.json), "
        "optionally as ONNX too, and push it to the Hugging Face Hub",
        parents=[parent(CHECKPOINT_FLAG, POOL_FLAG)],
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
    p.set_defaults(run=commands.run_export)


def _add_features(sub: Any) -> None:
    p = sub.add_parser(
        "features",
        help="embeddings of every image of a folder, as .npy",
        parents=[parent(CHECKPOINT_FLAG, SKIP_BAD_IMAGES_FLAG, device_flag("auto"))],
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
    p.set_defaults(run=commands.run_features, keys=FEATURES_KEYS)


def _add_denoise(sub: Any) -> None:
    p = sub.add_parser(
        "denoise",
        help="noisy / denoised / original figure for any images",
        parents=[parent(CHECKPOINT_FLAG, device_flag("auto"), seed_flag(0))],
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", default="denoise.png", help="the PNG to write (denoise.png)")
    p.set_defaults(run=commands.run_denoise)


def _add_plot(sub: Any) -> None:
    p = sub.add_parser("plot", help="pre-training curves of a run folder as PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of dsmae pretrain")
    p.add_argument("--out", help="the PNG to write (default RUN_DIR/curves.png)")
    p.set_defaults(run=commands.run_plot)


def _add_shards(sub: Any) -> None:
    p = sub.add_parser(
        "shards",
        help="write an image folder as WebDataset shards, to stream with --data",
        parents=[parent(seed_flag(0))],
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
    p.set_defaults(run=commands.run_shards)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time one pre-training step on a synthetic batch: img/s, memory, FLOPs, MFU",
        parents=[parent(device_flag("auto"), seed_flag(0))],
    )
    p.add_argument("--method", required=True, help=spoken_list(METHODS))
    p.add_argument("--arch", required=True, help=spoken_list(tuple(ARCHS)))
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
    add_set_flag(p, "any other config value, e.g. model.decoder_depth=2 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=commands.run_bench, keys=BENCH_KEYS)


# every subcommand, in the order of dsmae --help
SUBCOMMANDS = (_add_pretrain, _add_linprobe, _add_finetune, _add_knn, _add_experiment,
               _add_denoise, _add_plot, _add_export, _add_features, _add_bench,
               _add_shards)  # fmt: skip
