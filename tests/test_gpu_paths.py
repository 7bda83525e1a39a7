"""The GPU code paths, proven on the CPU: every command with bf16 autocast and
``torch.compile`` on, for each method, against the same command in fp32 eager.

GPU time is rare, so what a GPU run does by default (bf16 autocast, a compiled step) runs
here first, tiny. Compiled steps use the ``aot_eager`` backend (``train.compile_backend``):
Dynamo's tracing, guards and graph breaks and AOTAutograd's joint forward/backward graph
are those Inductor gets on a GPU, at a fraction of a CPU compilation's time; the GPU's
default step (dsmae, bf16, one graph) compiles with Inductor itself in ``test_bench.py``.
The tolerances below are bf16's: 8 bits of mantissa give each rounding a relative error
of up to 2**-8, and a few training steps compound them.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from saved_results import latest_result
from torch._dynamo.utils import counters

from dsmae import matmul_peak
from dsmae.cli import main

METHODS = ("dsmae", "dsmae-ly", "dsmae-lz", "mae")
SCOPES = ("model", "blocks")
# fine-tuning sees only the encoder, a timm ViT of the same shape whatever the method:
# one method of each regime (a denoising student with a teacher; MAE's masked student)
ENCODER_REGIMES = ("dsmae", "mae")
# a bf16 loss against fp32's after the same steps: measured at most 0.10% over the tiny
# run's 8 steps, for every method and both scopes
LOSS_REL = 0.01
TOP1_POINTS = 5.0  # a top-1 (%) on the 449 test digits: a few images may change sides
FEATURE_REL = 0.05  # features of bf16-trained weights: max |difference| / max |feature|
AOT_EAGER = ("--set", "train.compile_backend=aot_eager")
# how many graphs the blocks scope compiles for the tiny run (the first epoch's; never more
# later): the blocks of the student, then at other sequence lengths (the teacher's and the
# heads' tokens), without gradients (the teacher), without autocast (the monitors), with
# gradients in eval mode without autocast (the gradient-share monitor) and with frozen
# parameters (the teacher's blocks)
BLOCK_GRAPHS = {"dsmae": 6, "dsmae-ly": 4, "dsmae-lz": 6, "mae": 4}


def _bf16_compiled(scope: str) -> list[str]:
    return ["--set", "train.amp=true", "--set", "train.compile=true",
            "--set", f"train.compile_scope={scope}", *AOT_EAGER]  # fmt: skip


def _losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [line["loss"] for line in lines if "loss" in line]


def _pretrain(tiny_run, out: Path, method: str, *extra: str) -> Path:
    """The tiny run of ``method`` with every monitor on each epoch, into ``out``."""
    monitors = ["--set", "monitor.knn_every=1", "--set", "monitor.every=1",
                "--set", "monitor.images_every=1"]  # fmt: skip
    args = tiny_run.args("--method", method, *monitors, *extra, "--out", str(out))
    assert main(args) == 0
    return out


@dataclass
class Compiled:
    """What Dynamo did during one run: graph breaks, frames compiled, graphs made, and the
    graphs made by the end of each epoch."""

    graph_breaks: dict[str, int]
    frames: int
    graphs: int
    graphs_by_epoch: list[int]


def _watched(tiny_run, out: Path, method: str, *extra: str) -> Compiled:
    """:func:`_pretrain` from a fresh Dynamo, counting what it compiles."""
    from dsmae.pretrain import loop

    torch._dynamo.reset()
    counters.clear()
    by_epoch: list[int] = []
    end_of_epoch = loop._end_of_epoch

    def counted(*args, **kwargs):
        end_of_epoch(*args, **kwargs)
        by_epoch.append(counters["stats"]["unique_graphs"])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "_end_of_epoch", counted)
        _pretrain(tiny_run, out, method, *extra)
    stats = counters["stats"]
    breaks = dict(counters["graph_break"])
    return Compiled(breaks, counters["frames"]["total"], stats["unique_graphs"], by_epoch)


@dataclass
class Runs:
    """A method's tiny run in fp32 eager and in bf16 compiled as one graph."""

    fp32: Path
    bf16: Path
    compiled: Compiled


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run) -> dict[str, Runs]:
    """method -> its :class:`Runs`, trained once for the module."""
    root, found = tmp_path_factory.mktemp("gpu-paths"), {}
    for method in METHODS:
        fp32 = _pretrain(tiny_run, root / f"{method}-fp32", method)
        bf16 = root / f"{method}-bf16"
        compiled = _watched(tiny_run, bf16, method, *_bf16_compiled("model"))
        found[method] = Runs(fp32, bf16, compiled)
    return found


# ----------------------------------------------------------------------------- pretrain


