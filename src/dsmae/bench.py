"""``dsmae bench``: throughput, memory, FLOPs and MFU of one full pre-training step.

One step is what the engine does per batch, with the engine's own functions: gather a
batch from a uint8 data set held where the model is, augment it there and draw its
corruption (:func:`dsmae.engine.draw_step`, :func:`dsmae.engine.load_batch`), forward,
backward and optimizer step (:func:`dsmae.engine.train_step`), and the teacher's EMA
update where it runs every step; bf16 autocast and ``torch.compile`` on CUDA, fp32 and
eager on CPU, unless asked otherwise. The data set is synthetic (seeded uniform uint8
pixels), so no data is needed. Steps are timed one by one after a few warm-up steps; the
median is reported, and the data part (gather, augmentation, draws) is also timed alone.

FLOPs are counted by PyTorch's ``FlopCounterMode`` (matmul-like ops only: every linear
layer, the patch-embedding convolution and attention's two batched matmuls), per
part of the model. MFU is the achieved model FLOP rate over the best rate of a large
square matmul in the step's dtype, measured in the same process.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dsmae.config import Config, ConfigError, build_config, fill_data_stats
from dsmae.engine import Corruption, build_optimizer, draw_step, load_batch, train_step
from dsmae.flops import flop_counter_mode
from dsmae.masking import split_indices
from dsmae.models import DSMAE, encode_visible, patch_tokens
from dsmae.runtime import (
    autocast,
    compile_model,
    generator,
    resolve_device,
    synchronize,
    use_amp,
    use_compile,
)

log = logging.getLogger(__name__)

PARTS = ("student_fwd_bwd", "teacher_fwd", "decoder_fwd_bwd", "regressor_fwd_bwd")
MATMUL_SIZE = 4096  # side of the square matmul that measures the peak FLOP rate (CPU)
CUDA_MATMUL_SIZE = 8192  # ... on a GPU: large enough to reach the tensor cores' peak
FLOP_COUNT_BATCH = 8  # images the FLOPs are counted on (FLOPs are linear in the batch)
DATA_BATCHES = 4  # the synthetic data set holds this many batches
TEACHER_MOMENTUM = 0.99


# ----------------------------------------------------------------------------- FLOPs


def _counted(fn: Any) -> int:
    counter = flop_counter_mode()
    with counter:
        fn()
    return counter.get_total_flops()


def _default_corruption(
    model: DSMAE, images: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``mask`` (drawn from a generator seeded 0 when None) and a noise tensor to go
    with it (None for mae)."""
    if mask is None:
        return model.sample_corruption(images.shape[0], generator(0, images.device), images.device)
    return mask, None if model.method == "mae" else torch.zeros_like(images)


