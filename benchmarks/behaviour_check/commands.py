"""The fixed table of commands a snapshot runs, each as a user runs it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FORMAT = 1


SNAPSHOT_FILE = "behaviour.json"


OUT_MARK, SRC_MARK, PYTHON_MARK = "<OUT>", "<SRC>", "<PYTHON>"


RUN_ID_MARK = "<run_id>"


# the tiny model and run every command shares: seconds on one core
TINY = (
    "--preset", "quickstart", "--device", "cpu", "--epochs", "3",
    "--set", "model.depth=2", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
    "--set", "model.decoder_depth=1", "--set", "model.decoder_dim=32",
    "--set", "model.decoder_heads=2", "--set", "model.regressor_depth=1",
    "--set", "data.subset=256", "--set", "data.workers=0", "--set", "train.warmup_epochs=1",
    "--set", "train.checkpoint_every=1", "--set", "monitor.knn_every=2",
    "--set", "monitor.images_every=2", "--set", "probe.epochs=3",
    "--set", "probe.warmup_epochs=1", "--set", "finetune.workers=0",
    # the quickstart recipe and MLP of before issue 21, which that issue changed: what is
    # checked here is the code, on the same recipe before and after
    "--set", "train.base_lr=3e-3", "--set", "train.ema_every=epoch",
    "--set", "model.mlp_ratio=4",
)  # fmt: skip


EMA_EVERY_STEP = ("--set", "train.ema_every=step")


METHODS = ("dsmae", "dsmae-ly", "dsmae-lz", "mae")


EVALUATED = ("dsmae", "mae")  # the methods every other command runs on


RESUMED = ("dsmae", "mae")  # the methods whose epoch-1 checkpoint is kept for `resume`


# (name, arguments, outputs) of every command on a pre-trained method: {run} is its run
# folder, {m} the method; the outputs are recorded right after the command
EVALUATIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("linprobe-fast", ("linprobe", "--checkpoint", "{run}/last.pt", "--device", "cpu",
                       "--recipe", "fast", "--epochs", "3"), ("{run}/last.linprobe.json",)),
    ("linprobe-mae", ("linprobe", "--checkpoint", "{run}/last.pt", "--device", "cpu",
                      "--recipe", "mae", "--epochs", "2"), ("{run}/last.linprobe.json",)),
    ("knn", ("knn", "--checkpoint", "{run}/last.pt", "--device", "cpu"), ("{run}/last.knn.json",)),
    ("finetune", ("finetune", "--checkpoint", "{run}/last.pt", "--device", "cpu", "--epochs",
                  "1", "--set", "finetune.workers=0", "--out", "finetune/{m}"),
     ("{run}/last.finetune.json", "finetune/{m}")),
    ("denoise", ("denoise", "--checkpoint", "{run}/last.pt", "--device", "cpu", "--out",
                 "figures/{m}-denoise.png", "images/denoise/a.png", "images/denoise/b.png"),
     ("figures/{m}-denoise.png",)),
    ("export", ("export", "--checkpoint", "{run}/last.pt", "--out", "exports/{m}"),
     ("exports/{m}",)),
    ("features", ("features", "--checkpoint", "{run}/last.pt", "--device", "cpu", "--data",
                  "images/features", "--out", "features/{m}.npy"),
     ("features/{m}.npy", "features/{m}.files.txt")),
    ("plot", ("plot", "plot-runs/{m}", "--out", "figures/{m}-curves.png"),
     ("figures/{m}-curves.png",)),
)  # fmt: skip


# the plot draws images/s: it draws a copy of the run's metrics with their timing frozen
FROZEN_RUNS = {"plot": ("{run}", "plot-runs/{m}")}


ONNX_EXPORT = ("export-onnx", ("export", "--checkpoint", "{run}/last.pt", "--onnx", "--out",
                               "exports/{m}-onnx"), ("exports/{m}-onnx",))  # fmt: skip


EXPERIMENT = (
    "experiment", "table3", "--device", "cpu", "--datasets", "cifar10", "--archs", "vit_tiny",
    "--epochs", "1", "--subset", "64", "--probe-epochs", "3",
    "--data", "cifar10=images/experiment", "--results", "experiment",
    "--set", "model.img_size=8", "--set", "model.patch_size=2", "--set", "model.in_chans=1",
    "--set", "model.depth=1", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
    "--set", "model.decoder_depth=1", "--set", "model.decoder_dim=32",
    "--set", "model.decoder_heads=2", "--set", "model.regressor_depth=1",
    "--set", "train.batch_size=32", "--set", "train.warmup_epochs=0",
    "--set", "monitor.knn_every=0", "--set", "monitor.images_every=0", "--set", "data.workers=0",
)  # fmt: skip


BENCH = (
    "bench", "--device", "cpu", "--method", "dsmae", "--arch", "vit_tiny", "--img-size", "8",
    "--patch-size", "2", "--in-chans", "1", "--batch-size", "8", "--steps", "1", "--warmup",
    "1", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
    "--set", "model.decoder_depth=1", "--json",
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One ``python -m dsmae ARGS`` run in the snapshot folder, and the files or folders
    (relative to it) recorded right after it."""

    name: str
    args: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    frozen_run: tuple[str, str] = ()  # (run folder, copy): its metrics, timing frozen


def pretrain_args(method: str, *extra: str, out: str = "") -> tuple[str, ...]:
    """The ``dsmae`` arguments of the tiny pre-training of ``method`` (with ``extra``
    arguments) into ``out`` (default ``runs/METHOD``)."""
    return ("pretrain", *TINY, *extra, "--method", method, "--out", out or f"runs/{method}")


def snapshot_steps(presets: Sequence[str], onnx: bool) -> list[Step]:
    """Every command of a snapshot, in order: ``presets`` are the shipped presets' names,
    ``onnx`` whether ``export --onnx`` can run."""
    steps = [Step("print-config/(none)", ("pretrain", "--print-config"))]
    steps += [Step(f"print-config/{p}", ("pretrain", "--preset", p, "--print-config"))
              for p in presets]  # fmt: skip
    steps += [Step(f"{m}/pretrain", pretrain_args(m), (f"runs/{m}",)) for m in METHODS]
    # the teacher moved every step (the quickstart's since issue 21), not per epoch
    every_step = pretrain_args("dsmae", *EMA_EVERY_STEP, out="runs/dsmae-ema-step")
    steps.append(Step("dsmae/pretrain-ema-every-step", every_step, ("runs/dsmae-ema-step",)))
    evaluations = [*EVALUATIONS, ONNX_EXPORT] if onnx else list(EVALUATIONS)
    for method in EVALUATED:
        for name, args, outputs in evaluations:
            fill = {"run": f"runs/{method}", "m": method}
            frozen = tuple(f.format(**fill) for f in FROZEN_RUNS.get(name, ()))
            steps.append(Step(f"{method}/{name}", tuple(a.format(**fill) for a in args),
                              tuple(o.format(**fill) for o in outputs), frozen))  # fmt: skip
    steps.append(Step("experiment", EXPERIMENT, ("experiment",)))
    steps.append(Step("bench", BENCH))
    return steps
