"""The peak matmul rate, MFU's denominator: bounded in time, the faster dtype of a step."""

import time

import torch

from dsmae import matmul_peak
from dsmae.matmul_peak import matmul_peak_gflops


def test_a_matmul_rate_is_measured():
    assert matmul_peak_gflops(torch.device("cpu"), torch.float32, size=128, repeats=1) > 0


def test_the_peak_search_stops_in_time_and_keeps_the_best_size(monkeypatch):
    timed = []

    def slow_matmul(device, dtype, size):  # 1 ms at side 128, x8 per doubling
        timed.append(size)
        time.sleep(1e-3 * (size / 128) ** 3)
        return {128: 5.0, 256: 9.0, 512: 7.0}.get(size, 1.0)

    monkeypatch.setattr(matmul_peak, "matmul_peak_gflops", slow_matmul)
    cpu = torch.device("cpu")
    # 128 (1 ms), 256 (8 ms), 512 (64 ms); 1024 would take 512 ms, past the 0.3 s
    peak = matmul_peak.matmul_peak(cpu, torch.bfloat16, max_size=4096, seconds=0.3)
    assert timed == [128, 256, 512] and (peak.gflops, peak.size) == (9.0, 256)
    timed.clear()
    assert matmul_peak.matmul_peak(cpu, torch.float32, max_size=64).size == 64 and timed == [64]


def test_a_bf16_step_is_measured_against_the_faster_of_its_dtypes(monkeypatch):
    rates = {torch.bfloat16: 2.5, torch.float32: 120.0}  # a CPU without bf16 units
    monkeypatch.setattr(matmul_peak, "matmul_peak_gflops", lambda device, dtype, size: rates[dtype])
    cpu = torch.device("cpu")
    peak, peaks = matmul_peak.step_peak(cpu, amp=True, max_size=128)
    assert set(peaks) == {"bfloat16", "float32"}
    assert (peak.gflops, peak.dtype) == (120.0, torch.float32)
    rates[torch.bfloat16] = 900.0  # a GPU: the tensor cores' bf16 peak
    assert matmul_peak.step_peak(cpu, amp=True, max_size=128)[0].dtype == torch.bfloat16
    peak, peaks = matmul_peak.step_peak(cpu, amp=False, max_size=64, fixed=True)
    assert list(peaks) == ["float32"] and peak.size == 64