def part_steps(
    model: DSMAE, images: torch.Tensor, mask: torch.Tensor, *, amp: bool = False
) -> dict[str, Callable[[], None]]:
    """Each part of a training step as a closure that runs it alone, on the shapes of the
    step: the student encoder forward and backward, the teacher forward (no gradient),
    the decoder and the regressor forward and backward (their input needs a gradient, as
    in the step). Parts a method does not have are absent.

    Shapes are all that matters for counting and timing, so the student is fed the clean
    images and the heads a fixed latent of the right shape. Running a part leaves
    gradients in the model; clear them after.

    Args:
        model: a DSMAE in train mode.
        images: (B, C, H, W) on the model's device.
        mask: (B, N) bool corruption mask.
        amp: run under bf16 autocast (as the step does on CUDA).
    """
    device = images.device
    corrupted, clean = split_indices(mask, model.num_corrupted)
    mae = model.method == "mae"

    def encode() -> torch.Tensor:
        if mae:
            return encode_visible(model.encoder, images, clean)  # (B, 1 + V, D)
        return patch_tokens(model.encoder, images)  # (B, N, D), as from the noisy images

    def student_fwd_bwd() -> None:
        with autocast(device, amp):
            out = encode()
        out.float().sum().backward()

    with torch.no_grad():
        tokens = encode()
    # what the heads get: mae's decoder every encoded token, dsmae's heads the corrupted ones
    if not mae:
        tokens = tokens.gather(1, corrupted.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    latent = tokens
    parts: dict[str, Callable[[], None]] = {"student_fwd_bwd": student_fwd_bwd}

    if model.teacher is not None:
        teacher = model.teacher

        def teacher_fwd() -> None:
            with torch.no_grad(), autocast(device, amp):
                patch_tokens(teacher, images)

        parts["teacher_fwd"] = teacher_fwd

    if model.decoder is not None:
        decoder = model.decoder

        def decoder_fwd_bwd() -> None:
            x = latent.clone().requires_grad_(True)
            with autocast(device, amp):
                pred = decoder.forward_masked(x, clean) if mae else decoder(x, corrupted)
            pred.float().sum().backward()

        parts["decoder_fwd_bwd"] = decoder_fwd_bwd

    if model.regressor is not None:
        regressor = model.regressor

        def regressor_fwd_bwd() -> None:
            x = latent.clone().requires_grad_(True)
            with autocast(device, amp):
                out = regressor(x)
            out.float().sum().backward()

        parts["regressor_fwd_bwd"] = regressor_fwd_bwd
    return parts


def count_step_flops(
    model: DSMAE,
    images: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """FLOPs per image of one training step (forward and backward; the optimizer and the
    teacher update do no matmuls), in total and per part (see :func:`part_steps`).

    The whole step (``model(images).loss.backward()``) is counted once for the total, and
    each part under its own counter. The parts must add up to the total, else this raises.

    What FlopCounterMode counts for a backward pass: the matmuls actually run. A linear
    layer whose input needs a gradient costs 2x its forward (grad input, grad weight);
    the patch embedding costs 1x (the image needs no gradient); the fused attention
    backward costs 2.5x its forward (five batched matmuls, QK^T recomputed).

    Args:
        model: a DSMAE in train mode; the gradients it is left with are cleared.
        images: (B, C, H, W) on the model's device.
        mask: (B, N) bool corruption mask; drawn from a generator seeded 0 when None.
        amp: count under bf16 autocast (as the step runs on CUDA).

    Returns:
        ``{"total": ..., "student_fwd_bwd": ..., "teacher_fwd": ..., "decoder_fwd_bwd":
        ..., "regressor_fwd_bwd": ...}`` in FLOPs per image (absent parts 0).
    """
    device, batch = images.device, images.shape[0]
    mask, eps = _default_corruption(model, images, mask)

    def whole_step() -> None:
        with autocast(device, amp):
            out = model(images, mask=mask, eps=eps)
        out.loss.backward()

    total = _counted(whole_step)
    parts = dict.fromkeys(PARTS, 0)
    for name, run in part_steps(model, images, mask, amp=amp).items():
        parts[name] = _counted(run)
    model.zero_grad(set_to_none=True)

    if sum(parts.values()) != total:
        raise RuntimeError(
            f"FLOPs of the parts {parts} add up to {sum(parts.values())}, but the whole step "
            f"counts {total}: part_steps no longer mirrors DSMAE.forward"
        )
    return {"total": total / batch, **{k: v / batch for k, v in parts.items()}}


# ----------------------------------------------------------------------------- timing


def matmul_peak_gflops(
    device: torch.device, dtype: torch.dtype, size: int = MATMUL_SIZE, repeats: int = 5
) -> float:
    """The best GFLOP/s of ``repeats`` (at least 5) timed ``size x size @ size x size``
    matmuls in ``dtype`` (``2 * size**3`` FLOPs each), after two untimed ones.

    Timed with CUDA events on CUDA, the wall clock elsewhere.
    """
    repeats = max(repeats, 5)
    rng = generator(0, device)
    a = torch.randn(size, size, generator=rng, device=device).to(dtype)
    b = torch.randn(size, size, generator=rng, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            with torch.cuda.device(device):  # events record on the current device's stream
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                torch.mm(a, b, out=out)
                end.record()
                end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            torch.mm(a, b, out=out)
            seconds = time.perf_counter() - begin
        best = min(best, seconds)
    return 2 * size**3 / best / 1e9


@dataclass
class BenchStep:
    """One pre-training step of a benchmark, split as the engine runs it.

    ``inputs(step)`` gathers, augments and corrupts a batch (the data part);
    ``run(step)`` is the whole step: ``inputs``, ``train_step`` and, where the teacher
    moves every step, its EMA update.
    """

    inputs: Callable[[int], tuple[torch.Tensor, Corruption]]
    run: Callable[[int], None]


def bench_step(
    model: DSMAE,
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    cfg: Config,
    *,
    amp: bool = False,
    forward: torch.nn.Module | None = None,
    momentum: float = TEACHER_MOMENTUM,
) -> BenchStep:
    """The step of ``dsmae pretrain`` on ``data``.

    Args:
        model: a DSMAE in train mode.
        data: (M, C, H, W) uint8 images on the model's device; M a multiple of the batch.
        cfg: the run's config (batch size, micro-batch, augmentation, seed, EMA rhythm).
        forward: the module the step calls (default ``model``; e.g. compiled).
    """
    device, t = data.device, cfg.train
    b, size = t.batch_size, cfg.model.img_size
    mean = torch.tensor(cfg.data.mean, device=device)
    std = torch.tensor(cfg.data.std, device=device)
    order = torch.randperm(len(data), generator=generator(t.seed, device), device=device)

    def inputs(step: int) -> tuple[torch.Tensor, Corruption]:
        corruption = draw_step(model, cfg, step, device)
        start = (step * b) % len(data)
        return load_batch(data, order[start : start + b], corruption, size, mean, std), corruption

    def run(step: int) -> None:
        images, corruption = inputs(step)
        out = train_step(
            model if forward is None else forward,
            optimizer,
            images,
            micro_batch=t.micro_batch,
            mask=corruption.mask,
            eps=corruption.eps,
            amp=amp,
        )
        if t.ema_every == "step":
            model.update_teacher(momentum, apply=out["finite"])

    return BenchStep(inputs, run)


def time_calls(
    fn: Callable[[int], Any], device: torch.device, *, steps: int = 10, warmup: int = 3
) -> tuple[list[float], float | None]:
    """Seconds of each of ``steps`` calls ``fn(i)``, after ``warmup`` untimed ones.

    The device is synchronised before and after each call, and on CUDA the peak memory
    statistics are reset after the warm-up.

    Returns:
        the timed calls' seconds, and the first call's (compilation included, when ``fn``
        compiles) or None without warm-up.
    """
    times, first = [], None
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        fn(i)
        synchronize(device)
        seconds = time.perf_counter() - start
        if i == 0 and warmup:
            first = seconds
        if i >= warmup:
            times.append(seconds)
    return times, first


_LIBRARY_FRAMES = ("warnings.py", "/torch/cuda/__init__.py")  # frames that report, not cause


def host_syncs(fn: Callable[[], Any], device: torch.device) -> list[str] | None:
    """Where ``fn()`` makes the host wait for the GPU: for each call that CUDA's sync
    debug mode warns about, the innermost ``file:line`` of the Python stack below the
    warning machinery (an empty list: none); None off CUDA, where nothing waits."""
    if device.type != "cuda":
        return None
    sites: list[str] = []

    def record(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if "synchroniz" in str(message):
            stack = traceback.extract_stack()[:-1]
            outside = [f for f in stack if not f.filename.endswith(_LIBRARY_FRAMES)]
            frame = outside[-1] if outside else None
            sites.append(f"{frame.filename}:{frame.lineno}" if frame else f"{filename}:{lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def time_parts(
    model: DSMAE,
    images: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int = 10,
    warmup: int = 3,
    amp: bool = False,
) -> dict[str, float]:
    """Median seconds of each part of the step run alone (:func:`part_steps`), after
    ``warmup`` untimed runs; parts the method does not have are 0.

    Their sum against the whole step's time is what the step costs beyond its parts:
    corruption, losses, gathers, optimizer and teacher update, and any inefficiency of
    running them together.
    """
    device = images.device
    seconds = dict.fromkeys(PARTS, 0.0)
    for name, run in part_steps(model, images, mask, amp=amp).items():
        times = []
        for i in range(warmup + steps):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        seconds[name] = statistics.median(times)
    return seconds


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on CUDA, else this
    process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "CPU"
    return f"{name} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- the command


def run_bench(
    method: str,
    arch: str,
    img_size: int,
    patch_size: int,
    batch_size: int,
    *,
    steps: int = 10,
    warmup: int = 3,
    device: str = "auto",
    in_chans: int = 3,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    matmul_size: int | None = None,
    parts_time: bool = False,
) -> dict[str, Any]:
    """Benchmark one pre-training step of a model on a synthetic batch.

    The step runs as ``dsmae pretrain`` runs it: ``train.compile`` (default: on for
    CUDA), ``train.compile_scope``, ``train.amp``, ``train.micro_batch``,
    ``train.ema_every`` and ``train.grad_checkpointing`` from ``overrides`` apply.

    Args:
        overrides: further dotted config values, e.g. ``{"model.depth": 6}``.
        matmul_size: side of the peak-rate matmul (default :data:`MATMUL_SIZE`).
        parts_time: also time each part alone (:func:`time_parts`, eager, on the whole
            batch) and report ``parts_ms``, their sum ``sum_parts_ms`` and
            ``overhead_vs_parts`` (``step_ms / sum_parts_ms - 1``) and ``parts_mfu``.

    Returns:
        a JSON-ready dict: the settings (``method``, ``arch``, ``img_size``,
        ``patch_size``, ``in_chans``, ``depth``, ``embed_dim``, ``num_heads``,
        ``batch_size``, ``steps``, ``warmup``, ``device``, ``dtype``, ``torch``) and
        ``step_ms`` (median), ``img_per_s``, ``peak_mem_mb``, ``gflop_per_img``, ``parts``
        (GFLOP per image of each part), ``achieved_gflops``, ``matmul_peak_gflops``,
        ``matmul_size``, ``mfu``; ``compile``, ``compile_scope`` and ``compile_s`` (the
        first step's time beyond a step's: the compilation, excluded from the rest);
        ``data_ms`` (the data part alone: gather, augmentation, draws) and its
        ``data_share`` of the step; ``host_syncs_per_step`` (CUDA: times a step waits
        for the GPU; None elsewhere) and ``host_sync_sites`` (the lines that wait).
    """
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    values = {
        "model.method": method,
        "model.arch": arch,
        "model.img_size": img_size,
        "model.patch_size": patch_size,
        "model.in_chans": in_chans,
        "train.batch_size": batch_size,
        "train.device": device,
        "train.seed": seed,
        **(overrides or {}),
    }
    cfg = build_config(overrides=values)
    m = cfg.model
    dev = resolve_device(cfg.train.device)
    amp = use_amp(dev, cfg.train.amp)
    compiled = use_compile(dev, cfg.train.compile)
    dtype = torch.bfloat16 if amp else torch.float32
    torch.manual_seed(seed)
    model = DSMAE(m).to(dev).train()
    if cfg.train.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    forward = compile_model(model, cfg.train.compile_scope) if compiled else model
    warmup = max(warmup, 1) if compiled else warmup  # the first step compiles
    shape = (DATA_BATCHES * batch_size, m.in_chans, m.img_size, m.img_size)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator(seed)).to(dev)
    cfg = fill_data_stats(cfg, [0.5] * m.in_chans, [0.29] * m.in_chans)  # uniform pixels
    log.info(
        "bench %s %s (depth %d, width %d), %d px, patch %d, batch %d on %s, %s%s",
        m.method,
        m.arch,
        m.depth,
        m.embed_dim,
        m.img_size,
        m.patch_size,
        batch_size,
        dev,
        str(dtype).removeprefix("torch."),
        f", torch.compile ({cfg.train.compile_scope})" if compiled else "",
    )

    optimizer = build_optimizer(model, cfg.train, dev)
    step = bench_step(model, optimizer, data, cfg, amp=amp, forward=forward)
    sample, corruption = step.inputs(0)
    flops = count_step_flops(
        model, sample[:FLOP_COUNT_BATCH], mask=corruption.mask[:FLOP_COUNT_BATCH], amp=amp
    )
    times, first_s = time_calls(step.run, dev, steps=steps, warmup=warmup)
    peak_mem = peak_memory_mb(dev)  # before the matmuls: CPU's peak RSS never goes down
    data_times, _ = time_calls(step.inputs, dev, steps=steps, warmup=1)
    syncs = host_syncs(lambda: step.run(warmup + steps), dev)
    parts_ms = None
    if parts_time:
        seconds = time_parts(model, sample, corruption.mask, steps=steps, warmup=warmup, amp=amp)
        parts_ms = {name: 1e3 * value for name, value in seconds.items()}
    size = matmul_size or (CUDA_MATMUL_SIZE if dev.type == "cuda" else MATMUL_SIZE)
    log.info("timing %dx%d matmuls for the peak rate", size, size)
    peak = matmul_peak_gflops(dev, dtype, size=size)

    step_s = statistics.median(times)
    img_per_s = batch_size / step_s
    parts = {name: flops[name] / 1e9 for name in PARTS}
    gflop_per_img = sum(parts.values())  # = flops["total"] / 1e9
    achieved = gflop_per_img * img_per_s
    result = {
        "method": m.method,
        "arch": m.arch,
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "depth": m.depth,
        "embed_dim": m.embed_dim,
        "num_heads": m.num_heads,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "device": device_name(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "step_ms": step_s * 1e3,
        "img_per_s": img_per_s,
        "peak_mem_mb": peak_mem,
        "gflop_per_img": gflop_per_img,
        "parts": parts,
        "achieved_gflops": achieved,
        "matmul_peak_gflops": peak,
        "matmul_size": size,
        "mfu": achieved / peak,
        "compile": compiled,
        "compile_scope": cfg.train.compile_scope if compiled else None,
        "compile_s": first_s - step_s if compiled and first_s is not None else None,
        "data_ms": statistics.median(data_times) * 1e3,
        "data_share": statistics.median(data_times) / step_s,
        "host_syncs_per_step": None if syncs is None else len(syncs),
        "host_sync_sites": syncs,
    }
    if parts_ms is not None:
        result["parts_ms"] = parts_ms
        result["sum_parts_ms"] = sum(parts_ms.values())
        result["overhead_vs_parts"] = result["step_ms"] / result["sum_parts_ms"] - 1
        result["parts_mfu"] = {  # each part's FLOP rate alone, over the matmul peak
            name: parts[name] * batch_size / (ms / 1e3) / peak if ms else 0.0
            for name, ms in parts_ms.items()
        }
    return result


def format_report(result: Mapping[str, Any]) -> str:
    """The human-readable table of a :func:`run_bench` result."""
    r = result
    total = r["gflop_per_img"]
    rows = [
        (
            "step time (median)",
            f"{r['step_ms']:.2f} ms  ({r['steps']} steps, {r['warmup']} warm-up)",
        ),
        ("throughput", f"{r['img_per_s']:.1f} img/s"),
        ("peak memory", f"{r['peak_mem_mb']:.0f} MiB"),
        ("FLOPs per image", f"{total:.4g} GFLOP"),
        *((f"  {k}", f"{v:.4g} GFLOP  ({100 * v / total:.1f}%)") for k, v in r["parts"].items()),
        ("achieved", f"{r['achieved_gflops']:.1f} GFLOP/s"),
        (f"matmul peak ({r['matmul_size']}^3)", f"{r['matmul_peak_gflops']:.1f} GFLOP/s"),
        ("MFU", f"{100 * r['mfu']:.1f}%"),
        ("data part alone", f"{r['data_ms']:.2f} ms  ({100 * r['data_share']:.1f}% of the step)"),
    ]
    if r["compile_s"] is not None:
        rows.append(("compilation (first step)", f"{r['compile_s']:.1f} s, not in the figures"))
    if r["host_syncs_per_step"] is not None:
        rows.append(("host syncs per step", str(r["host_syncs_per_step"])))
    if "parts_ms" in r:
        rows += [
            ("each part alone (eager)", ""),
            *(
                (f"  {k}", f"{v:.2f} ms  (MFU {100 * r['parts_mfu'][k]:.1f}%)")
                for k, v in r["parts_ms"].items()
                if v
            ),
            ("  sum of the parts", f"{r['sum_parts_ms']:.2f} ms"),
            ("step over its parts", f"{100 * r['overhead_vs_parts']:+.1f}%"),
        ]
    head = (
        f"dsmae bench: {r['method']} {r['arch']} (depth {r['depth']}, width {r['embed_dim']}, "
        f"{r['num_heads']} heads), {r['img_size']} px, patch {r['patch_size']}, "
        f"{r['in_chans']} channel(s), batch {r['batch_size']}\n"
        f"device: {r['device']}; {r['dtype']}; torch {r['torch']}"
        + (f"; torch.compile ({r['compile_scope']})" if r["compile"] else "")
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join([head, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def to_json(result: Mapping[str, Any]) -> str:
    """One line of JSON of a :func:`run_bench` result."""
    return json.dumps(result)