@pytest.mark.parametrize("method", METHODS)
def test_pretrain_in_bf16_compiled_as_one_graph_matches_fp32(runs, method):
    fp32, bf16 = _losses(runs[method].fp32), _losses(runs[method].bf16)
    assert len(bf16) == len(fp32) == 8  # 2 epochs of 4 steps, every step logged
    assert bf16 == pytest.approx(fp32, rel=LOSS_REL)
    assert bf16 != fp32  # autocast really ran in bf16
    config = (runs[method].bf16 / "config.yaml").read_text()
    assert "compile: true" in config and "amp: true" in config


@pytest.mark.parametrize("method", METHODS)
def test_the_compiled_model_has_no_graph_break_and_never_recompiles(runs, method):
    compiled = runs[method].compiled
    assert compiled.graph_breaks == {}
    # one frame compiled once, at the first step: every later step, the monitors' passes
    # (on the model itself) and the checkpoints reuse it
    assert (compiled.frames, compiled.graphs, compiled.graphs_by_epoch) == (1, 1, [1, 1])


@pytest.mark.parametrize("method", METHODS)
def test_compiled_blocks_compile_a_bounded_number_of_graphs(runs, tiny_run, tmp_path, method):
    compiled = _watched(tiny_run, tmp_path / "run", method, *_bf16_compiled("blocks"))
    assert compiled.graph_breaks == {}
    assert compiled.graphs_by_epoch == [BLOCK_GRAPHS[method]] * 2  # none after the first epoch
    assert _losses(tmp_path / "run") == pytest.approx(_losses(runs[method].fp32), rel=LOSS_REL)


# ----------------------------------------------------------------------------- evaluation


def _result(run: Path, name: str) -> dict:
    """The newest result of ``name`` (results of other settings are kept side by side)."""
    return latest_result(run, f"last.{name}")


def _top1s(run: Path) -> dict[str, float]:
    """The top-1 of both linear-probe recipes and of k-NN, by the commands, on ``run``."""
    checkpoint, top1 = str(run / "last.pt"), {}
    for recipe, epochs in (("fast", "5"), ("mae", "2")):
        args = ["linprobe", "--checkpoint", checkpoint, "--recipe", recipe, "--epochs", epochs]
        assert main(args) == 0
        top1[recipe] = _result(run, "linprobe")["top1"]
    assert main(["knn", "--checkpoint", checkpoint]) == 0
    return {**top1, "knn": _result(run, "knn")["top1"]}


@pytest.mark.parametrize("method", METHODS)
def test_probes_and_knn_of_a_bf16_compiled_run_match_fp32(runs, method):
    fp32, bf16 = _top1s(runs[method].fp32), _top1s(runs[method].bf16)
    for name, top1 in fp32.items():
        assert abs(bf16[name] - top1) <= TOP1_POINTS, name


