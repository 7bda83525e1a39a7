"""``dsmae bench``: step timing, the command end to end, its report (FLOP counts against a
hand count: ``test_flops.py``)."""

import json

import pytest
import torch

from dsmae import bench
from dsmae.bench import PARTS, prepare, time_calls
from dsmae.cli import main
from dsmae.config import build_config
from dsmae.pretrain import step as pretrain_step
from dsmae.pretrain.step import PretrainStep


def test_step_timing(counted_tiny, monkeypatch):
    orders = []  # the epoch orders made: each is moved to the device, a wait on a GPU
    real_order = pretrain_step.epoch_order
    monkeypatch.setattr(pretrain_step, "epoch_order", lambda *a: orders.append(a) or real_order(*a))
    overrides = {f"model.{k}": v for k, v in counted_tiny.options.items()}
    cfg = build_config(overrides={**overrides, "train.batch_size": 4, "train.ema_every": "step",
                                  "train.device": "cpu", "train.compile": False})  # fmt: skip
    setup = prepare(cfg, warmup=1)
    step, model = setup.step, setup.model
    assert isinstance(step.take_step, PretrainStep)  # pre-training's own step, not a copy
    teacher_before = next(model.teacher.parameters()).clone()
    images, corruption = step.inputs(0)
    assert images.shape == (4, 1, 8, 8) and corruption.mask.shape == (4, 16)
    times, first = time_calls(step.run, torch.device("cpu"), steps=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times) and first > 0
    assert not torch.equal(next(model.teacher.parameters()), teacher_before)  # EMA ran
    assert time_calls(step.inputs, torch.device("cpu"), steps=1, warmup=0)[1] is None
    assert len(orders) == 1  # made once, at set-up: never inside a timed step


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
    assert r["device"] and r["matmul_size"] in (128, 256) and r["matmul_dtype"] == "float32"
    assert r["matmul_peaks"] == {"float32": {"gflops": r["matmul_peak_gflops"],
                                             "size": r["matmul_size"]}}  # fmt: skip
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
    # the GPU's default step, with Inductor itself (the GPU-path tests use aot_eager)
    monkeypatch.setattr(bench, "MATMUL_SIZE", 64)
    args = ["bench", "--method", "dsmae", *bench_args, "--batch-size", "2", "--steps", "1"]
    assert main([*args, "--warmup", "0", "--compile", "--json", "--set", "train.amp=true"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["compile"] is True and r["compile_scope"] == "model" and r["dtype"] == "bfloat16"
    assert (r["compile_backend"], r["compile_mode"]) == ("inductor", "default")
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


def test_a_profile_writes_the_trace_and_says_where_the_time_goes(capsys, tmp_path, bench_args):
    trace = tmp_path / "trace.json"
    args = ["bench", "--method", "dsmae", *bench_args, "--batch-size", "2", "--steps", "1",
            "--warmup", "0", "--profile", str(trace)]  # fmt: skip
    assert main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["profile_trace"] == str(trace) and json.loads(trace.read_text())["traceEvents"]
    top = r["profile_top"]
    assert 0 < len(top) <= bench.PROFILE_TOP and any(e["op"] == "aten::mm" for e in top)
    assert all(e["ms_per_step"] >= 0 and 0 <= e["share"] <= 1 for e in top)
    assert sum(e["share"] for e in top) <= 1 + 1e-9
    assert main(args) == 0
    assert "where the time goes" in capsys.readouterr().out
    bad = ["bench", "--method", "dsmae", *bench_args, "--batch-size", "2", "--profile",
           str(tmp_path)]  # fmt: skip
    assert main(bad) == 2
    assert f"--profile {tmp_path} is a folder; give a file name" in capsys.readouterr().err
