"""The command line: ``snapshot``, ``compare`` and ``resume``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .comparison import compare
from .record import snapshot
from .resumption import resume


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    package = sys.modules[__package__].__doc__ or ""
    parser = argparse.ArgumentParser(description=package.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shot = commands.add_parser("snapshot", help="run every command, write OUT/behaviour.json")
    shot.add_argument("--src", type=Path, required=True, help="the source tree (its src/)")
    shot.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    again = commands.add_parser("resume", help="resume the checkpoints a snapshot kept")
    again.add_argument("--src", type=Path, required=True, help="the source tree (its src/)")
    again.add_argument("--old", type=Path, required=True, help="the snapshot folder")
    again.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    both = commands.add_parser("compare", help="every difference of two snapshots")
    both.add_argument("before", type=Path, help="a snapshot folder or its behaviour.json")
    both.add_argument("after", type=Path, help="a snapshot folder or its behaviour.json")
    both.add_argument("--allow", action="append", default=[], metavar="PREFIX",
                      help="a key path prefix whose differences are expected "
                           "(repeatable), e.g. steps/print-config/quickstart")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "snapshot":
        return snapshot(args.src, args.out)
    if args.command == "resume":
        return resume(args.src, args.old, args.out)
    return compare(args.before, args.after, args.allow)