def _digit_images(folder: Path, n: int = 12) -> list[Path]:
    """``n`` real digits (scikit-learn's) as 8x8 grey PNGs in ``folder``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir()
    paths = []
    for i, image in enumerate(load_digits().images[:n]):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(paths[-1])
    return paths


@pytest.mark.parametrize("method", METHODS)
def test_features_export_and_denoise_of_a_bf16_compiled_run(runs, method, tmp_path):
    images = _digit_images(tmp_path / "digits")
    feats = {}
    for label, run in (("fp32", runs[method].fp32), ("bf16", runs[method].bf16)):
        checkpoint = str(run / "last.pt")
        out = tmp_path / f"{label}.npy"
        args = ["features", "--checkpoint", checkpoint, "--data", str(images[0].parent)]
        assert main([*args, "--out", str(out)]) == 0
        feats[label] = np.load(out)
        export = tmp_path / f"export-{label}"
        assert main(["export", "--checkpoint", checkpoint, "--out", str(export), "--onnx"]) == 0
        assert (export / "encoder.onnx").is_file()
        if method != "dsmae-lz":  # which has no pixel decoder to denoise with
            denoised = tmp_path / f"{label}.png"
            args = ["denoise", "--checkpoint", checkpoint, "--out", str(denoised)]
            assert main([*args, *map(str, images)]) == 0 and denoised.is_file()
    scale = np.abs(feats["fp32"]).max()
    assert np.abs(feats["bf16"] - feats["fp32"]).max() <= FEATURE_REL * scale


@pytest.mark.parametrize("method", ENCODER_REGIMES)
def test_finetune_in_bf16_compiled_both_scopes_matches_fp32(runs, method, tmp_path, caplog):
    fp32_run = runs[method].fp32
    common = ["finetune", "--checkpoint", str(fp32_run / "last.pt"), "--epochs", "2",
              "--batch-size", "32", "--set", "finetune.warmup_epochs=1",
              "--set", "finetune.workers=0"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "fp32")]) == 0
    fp32 = _result(fp32_run, "finetune")
    for scope in SCOPES:
        caplog.clear()
        out = tmp_path / scope
        with caplog.at_level("INFO"):
            assert main([*common, "--out", str(out), *_bf16_compiled(scope)]) == 0
        assert f"fine-tuning with torch.compile ({scope})" in caplog.text
        assert abs(_result(fp32_run, "finetune")["top1"] - fp32["top1"]) <= TOP1_POINTS
        assert _losses(out) == pytest.approx(_losses(tmp_path / "fp32"), rel=LOSS_REL)


# ----------------------------------------------------------------------------- bench, experiment


@pytest.mark.parametrize(("method", "scope"), [("dsmae", "blocks"), ("mae", "model")])
def test_bench_in_bf16_compiled(method, scope, bench_args, capsys, monkeypatch):
    # the third case, dsmae compiled as one graph, runs with Inductor in test_bench.py
    monkeypatch.setattr(matmul_peak, "PEAK_SECONDS", 0.2)
    args = ["bench", "--method", method, *bench_args, "--batch-size", "2", "--steps", "1",
            "--warmup", "0", "--json", *_bf16_compiled(scope)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["dtype"], r["compile_scope"]) == ("bfloat16", scope)
    assert r["compile_backend"] == "aot_eager"
    assert r["compile_s"] > 0 and r["img_per_s"] > 0
    assert set(r["matmul_peaks"]) == {"bfloat16", "float32"}
    fastest = max(peak["gflops"] for peak in r["matmul_peaks"].values())
    assert r["matmul_peak_gflops"] == fastest and 0 < r["mfu"] <= 1


def _table3(cifar_folder: Path, results: Path, tiny_run, *extra: str) -> dict[str, float]:
    """A one-epoch table 3 on real CIFAR-10: method -> its linear-probe top-1."""
    command = [
        "experiment", "table3", "--datasets", "cifar10", "--archs", "vit_tiny",
        "--epochs", "1", "--subset", "64", "--probe-epochs", "2",
        "--data", f"cifar10={cifar_folder}", "--results", str(results),
        *tiny_run.model_args, "--set", "model.patch_size=8", "--set", "train.batch_size=32",
        "--set", "monitor.knn_every=0", "--set", "monitor.images_every=0", "--device", "cpu",
        *extra,
    ]  # fmt: skip
    assert main(command) == 0
    rows = (results / "table3.csv").read_text().splitlines()[1:]
    return {row.split(",")[2]: float(row.split(",")[4]) for row in rows}


def test_experiment_in_bf16_compiled_matches_fp32(cifar_folder, tmp_path, tiny_run):
    fp32 = _table3(cifar_folder, tmp_path / "fp32", tiny_run)
    bf16 = _table3(cifar_folder, tmp_path / "bf16", tiny_run, *_bf16_compiled("model"))
    assert set(bf16) == set(fp32) == {"dsmae", "dsmae-ly", "dsmae-lz"}
    for method, top1 in fp32.items():
        assert abs(bf16[method] - top1) <= TOP1_POINTS, method


# ----------------------------------------------------------------------------- speed switches

SWITCHES = ("train.bf16_residual=true", "train.fast_norm=true", "train.attention=math",
            "train.attention=flash")  # fmt: skip


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_speed_switch_trains_within_bf16_noise_as_one_graph(runs, tiny_run, tmp_path, switch):
    extra = [*_bf16_compiled("model"), "--set", switch]
    compiled = _watched(tiny_run, tmp_path / "run", "dsmae", *extra)
    assert compiled.graph_breaks == {} and compiled.graphs == 1
    assert _losses(tmp_path / "run") == pytest.approx(_losses(runs["dsmae"].fp32), rel=LOSS_REL)
    assert f"{switch.split('=')[0].split('.')[1]}: " in (tmp_path / "run/config.yaml").read_text()


def test_a_kernel_or_backend_the_machine_lacks_is_refused_by_name(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_run.args("--set", "train.attention=efficient", "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert "train.attention='efficient' needs CUDA; on cpu use one of: auto, flash, math" in err
    assert not out.exists()  # refused before the folder is made
    assert main(tiny_run.args("--set", "train.attention=fast", "--out", str(out))) == 2
    assert "train.attention='fast' is not one of: auto, flash, efficient, cudnn, math" in (
        capsys.readouterr().err
    )
    compiled = ["--set", "train.compile=true", "--set", "train.compile_backend=tensorrt_nope"]
    assert main(tiny_run.args(*compiled, "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert "train.compile_backend='tensorrt_nope' is not one of this torch's backends:" in err
    assert "aot_eager" in err and "inductor" in err
    assert not out.exists()  # refused before the folder is made, as the kernel
