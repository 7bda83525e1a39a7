"""The peak rate of square matmuls on a device, in a dtype: the denominator of a step's
model FLOPs utilisation (MFU, ``dsmae bench``), searched within seconds on any device (a
dtype that is slow where it runs, bf16 on most CPUs, stops at a small side instead of
taking minutes)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from dsmae.runtime import generator, synchronize

log = logging.getLogger(__name__)

MATMUL_SIZE = 4096  # the largest square matmul the peak search times (CPU)
CUDA_MATMUL_SIZE = 8192  # ... on a GPU: large enough to reach the tensor cores' peak
PEAK_SECONDS = 3.0  # the peak search's time for one dtype, whatever the device


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


@dataclass(frozen=True)
class MatmulPeak:
    """The best rate of square matmuls in one dtype, and the size that reached it."""

    gflops: float
    size: int
    dtype: torch.dtype

    def as_json(self) -> dict[str, Any]:
        return {"gflops": self.gflops, "size": self.size}


def matmul_peak(
    device: torch.device, dtype: torch.dtype, max_size: int, seconds: float | None = None
) -> MatmulPeak:
    """The best :func:`matmul_peak_gflops` over square matmuls of side 128, 256, ... up to
    ``max_size`` (or ``max_size`` alone where it is smaller), in about ``seconds``
    (default: :data:`PEAK_SECONDS`).

    A size runs only while its predicted time (8 times the size before, the cost of a
    matmul growing as its side cubed) fits in what is left of ``seconds``: a dtype that
    is slow on ``device`` (bf16 on a CPU without bf16 units, 0.6 GFLOP/s) stops at a small
    size instead of taking minutes. The first size always runs.
    """
    deadline = time.perf_counter() + (PEAK_SECONDS if seconds is None else seconds)
    size, best = min(128, max_size), None
    while True:
        started = time.perf_counter()
        rate = matmul_peak_gflops(device, dtype, size=size)
        spent = time.perf_counter() - started
        if best is None or rate > best.gflops:
            best = MatmulPeak(rate, size, dtype)
        if 2 * size > max_size or time.perf_counter() + 8 * spent > deadline:
            return best
        size *= 2


def step_peak(
    device: torch.device, amp: bool, max_size: int, fixed: bool = False
) -> tuple[MatmulPeak, dict[str, MatmulPeak]]:
    """The MFU denominator of a step, and the peak of each dtype it runs in.

    An fp32 step runs in fp32. A bf16-autocast step runs its matmuls in bf16 and the rest
    (norms, softmax, losses, and matmuls autocast leaves alone) in fp32: no FLOP of it
    runs faster than the faster of the two peaks, so that one is the denominator and MFU
    stays <= 100% on a device where bf16 is the slower (most CPUs).

    Args:
        max_size: the largest matmul side to try; with ``fixed``, the only one.
    """
    dtypes = (torch.bfloat16, torch.float32) if amp else (torch.float32,)
    peaks = {}
    for dtype in dtypes:
        log.info("timing %s matmuls up to %d^3 for the peak rate", dtype_name(dtype), max_size)
        if fixed:
            gflops = matmul_peak_gflops(device, dtype, size=max_size)
            peaks[dtype_name(dtype)] = MatmulPeak(gflops, max_size, dtype)
        else:
            peaks[dtype_name(dtype)] = matmul_peak(device, dtype, max_size)
    return max(peaks.values(), key=lambda peak: peak.gflops), peaks


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
