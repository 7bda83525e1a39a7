"""``dsmae bench``: throughput, memory, FLOPs and MFU of one full pre-training step.

One step is pre-training's own :class:`~dsmae.pretrain.step.PretrainStep`, built by its
own set-up (:func:`~dsmae.pretrain.setup.training_step`): gather a batch from a uint8 data
set held where the model is, draw its corruption and augment it there, forward, backward
and optimizer step, and the teacher's EMA update where its schedule moves it; bf16
autocast and ``torch.compile`` on CUDA, fp32 and eager on CPU, unless asked otherwise.
The data set is synthetic (seeded uniform uint8 pixels), so no data is needed. Steps are
timed one by one after a few warm-up steps; the median is reported, and the data part
(gather, augmentation, draws) is also timed alone.

FLOPs are counted by PyTorch's ``FlopCounterMode`` (matmul-like ops only: every linear
layer, the patch-embedding convolution and attention's two batched matmuls), per
part of the model: each part is one of the model's public stages, run alone
(:func:`dsmae.flops.part_steps`), and the same parts are timed alone with ``--parts``.
MFU is the achieved model FLOP rate over the best rate of square matmuls in the step's
dtypes (:func:`step_peak`), searched in the same process within seconds on any device.
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
from pathlib import Path
from typing import Any

import torch

from dsmae import distributed
from dsmae.config import Config, ConfigError, build_config, fill_data_stats
from dsmae.flops import PARTS, count_step_flops, part_steps
from dsmae.matmul_peak import (
    CUDA_MATMUL_SIZE,
    MATMUL_SIZE,
    MatmulPeak,
    dtype_name,
    step_peak,
)
from dsmae.models import PretrainModel
from dsmae.pretrain.setup import build_optimizer, build_training_model, training_step
from dsmae.pretrain.step import Batches, Corruption, PretrainStep
from dsmae.runtime import check_step_settings, generator, resolve_device, synchronize
from dsmae.writes import atomic_write_bytes, check_output_file

log = logging.getLogger(__name__)

# the step's speed switches (train.*), reported with every result for the A/B of each
SPEED_SWITCHES = ("attention", "bf16_residual", "fast_norm")
PROFILE_STEPS = 3  # steps a --profile trace holds
PROFILE_TOP = 15  # operators listed by self time
FLOP_COUNT_BATCH = 8  # images the FLOPs are counted on (FLOPs are linear in the batch)
DATA_BATCHES = 4  # the synthetic data set holds this many batches: an epoch of the bench


# ----------------------------------------------------------------------------- timing


@dataclass
class BenchStep:
    """``dsmae pretrain``'s own step (:class:`~dsmae.pretrain.step.PretrainStep`) on the
    synthetic data set, by step index: ``inputs(i)`` is its data part alone (gather,
    draws, augmentation), ``run(i)`` the whole step (with the teacher's update where the
    schedule moves it)."""

    take_step: PretrainStep
    batches: Batches

    def __post_init__(self) -> None:
        # one order for every step, made (and moved to the device) here, outside the timing
        self.order = self.batches.order(0)

    def _uint8(self, step: int) -> torch.Tensor:
        """The images of ``step``: the data set holds :data:`DATA_BATCHES` batches."""
        return self.batches.gather(self.order, step % DATA_BATCHES)

    def inputs(self, step: int) -> tuple[torch.Tensor, Corruption]:
        return self.take_step.inputs(step, self._uint8(step))

    def run(self, step: int) -> None:
        self.take_step(step, self._uint8(step))


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
    model: PretrainModel,
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
    profile: str | Path | None = None,
) -> dict[str, Any]:
    """Benchmark one pre-training step of a model on a synthetic batch.

    The step runs as ``dsmae pretrain`` runs it: ``train.compile`` (default: on for
    CUDA), ``train.compile_scope``, ``train.amp``, ``train.micro_batch``,
    ``train.ema_every`` and ``train.grad_checkpointing`` from ``overrides`` apply.

    Args:
        overrides: further dotted config values, e.g. ``{"model.depth": 6}``.
        matmul_size: time the peak on this matmul side alone (default: the best of the
            sides up to :data:`MATMUL_SIZE`, :data:`CUDA_MATMUL_SIZE` on CUDA, that fit in
            :data:`PEAK_SECONDS` per dtype: :func:`matmul_peak`).
        parts_time: also time each part alone (:func:`time_parts`, eager, on the whole
            batch) and report ``parts_ms``, their sum ``sum_parts_ms`` and
            ``overhead_vs_parts`` (``step_ms / sum_parts_ms - 1``) and ``parts_mfu``.
        profile: also profile :data:`PROFILE_STEPS` more steps (:func:`profile_steps`),
            write their trace to this file, and report ``profile_trace`` (its path) and
            ``profile_top`` (the operators the time goes to).

    Returns:
        a JSON-ready dict: the settings (``method``, ``arch``, ``img_size``,
        ``patch_size``, ``in_chans``, ``depth``, ``embed_dim``, ``num_heads``,
        ``batch_size``, ``steps``, ``warmup``, ``device``, ``dtype``, ``torch`` and the
        :data:`SPEED_SWITCHES`) and
        ``step_ms`` (median), ``img_per_s``, ``peak_mem_mb``, ``gflop_per_img``, ``parts``
        (GFLOP per image of each part), ``achieved_gflops``, ``matmul_peak_gflops``
        (the MFU denominator, :func:`step_peak`), its ``matmul_size`` and
        ``matmul_dtype``, ``matmul_peaks`` (``gflops`` and ``size`` of each dtype the
        step runs in), ``mfu``; ``compile``, ``compile_scope``, ``compile_backend``,
        ``compile_mode`` and ``compile_s`` (the first step's time beyond a step's: the
        compilation, excluded from the rest);
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
    if profile is not None:  # refused before any work where it cannot be written
        profile = check_output_file(profile, "--profile", "the profile trace")
    setup = prepare(build_config(overrides=values), warmup)
    measured = _measure(setup, steps, matmul_size, parts_time)
    result = {**_settings(setup, steps), **_figures(setup, measured)}
    if profile is not None:
        first = setup.warmup + steps + 1  # the steps after those timed and the sync count
        top = profile_steps(setup.step.run, setup.device, Path(profile), first=first)
        result |= {"profile_trace": str(profile), "profile_top": top}
    return result


