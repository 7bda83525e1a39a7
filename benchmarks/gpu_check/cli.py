"""The command line: one stage a call."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .bench import stage_bench
from .env import stage_env
from .evaluate import stage_eval
from .plan import PRETRAIN_STAGES
from .pretraining import stage_equal_time, stage_pretrain
from .smoke import stage_smoke
from .summary import stage_summary


def main(argv: list[str] | None = None) -> int:
    package = sys.modules[__package__].__doc__ or ""
    parser = argparse.ArgumentParser(description=package.splitlines()[0])
    parser.add_argument(
        "stage", choices=("smoke", "env", "bench", *PRETRAIN_STAGES, "eval", "summary")
    )
    parser.add_argument("results", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=120.0, help="pre-training time")
    parser.add_argument("--rows", choices=("rates", "speed"), default="rates", help="bench rows")
    parser.add_argument("--budget", type=float, default=150.0, help="bench stage seconds")
    parser.add_argument("--only", help="bench: only these, e.g. mae-vit_tiny-eager,...")
    parser.add_argument("--data", help="the CIFAR-10 folder (train/ and test/)")
    parser.add_argument("--shrink", action="store_true", help="toy sizes (CPU test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.results.mkdir(parents=True, exist_ok=True)
    if args.stage in ("pretrain-dsmae", "pretrain-mae"):
        stage_pretrain(args.results, args, args.stage.removeprefix("pretrain-"))
    else:
        stages = {"smoke": stage_smoke, "env": stage_env, "bench": stage_bench,
                  "equal-time": stage_equal_time, "eval": stage_eval,
                  "summary": stage_summary}  # fmt: skip
        stages[args.stage](args.results, args)
    return 0
