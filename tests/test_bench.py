"""``dsmae bench``: step timing, the command end to end, its report (FLOP counts against a
hand count: ``test_flops.py``)."""

import json

import pytest
import torch

from dsmae import bench
from dsmae.bench import PARTS, bench_step, matmul_peak_gflops, time_calls
from dsmae.cli import main
from dsmae.config import build_config
from dsmae.engine import build_optimizer

SHAPE = ("arch", "img_size", "patch_size", "in_chans")  # the model options bench takes as flags


@pytest.fixture
def bench_args(counted_tiny) -> list[str]:
    """The counted model as ``dsmae bench`` arguments (its shape as flags, the rest as
    ``--set``), on the CPU."""
    options = counted_tiny.options
    flags = [arg for key in SHAPE for arg in (f"--{key.replace('_', '-')}", str(options[key]))]
    sets = [a for k, v in options.items() if k not in SHAPE for a in ("--set", f"model.{k}={v}")]
    return [*flags, *sets, "--device", "cpu"]


def test_matmul_peak_and_step_timing(counted_tiny):
    peak = matmul_peak_gflops(torch.device("cpu"), torch.float32, size=128, repeats=1)
    assert peak > 0
    model = counted_tiny.build("dsmae")
    overrides = {f"model.{k}": v for k, v in counted_tiny.options.items()}
    cfg = build_config(overrides={**overrides, "train.batch_size": 4, "train.ema_every": "step",
                                  "data.mean": [0.5], "data.std": [0.25]})  # fmt: skip
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    teacher_before = next(model.teacher.parameters()).clone()
    data = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    step = bench_step(model, optimizer, data, cfg)
    images, corruption = step.inputs(0)
    assert images.shape == (4, 1, 8, 8) and corruption.mask.shape == (4, 16)
    times, first = time_calls(step.run, torch.device("cpu"), steps=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times) and first > 0
    assert not torch.equal(next(model.teacher.parameters()), teacher_before)  # EMA ran
    assert time_calls(step.inputs, torch.device("cpu"), steps=1, warmup=0)[1] is None


