"""What the check measures, fixed: the science setting, the benchmark rows, the speed
switches, the toy sizes of ``--shrink``; and its JSON files."""

from __future__ import annotations

import json
import logging
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


# the speed switches, each A/B'd against "compiled" on the first row (dsmae ViT-Tiny 32/2)
SWITCHES = {
    "compiled-bf16-residual": {"train.bf16_residual": True},
    "compiled-fast-norm": {"train.fast_norm": True},
    "compiled-bf16-residual-fast-norm": {"train.bf16_residual": True, "train.fast_norm": True},
    "compiled-attention-flash": {"train.attention": "flash"},
    "compiled-attention-efficient": {"train.attention": "efficient"},
    "compiled-attention-cudnn": {"train.attention": "cudnn"},
    "compiled-blocks-max-autotune": {
        "train.compile_scope": "blocks",
        "train.compile_mode": "max-autotune-no-cudagraphs",
    },
}


CUDA_ONLY = ("compiled-attention-efficient", "compiled-attention-cudnn")


PRETRAIN_STAGES = ("pretrain-dsmae", "pretrain-mae", "equal-time")


EQUAL_TIME = "mae at dsmae's time"  # the rows of mae pre-trained for dsmae's wall time


PROFILED = "bench-dsmae-vit_tiny-compiled"  # the row whose steps are also profiled


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
