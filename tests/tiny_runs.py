"""Helpers of the pre-training tests: the tiny ViT's run config on real digits, and
checkpoints compared bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsmae.checkpoint import load_checkpoint
from dsmae.config import Config, build_config


def tiny_config(tiny: dict, tmp_path: Path, **overrides: Any) -> Config:
    """The tiny ViT pre-trained on 256 real digits upscaled to 16x16, batch 64 -> 4 steps an
    epoch, for 2 epochs (warm-up 1), a metrics line every step, on the CPU, into
    ``tmp_path/run``; ``overrides`` (dotted keys) on top."""
    base = {f"model.{k}": v for k, v in tiny.items()}
    base.update(
        {
            "model.in_chans": 1,
            "data.source": "digits",
            "data.subset": 256,
            "train.epochs": 2,
            "train.warmup_epochs": 1,
            "train.batch_size": 64,
            "train.log_every": 1,
            "train.device": "cpu",
            "out": str(tmp_path / "run"),
        }
    )
    base.update(overrides)
    return build_config(overrides=base)


def saved_weights(path: Path) -> tuple[dict, dict, int]:
    """A checkpoint's model weights, optimizer state and step."""
    state = load_checkpoint(path)
    return state["model"], state["optimizer"]["state"], state["step"]


def assert_identical(a: Path, b: Path) -> None:
    """Two checkpoints hold the same step, weights and optimizer state, bit for bit."""
    model_a, opt_a, step_a = saved_weights(a)
    model_b, opt_b, step_b = saved_weights(b)
    assert step_a == step_b
    for name, tensor in model_a.items():
        assert torch.equal(tensor, model_b[name]), name
    for key, slots in opt_a.items():
        for slot, value in slots.items():
            assert torch.equal(value, opt_b[key][slot]), (key, slot)