def test_bench_json_end_to_end(capsys, monkeypatch, counted_tiny, bench_args):
    assert bench.MATMUL_SIZE == 4096  # what the command uses
    monkeypatch.setattr(bench, "MATMUL_SIZE", 256)  # quick here
    args = ["bench", "--method", "dsmae", *bench_args, "--batch-size", "4"]
    assert main([*args, "--steps", "2", "--warmup", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    keys = {
        "method", "arch", "img_size", "patch_size", "batch_size", "device", "dtype", "torch",
        "img_per_s", "step_ms", "peak_mem_mb", "gflop_per_img", "parts", "achieved_gflops",
        "matmul_peak_gflops", "mfu",
    }  # fmt: skip
    assert keys <= set(r)
    assert set(r["parts"]) == set(PARTS)
    assert (r["method"], r["arch"], r["img_size"], r["patch_size"], r["batch_size"]) == (
        "dsmae",
        "vit_tiny",
        8,
        2,
        4,
    )
    assert r["dtype"] == "float32" and r["torch"] == torch.__version__
    assert r["device"] and r["matmul_size"] == 256
    for key in ("img_per_s", "step_ms", "peak_mem_mb", "gflop_per_img", "achieved_gflops"):
        assert r[key] > 0, key
    assert r["matmul_peak_gflops"] > 0 and r["mfu"] > 0
    assert all(v > 0 for v in r["parts"].values())
    assert r["gflop_per_img"] == pytest.approx(counted_tiny.dsmae_flops / 1e9, rel=1e-12)
    assert r["gflop_per_img"] == pytest.approx(sum(r["parts"].values()), rel=1e-12)
    assert r["mfu"] == pytest.approx(r["achieved_gflops"] / r["matmul_peak_gflops"], rel=1e-12)
    assert r["achieved_gflops"] == pytest.approx(r["gflop_per_img"] * r["img_per_s"], rel=1e-12)
    assert r["img_per_s"] == pytest.approx(4 / (r["step_ms"] / 1000), rel=1e-12)
    # the data part (gather, augmentation, draws) is timed alone; no compile on CPU
    assert r["data_ms"] > 0 and r["data_share"] == pytest.approx(r["data_ms"] / r["step_ms"])
    assert r["compile"] is False and r["compile_s"] is None and r["host_syncs_per_step"] is None


def test_bench_compiled_reports_the_compilation_apart(capsys, monkeypatch, bench_args):
    monkeypatch.setattr(bench, "MATMUL_SIZE", 64)
    args = ["bench", "--method", "dsmae-ly", *bench_args, "--batch-size", "2", "--steps", "1"]
    assert main([*args, "--warmup", "0", "--compile", "--json",
                 "--set", "train.compile_scope=blocks"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    assert r["compile"] is True and r["compile_scope"] == "blocks"
    assert r["warmup"] == 1 and r["compile_s"] > 0  # the compiling step is never timed


@pytest.mark.parametrize("method", ["mae", "dsmae-ly", "dsmae-lz"])
def test_bench_table_and_absent_parts(capsys, monkeypatch, method, bench_args):
    monkeypatch.setattr(bench, "MATMUL_SIZE", 64)
    args = ["bench", "--method", method, *bench_args, "--batch-size", "2", "--steps", "1"]
    assert main([*args, "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    for text in ("img/s", "peak memory", "GFLOP/s", "MFU", "teacher_fwd", "float32"):
        assert text in table
    assert main([*args, "--warmup", "0", "--json"]) == 0
    parts = json.loads(capsys.readouterr().out)["parts"]
    if method in ("mae", "dsmae-ly"):
        assert parts["teacher_fwd"] == 0 and parts["regressor_fwd_bwd"] == 0
    else:
        assert parts["decoder_fwd_bwd"] == 0
    assert parts["student_fwd_bwd"] > 0


def test_bench_refuses_bad_settings(capsys, bench_args):
    args = ["bench", "--method", "dsmae", *bench_args, "--batch-size", "2"]
    assert main([*args, "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main([*args, "--set", "model.nope=1"]) == 2


def test_each_part_is_timed_alone(capsys, monkeypatch, bench_args):
    monkeypatch.setattr(bench, "MATMUL_SIZE", 64)
    args = ["bench", "--method", "dsmae", *bench_args, "--batch-size", "2", "--steps", "2"]
    assert main([*args, "--warmup", "0", "--parts", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["parts_ms"]) == set(PARTS) and all(v > 0 for v in r["parts_ms"].values())
    assert r["sum_parts_ms"] == pytest.approx(sum(r["parts_ms"].values()))
    assert r["overhead_vs_parts"] == pytest.approx(r["step_ms"] / r["sum_parts_ms"] - 1)
    for name, ms in r["parts_ms"].items():  # each part's MFU from its own FLOPs and time
        rate = r["parts"][name] * 2 / (ms / 1e3)
        assert r["parts_mfu"][name] == pytest.approx(rate / r["matmul_peak_gflops"])
    assert main([*args, "--warmup", "0", "--parts"]) == 0
    table = capsys.readouterr().out
    assert "each part alone" in table and "step over its parts" in table


def test_mae_parts_timed_alone_leave_out_what_it_lacks(counted_tiny):
    model = counted_tiny.build("mae")
    mask, _ = model.sample_corruption(2, torch.Generator().manual_seed(0))
    seconds = bench.time_parts(model, torch.randn(2, 1, 8, 8), mask, steps=1, warmup=0)
    assert seconds["teacher_fwd"] == 0 and seconds["regressor_fwd_bwd"] == 0
    assert seconds["student_fwd_bwd"] > 0 and seconds["decoder_fwd_bwd"] > 0
    assert all(p.grad is None for p in model.parameters())  # cleared after each run


def test_host_syncs_name_the_line_that_waits(monkeypatch):
    """The CUDA sync debug mode warns from inside torch; the report names our line."""
    import warnings

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def step():
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # e.g. .item()

    sites = bench.host_syncs(step, torch.device("cuda"))
    line = step.__code__.co_firstlineno + 1
    assert sites == [f"{__file__}:{line}"]
    assert bench.host_syncs(lambda: None, torch.device("cuda")) == []
    assert bench.host_syncs(step, torch.device("cpu")) is None
