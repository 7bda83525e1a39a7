"""The dsmae command: pre-train (pretrain), evaluate (linprobe, knn), look (denoise, plot),
take the encoder away (export, features), measure (bench) and write shards (shards).

Common options are flags; any other config value is reachable with --set
section.key=value or a YAML file (--config), on top of a --preset.

Every flag that sets a config value does so one way: each command's table maps the flag
(its argparse destination) to a dotted config key, and
:func:`~dsmae.cli.flags.config_changes` collects the ones given, on top of the command's
--set values; :func:`~dsmae.config.build_config` builds every command's config from them.
The flags several commands share are declared once, in parent parsers
(:mod:`~dsmae.cli.flags`); each subcommand's parser is in :mod:`~dsmae.cli.parser`, what
it runs in :mod:`~dsmae.cli.commands`. Nothing here imports torch before the arguments are
parsed (the commands import what they run), so ``dsmae --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dsmae.cli.parser import SUBCOMMANDS
from dsmae.config import ConfigError
from dsmae.preemption import PREEMPTED_EXIT, CommandSignals, Preempted, Stopped
from dsmae.writes import WriteError

log = logging.getLogger("dsmae")


def build_parser() -> argparse.ArgumentParser:
    """The ``dsmae`` parser: each subcommand runs a function of
    :mod:`~dsmae.cli.commands` (``args.run``)."""
    description = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="dsmae", description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
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
    from dsmae.data.images import DataError
    from dsmae.pretrain import DivergedError

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
