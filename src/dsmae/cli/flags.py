"""The command line's flags: which config key each sets (one table per command, read
by :func:`config_changes`), and the flags several commands share, each declared once
(parent parsers of them: :func:`parent`)."""

from __future__ import annotations

import argparse
from typing import Any

from dsmae.config import POOLS, parse_assignment

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
# the k-NN vote (monitor.knn_k, monitor.knn_temperature) and pooling: the checkpoint's
# unless a flag is given
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

# The flags several commands share, each declared once; parent() makes parsers of them.
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
    "help": "avg: mean of the patch tokens (what DSMAE trains); cls: the [CLS] token "
    "(default: avg; for linprobe and knn, the checkpoint's probe.pool, avg unless set)",
})  # fmt: skip


def _data_flag(default: str) -> Flag:
    """--data; ``default``: what it is when not given."""
    return ("--data", {"help": f"data set or image folder (default: {default})"})


def device_flag(default: str | None) -> Flag:
    """--device; ``default`` None: the config's train.device."""
    choice = default or "the config's train.device"
    help = f"cpu, cuda[:N], mps or auto (default: {choice})"
    return ("--device", {"default": default, "help": help})


def seed_flag(default: int | None) -> Flag:
    """--seed; ``default`` None: the config's train.seed."""
    choice = "the config's train.seed" if default is None else default
    return ("--seed", {"type": int, "default": default, "help": f"random seed (default: {choice})"})


# --device and --seed of the commands with a config: the config's unless given
CONFIG_RUN = (device_flag(None), seed_flag(None))


def data_flags(default: str) -> list[Flag]:
    """The data flags; ``default``: what --data is when not given."""
    return [_data_flag(default), DATA_ROOT_FLAG, DOWNLOAD_FLAG, SKIP_BAD_IMAGES_FLAG]


def add_flags(p: argparse.ArgumentParser, *flags: Flag) -> None:
    """Add ``flags`` to the parser ``p``."""
    for name, options in flags:
        p.add_argument(name, **options)


def parent(*flags: Flag) -> argparse.ArgumentParser:
    """A parent parser (for ``parents=``) holding ``flags``."""
    p = argparse.ArgumentParser(add_help=False)
    add_flags(p, *flags)
    return p


def add_set_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): any config value, collected in ``args.assign``."""
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="assign", help=help
    )


def add_config_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--config FILE`` (repeatable): YAML files of config values."""
    p.add_argument("--config", action="append", default=[], metavar="FILE", help=help)


def spoken_list(values: tuple[str, ...]) -> str:
    """A help text's list of ``values``: ``("a", "b", "c")`` -> ``"a, b or c"``."""
    *rest, last = values
    return f"{', '.join(rest)} or {last}" if rest else last