def profile_steps(
    run: Callable[[int], None],
    device: torch.device,
    trace: Path,
    *,
    first: int,
    steps: int = PROFILE_STEPS,
    top: int = PROFILE_TOP,
) -> list[dict[str, Any]]:
    """Profile ``steps`` calls ``run(first)``, ``run(first + 1)``, ... with
    ``torch.profiler`` (the CPU, and CUDA where the step runs there) and write the trace
    for chrome://tracing or Perfetto to ``trace``.

    Returns:
        the ``top`` operators by self time (on the GPU where there is one, else on the
        CPU), each as ``op``, ``ms_per_step``, ``share`` (of all operators' self time)
        and ``calls_per_step``: where the step's time goes.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as profiler:
        for i in range(steps):
            run(first + i)
        synchronize(device)
    atomic_write_bytes(trace, _chrome_trace(profiler), "profile trace")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = profiler.key_averages()
    total = sum(getattr(event, key) for event in events) or 1.0
    ranked = sorted(events, key=lambda event: getattr(event, key), reverse=True)[:top]
    return [
        {
            "op": event.key,
            "ms_per_step": getattr(event, key) / 1e3 / steps,
            "share": getattr(event, key) / total,
            "calls_per_step": event.count / steps,
        }
        for event in ranked
    ]


def _chrome_trace(profiler: Any) -> bytes:
    """The profiler's chrome trace, as the bytes ``export_chrome_trace`` writes."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        return path.read_bytes()


@dataclass
class BenchSetup:
    """A benchmark ready to run: its config (data statistics filled), the model in train
    mode, its step on the synthetic data, and how the step runs."""

    cfg: Config
    device: torch.device
    amp: bool
    compiled: bool
    warmup: int  # at least 1 when compiled: the first step compiles
    model: PretrainModel
    step: BenchStep

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.amp else torch.float32


