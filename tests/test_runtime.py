"""Where and how computation runs, checked on the CPU."""

import contextlib
import io
import platform

import pytest
import torch
from tqdm import tqdm

from dsmae.config import ConfigError
from dsmae.runtime import (
    autocast,
    generator,
    keep_freed_memory,
    progress,
    resolve_device,
    synchronize,
    use_amp,
    use_compile,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_resolve_device_takes_names_as_given_and_auto_as_what_is_there():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device() == torch.device(expected)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_resolve_device_refuses_unknown_names(name):
    with pytest.raises(ConfigError, match="is not one of: auto, cpu, cuda, cuda:N, mps"):
        resolve_device(name)


def test_resolve_device_refuses_cuda_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="this machine has 2 GPU"):
        resolve_device("cuda:2")


def test_amp_and_compile_default_to_on_for_cuda_only():
    for choose in (use_amp, use_compile):
        assert choose(CUDA, None) is True and choose(CPU, None) is False
        assert choose(CPU, True) is True and choose(CUDA, False) is False


def test_autocast_runs_in_bf16_only_when_enabled():
    x = torch.randn(4, 4)
    with autocast(CPU, True):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(CPU, False):
        assert (x @ x).dtype == torch.float32
    assert isinstance(autocast(CPU, False), contextlib.nullcontext)


def test_generator_is_seeded_on_its_device():
    a, b = generator(7), generator(7, "cpu")
    assert a.device == CPU and a.initial_seed() == 7
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert not torch.equal(torch.rand(5, generator=generator(8)), torch.rand(5, generator=b))


def test_synchronize_on_the_cpu_waits_for_nothing(monkeypatch):
    def fail(*args):
        raise AssertionError("no CUDA or MPS synchronisation on the CPU")

    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    monkeypatch.setattr(torch.mps, "synchronize", fail)
    synchronize(CPU)


def test_synchronize_waits_for_the_device_it_is_given(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    synchronize(CUDA)
    synchronize(torch.device("mps"))
    assert calls == [("cuda", CUDA), ("mps", None)]


def test_progress_is_silent_off_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    bar = progress(100, "pretrain")
    assert isinstance(bar, tqdm) and bar.disable and bar.total == 100
    bar.close()


def _terminal(monkeypatch) -> io.StringIO:
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", terminal)
    return terminal


def test_progress_counts_images_on_a_terminal(monkeypatch):
    terminal = _terminal(monkeypatch)
    with progress(2048, "pretrain") as bar:
        assert (bar.desc, bar.unit, bar.unit_scale, bar.disable) == ("pretrain", "img", True, False)
        bar.update(2048)
    assert "pretrain" in terminal.getvalue() and "2.05k/2.05k" in terminal.getvalue()


def test_progress_takes_another_unit_and_can_be_disabled(monkeypatch):
    terminal = _terminal(monkeypatch)
    with progress(10, "probe", unit="step") as bar:
        bar.update(10)
    assert "10.0/10.0" in terminal.getvalue() and "step/s" in terminal.getvalue()
    assert progress(10, "probe", disable=True).disable


def test_keep_freed_memory_applies_on_glibc():
    applied = keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
    else:
        assert not applied
