"""Where and how computation runs: device choice, autocast, seeded generators, progress bars."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn
from tqdm import tqdm

from dsmae.config import ATTENTION_KERNELS, DEVICE_PATTERN, ConfigError, TrainConfig

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name is used as given.

    Raises:
        ConfigError: not auto, cpu, mps, cuda or cuda:N, or CUDA asked for where there is
            none (or not that many GPUs).
    """
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise ConfigError(f"device {name!r} is not one of: auto, cpu, cuda, cuda:N, mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r}, but this machine has {torch.cuda.device_count()} GPU(s)"
        )
    return device


def use_amp(device: torch.device, amp: bool | None) -> bool:
    """bf16 autocast: on by default for CUDA, off on CPU (bf16 matmuls are slow on most CPUs)."""
    return device.type == "cuda" if amp is None else amp


def use_compile(device: torch.device, compile: bool | None) -> bool:
    """``torch.compile``: on by default for CUDA, off on CPU (where compiling a ViT-Tiny
    step costs a minute of two cores for no gain, see ``benchmarks/RESULTS.md``)."""
    return device.type == "cuda" if compile is None else compile


def compile_model(model: nn.Module, train: TrainConfig) -> nn.Module:
    """The module that a training step calls, compiled as ``train`` says (its backend
    checked beforehand: :func:`check_step_settings`).

    Args:
        model: e.g. a DSMAE, a classifier, or a DistributedDataParallel around one.
        train: its ``compile_scope``: "model": forward, losses and (through AOTAutograd)
            backward as one graph, returned as a new wrapper module; "blocks": every timm
            transformer block of ``model`` compiled in place (regional compilation: the
            blocks share one compiled graph, which compiles several times faster) and
            ``model`` returned. ``compile_backend`` and ``compile_mode`` are
            ``torch.compile``'s ``backend`` and ``mode`` ("default": none given).
    """
    options: dict[str, Any] = {"backend": train.compile_backend}
    if train.compile_mode != "default":
        options["mode"] = train.compile_mode
    log.debug(
        "torch.compile (%s scope, backend %s, mode %s)",
        train.compile_scope,
        train.compile_backend,
        train.compile_mode,
    )
    if train.compile_scope == "model":
        return torch.compile(model, **options)
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**options)
    return model


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled``, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


_CUDA_ONLY_KERNELS = ("efficient", "cudnn")


def check_step_settings(device: torch.device, train: TrainConfig) -> None:
    """Refuse, before any work, what the config asks of a training step that this machine
    does not have: an attention kernel off CUDA that only CUDA has, or (where the step is
    compiled) a ``torch.compile`` backend this torch lacks.

    Raises:
        ConfigError: naming ``train.attention`` or ``train.compile_backend``.
    """
    kernel = train.attention
    if kernel in _CUDA_ONLY_KERNELS and device.type != "cuda":
        raise ConfigError(
            f"train.attention={kernel!r} needs CUDA; on {device.type} use one of: "
            f"{', '.join(k for k in ATTENTION_KERNELS if k not in _CUDA_ONLY_KERNELS)}",
            "train.attention",
        )
    backends = torch.compiler.list_backends(exclude_tags=())
    if use_compile(device, train.compile) and train.compile_backend not in backends:
        raise ConfigError(
            f"train.compile_backend={train.compile_backend!r} is not one of this torch's "
            f"backends: {', '.join(sorted(backends))}",
            "train.compile_backend",
        )


def attention_kernel(kernel: str) -> contextlib.AbstractContextManager:
    """Inside, ``scaled_dot_product_attention`` runs ``kernel`` (see
    :data:`~dsmae.config.ATTENTION_KERNELS`) and fails rather than fall back to another;
    "auto": a null context, torch picks per call."""
    if kernel == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[kernel]
    return sdpa_kernel(backend)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees, for the next step.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB)
    with a fresh ``mmap`` and returns freed heap tops to the system, so each step's
    activations are page-faulted in (and zeroed by the kernel) again. On a CPU that cost
    7% of a ViT-Tiny 32/2 DSMAE step at batch 32 and 18% at batch 64 (whose 50 MiB
    activations are always mmapped), see ``benchmarks/RESULTS.md``. With mmap off and
    trimming off, freed blocks are reused: the peak resident memory is unchanged, but it
    is not handed back to the system until the process exits. The same advice as the
    jemalloc/tcmalloc preload that Intel recommends for PyTorch on CPU, without a
    dependency. Process-wide; the ``dsmae`` command calls it on start.

    Returns:
        whether it applied (False where the C library is not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl)
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("glibc malloc keeps freed memory: %s", applied)
    return applied


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def progress(total: int, desc: str, unit: str = "img", disable: bool = False) -> tqdm:
    """A progress bar counting ``unit``s: shows the rate (e.g. img/s) and the ETA.

    Drawn on stderr when it is a terminal; silent otherwise (logs carry the metrics).
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        disable=disable or not sys.stderr.isatty(),
    )