def prepare(cfg: Config, warmup: int) -> BenchSetup:
    """The step of ``dsmae pretrain`` for ``cfg``, built by pre-training's own set-up
    (:func:`~dsmae.pretrain.setup.training_step`: the model, optimizer, compilation and
    schedules of a run whose epoch is :data:`DATA_BATCHES` steps), on a synthetic uint8
    data set of seeded uniform pixels."""
    m, t = cfg.model, cfg.train
    dev = resolve_device(t.device)
    check_step_settings(dev, t)
    cfg = fill_data_stats(cfg, [0.5] * m.in_chans, [0.29] * m.in_chans)  # uniform pixels
    model = build_training_model(cfg, dev)
    optimizer = build_optimizer(model, t, dev)
    step, compiled = training_step(cfg, model, optimizer, distributed.Process(), dev, DATA_BATCHES)
    shape = (DATA_BATCHES * t.batch_size, m.in_chans, m.img_size, m.img_size)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator(t.seed)).to(dev)
    log.info(
        "bench %s %s (depth %d, width %d), %d px, patch %d, batch %d on %s, %s%s",
        m.method,
        m.arch,
        m.depth,
        m.embed_dim,
        m.img_size,
        m.patch_size,
        t.batch_size,
        dev,
        "bfloat16" if step.amp else "float32",
        f", torch.compile ({t.compile_scope})" if compiled else "",
    )
    warmup = max(warmup, 1) if compiled else warmup  # the first step compiles
    bench_step = BenchStep(step, Batches(data, cfg, step.share))
    return BenchSetup(cfg, dev, step.amp, compiled, warmup, model, bench_step)


@dataclass
class _Measured:
    """The raw numbers of a benchmark (seconds, FLOPs per image, MiB, GFLOP/s)."""

    flops: dict[str, float]  # count_step_flops
    step_s: float  # median step
    first_s: float | None  # the first step (compilation included)
    peak_mem_mb: float
    data_s: float  # median data part alone
    syncs: list[str] | None  # host_syncs of one step
    parts_s: dict[str, float] | None  # time_parts, where asked for
    peak: MatmulPeak  # the MFU denominator (step_peak)
    peaks: dict[str, MatmulPeak]  # the peak of each dtype the step runs in


def _measure(setup: BenchSetup, steps: int, matmul_size: int | None, parts_time: bool) -> _Measured:
    """Count the FLOPs, time the steps, the data part alone and (``parts_time``) each part
    alone, find the host syncs and the matmul peak: the raw numbers of a benchmark."""
    s, dev, warmup = setup, setup.device, setup.warmup
    sample, corruption = s.step.inputs(0)
    counted = corruption[:FLOP_COUNT_BATCH]
    flops = count_step_flops(
        s.model, sample[:FLOP_COUNT_BATCH], mask=counted.mask, eps=counted.eps, amp=s.amp
    )
    times, first_s = time_calls(s.step.run, dev, steps=steps, warmup=warmup)
    peak_mem = peak_memory_mb(dev)  # before the matmuls: CPU's peak RSS never goes down
    data_times, _ = time_calls(s.step.inputs, dev, steps=steps, warmup=1)
    syncs = host_syncs(lambda: s.step.run(warmup + steps), dev)
    parts_s = None
    if parts_time:
        parts_s = time_parts(
            s.model, sample, corruption.mask, steps=steps, warmup=warmup, amp=s.amp
        )
    largest = CUDA_MATMUL_SIZE if dev.type == "cuda" else MATMUL_SIZE
    peak, peaks = step_peak(dev, s.amp, matmul_size or largest, fixed=matmul_size is not None)
    return _Measured(
        flops=flops,
        step_s=statistics.median(times),
        first_s=first_s,
        peak_mem_mb=peak_mem,
        data_s=statistics.median(data_times),
        syncs=syncs,
        parts_s=parts_s,
        peak=peak,
        peaks=peaks,
    )


def _settings(setup: BenchSetup, steps: int) -> dict[str, Any]:
    """The settings half of a :func:`run_bench` result."""
    m = setup.cfg.model
    return {
        "method": m.method,
        "arch": m.arch,
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "depth": m.depth,
        "embed_dim": m.embed_dim,
        "num_heads": m.num_heads,
        "batch_size": setup.cfg.train.batch_size,
        "steps": steps,
        "warmup": setup.warmup,
        "device": device_name(setup.device),
        "dtype": dtype_name(setup.dtype),
        "torch": torch.__version__,
        **{key: getattr(setup.cfg.train, key) for key in SPEED_SWITCHES},
    }


def _figures(setup: BenchSetup, measured: _Measured) -> dict[str, Any]:
    """The measured half of a :func:`run_bench` result, from :func:`_measure`'s numbers."""
    r, batch, scope = measured, setup.cfg.train.batch_size, setup.cfg.train.compile_scope
    step_s, peak = r.step_s, r.peak.gflops
    img_per_s = batch / step_s
    parts = {name: r.flops[name] / 1e9 for name in PARTS}
    gflop_per_img = sum(parts.values())  # = flops["total"] / 1e9
    achieved = gflop_per_img * img_per_s
    figures = {
        "step_ms": step_s * 1e3,
        "img_per_s": img_per_s,
        "peak_mem_mb": r.peak_mem_mb,
        "gflop_per_img": gflop_per_img,
        "parts": parts,
        "achieved_gflops": achieved,
        "matmul_peak_gflops": peak,
        "matmul_size": r.peak.size,
        "matmul_dtype": dtype_name(r.peak.dtype),
        "matmul_peaks": {name: found.as_json() for name, found in r.peaks.items()},
        "mfu": achieved / peak,
        "compile": setup.compiled,
        "compile_scope": scope if setup.compiled else None,
        "compile_backend": setup.cfg.train.compile_backend if setup.compiled else None,
        "compile_mode": setup.cfg.train.compile_mode if setup.compiled else None,
        "compile_s": r.first_s - step_s if setup.compiled and r.first_s is not None else None,
        "data_ms": r.data_s * 1e3,
        "data_share": r.data_s / step_s,
        "host_syncs_per_step": None if r.syncs is None else len(r.syncs),
        "host_sync_sites": r.syncs,
    }
    if r.parts_s is not None:
        parts_ms = {name: 1e3 * value for name, value in r.parts_s.items()}
        figures["parts_ms"] = parts_ms
        figures["sum_parts_ms"] = sum(parts_ms.values())
        figures["overhead_vs_parts"] = figures["step_ms"] / figures["sum_parts_ms"] - 1
        figures["parts_mfu"] = {  # each part's FLOP rate alone, over the matmul peak
            name: parts[name] * batch / (ms / 1e3) / peak if ms else 0.0
            for name, ms in parts_ms.items()
        }
    return figures


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
        *(
            (f"matmul peak, {name} ({peak['size']}^3)", f"{peak['gflops']:.1f} GFLOP/s")
            for name, peak in r["matmul_peaks"].items()
        ),
        ("MFU denominator", f"the {r['matmul_dtype']} peak"),
        ("MFU", f"{100 * r['mfu']:.1f}%"),
        ("data part alone", f"{r['data_ms']:.2f} ms  ({100 * r['data_share']:.1f}% of the step)"),
    ]
    if r["compile_s"] is not None:
        rows.append(("compilation (first step)", f"{r['compile_s']:.1f} s, not in the figures"))
    if r["host_syncs_per_step"] is not None:
        rows.append(("host syncs per step", str(r["host_syncs_per_step"])))
    if "profile_top" in r:
        rows += [
            (f"where the time goes ({r['profile_trace']})", ""),
            *(
                (f"  {e['op'][:40]}", f"{e['ms_per_step']:.3f} ms/step  ({100 * e['share']:.1f}%)")
                for e in r["profile_top"]
            ),
        ]
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
        + (f"; torch.compile ({r['compile_scope']}, {r['compile_mode']})" if r["compile"] else "")
        + f"; attention {r['attention']}, bf16 residual {r['bf16_residual']}, "
        f"fast norm {r['fast_norm']}"
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join([head, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def to_json(result: Mapping[str, Any]) -> str:
    """One line of JSON of a :func:`run_bench` result."""
    return json.dumps(result)
