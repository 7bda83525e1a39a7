"""The equal-budget study: MAE, DSMAE, its two ablations and its teacher settings
pre-trained for the SAME wall-clock time on real CIFAR-10, then k-NN and linear-probe
top-1 on the test split and the representation's health.

    python benchmarks/equal_budget.py [--archive ../shared/data/cifar10-jpeg.tar.gz]
        [--minutes 11] [--subset 4000] [--variants ...] [--out runs/equal_budget]

Variants: ``mae``, ``dsmae-ly``, ``dsmae-lz``, ``dsmae`` (SPEC defaults: the teacher moves
once per epoch, its targets are layer-normed) and the teacher ablation of ``dsmae``:
``dsmae-step-none`` (the rhythm and targets before SPEC section 3 changed),
``dsmae-step-layernorm`` and ``dsmae-epoch-none``.

Each method's throughput is measured first (``dsmae bench``, same model, same batch); its
number of epochs is then the most that fits the budget, so every run completes its own
learning-rate and momentum schedule within the budget. Every variant is also evaluated at
the same number of epochs: the checkpoint after the epoch count the slowest variant
reached (its schedule not yet finished for the faster ones). The encoder at random
initialisation is the baseline. Results: ``<out>/results.json`` and a markdown table on
stdout (``benchmarks/RESULTS.md`` holds the one that was run).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
from runs import run_config, setting_values

from dsmae.bench import run_bench
from dsmae.checkpoint import load_checkpoint, load_weights
from dsmae.config import ProbeConfig, config_from_dict
from dsmae.data.pipeline import eval_batch, load_split
from dsmae.evaluation.frozen import pooled_features
from dsmae.evaluation.knn import knn_accuracy
from dsmae.evaluation.linprobe import train_linear_probe
from dsmae.export import encoder_from_checkpoint
from dsmae.health import effective_rank, feature_std, teacher_student_cosine
from dsmae.models import build_model, patch_tokens
from dsmae.pretrain import pretrain
from dsmae.runtime import generator, keep_freed_memory

log = logging.getLogger("equal_budget")
VARIANTS: dict[str, dict[str, Any]] = {
    "mae": {"model.method": "mae"},
    "dsmae-ly": {"model.method": "dsmae-ly"},
    "dsmae-lz": {"model.method": "dsmae-lz"},
    "dsmae": {"model.method": "dsmae"},  # ema_every epoch, target_norm layernorm
    "dsmae-step-none": {"train.ema_every": "step", "model.target_norm": "none"},
    "dsmae-step-layernorm": {"train.ema_every": "step", "model.target_norm": "layernorm"},
    "dsmae-epoch-none": {"train.ema_every": "epoch", "model.target_norm": "none"},
}
HEALTH_IMAGES = 256  # the fixed sample of pre-training images the health is measured on
# The model and its training: the CPU setting of the CIFAR-10 studies (a 6-block width-128
# ViT on 32x32 images in 4x4 patches, batch 128 in micro-batches of 32; runs.py); what this
# study adds: a checkpoint every epoch (for the same-epochs comparison), no monitors.
SETTING = "cifar-cpu"
STUDY = {
    "train.checkpoint_every": 1,
    "train.checkpoint_minutes": 0,
    "train.keep_checkpoints": 0,
    "train.log_every": 20,
    "monitor.knn_every": 0,
    "monitor.images_every": 0,
}
BATCH = setting_values(SETTING)["train.batch_size"]
IMG = setting_values(SETTING)["model.img_size"]


def study_config(**overrides: Any) -> Any:
    """A run of this study: the setting, :data:`STUDY`, then ``overrides`` (dotted)."""
    return run_config(SETTING, {**STUDY, **overrides})


def extract(archive: Path, cache: Path) -> Path:
    """The image folder of the CIFAR-10 archive, extracted once into ``cache``."""
    folder = cache / "cifar10"
    if not (folder / "test").is_dir():
        log.info("extracting %s into %s", archive, cache)
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    return folder


def epochs_in_budget(method: str, seconds: float, images: int) -> tuple[int, float]:
    """Epochs of ``images`` that ``method`` trains in ``seconds``, from a timed step."""
    values = setting_values(SETTING)
    shape = (values["model.img_size"], values["model.patch_size"], BATCH)
    model = {k: v for k, v in values.items() if k.startswith("model.")}
    micro = {"train.micro_batch": values["train.micro_batch"]}
    result = run_bench(
        method, "vit_tiny", *shape, steps=4, warmup=2, device="cpu", overrides={**model, **micro}
    )
    rate = result["img_per_s"]
    return max(1, int(0.95 * seconds * rate / images)), rate


@torch.no_grad()
def features(encoder: torch.nn.Module, images: torch.Tensor, mean: list, std: list) -> dict:
    """[CLS] and mean-of-patch-token features, (N, D) each, from one pass over the images."""
    encoder.eval()
    cls, avg = [], []
    for start in range(0, len(images), 512):
        x = eval_batch(images[start : start + 512], IMG, mean, std)
        cls.append(pooled_features(encoder, x, "cls"))
        avg.append(pooled_features(encoder, x, "avg"))
    return {"cls": torch.cat(cls), "avg": torch.cat(avg)}


def evaluate(
    checkpoint: Path, data: Any, random_init: bool = False, pools: tuple[str, ...] = ("avg", "cls")
) -> dict[str, float]:
    """k-NN (k=20) and linear-probe top-1 (%) of a checkpoint's encoder on each of
    ``pools``, trained on the full train split, tested on the test split."""
    encoder, cfg = encoder_from_checkpoint(checkpoint, random_init=random_init)
    train, test = data
    feats = [features(encoder, split.images, cfg.data.mean, cfg.data.std) for split in data]
    probe = ProbeConfig(epochs=30, warmup_epochs=3, batch_size=256)
    scores = {}
    for pool in pools:
        x_train, x_test = feats[0][pool], feats[1][pool]
        scores[f"knn_{pool}"] = knn_accuracy(x_train, train.labels, x_test, test.labels, 10)
        top1, _ = train_linear_probe(x_train, train.labels, x_test, test.labels, 10, probe)
        scores[f"linprobe_{pool}"] = top1
    return scores


@torch.no_grad()
def health(checkpoint: Path, images: torch.Tensor) -> dict[str, float]:
    """The representation's health at the end of a run (as the monitor logs it), on
    ``images`` ((M, C, H, W) uint8, a fixed sample of the pre-training images)."""
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg.model)
    load_weights(model, state["model"], str(checkpoint))
    model.eval()
    x = eval_batch(images, IMG, cfg.data.mean, cfg.data.std)
    student = patch_tokens(model.encoder, x).flatten(0, 1)  # (M * N, D)
    figures = {
        "feature_std": float(feature_std(student)),
        "effective_rank": float(effective_rank(student)),
    }
    if model.teacher is not None:
        teacher = patch_tokens(model.teacher, x).flatten(0, 1)
        figures["teacher_cosine"] = float(teacher_student_cosine(student, teacher))
    return figures


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive", type=Path, default=here.parent.parent / "shared/data/cifar10-jpeg.tar.gz"
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/dsmae/cifar10-jpeg")
    parser.add_argument("--minutes", type=float, default=11.0, help="budget per variant")
    parser.add_argument("--subset", type=int, default=4000, help="pre-training images")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("runs/equal_budget"))
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    keep_freed_memory()  # as the dsmae command does
    folder = extract(args.archive, args.cache)
    runs: dict[str, dict[str, Any]] = {}
    rates: dict[str, tuple[int, float]] = {}  # by method: the teacher settings cost the same
    for variant in args.variants:
        changes = VARIANTS[variant]
        method = changes.get("model.method", "dsmae")
        if method not in rates:
            rates[method] = epochs_in_budget(method, args.minutes * 60, args.subset)
        epochs, rate = rates[method]
        log.info("%s: %.1f img/s -> %d epochs of %d images", variant, rate, epochs, args.subset)
        cfg = study_config(
            **{"model.method": method, **changes, "data.source": str(folder),
               "data.subset": args.subset, "train.epochs": epochs, "out": str(args.out / variant)}
        )  # fmt: skip
        started = time.perf_counter()
        result = pretrain(cfg)
        runs[variant] = {
            "epochs": epochs,
            "ema_every": cfg.train.ema_every,
            "target_norm": cfg.model.target_norm,
            "bench_img_per_s": rate,
            "seconds": time.perf_counter() - started,
            "images_seen": epochs * (args.subset // BATCH) * BATCH,
            "last_loss": result.last_metrics.get("loss"),
        }

    probe_cfg = study_config(**{"data.source": str(folder)})
    data = tuple(load_split(probe_cfg.data, probe_cfg.model, s) for s in ("train", "test"))
    sample_cfg = study_config(**{"data.source": str(folder), "data.subset": args.subset})
    pretraining = load_split(sample_cfg.data, sample_cfg.model, "pretrain").images
    sample = pretraining[torch.randperm(len(pretraining), generator=generator(0))[:HEALTH_IMAGES]]
    same = min(r["epochs"] for r in runs.values())
    for variant, run in runs.items():
        out = args.out / variant
        run["budget"] = evaluate(out / "last.pt", data)
        run["health"] = health(out / "last.pt", sample)
        steps = same * (args.subset // BATCH)
        at_same = out / "last.pt" if run["epochs"] == same else out / f"checkpoint-{steps:08d}.pt"
        run["same_epochs"] = {"epochs": same, **evaluate(at_same, data, pools=("avg",))}
        log.info("%s: %s", variant, run)
    first = args.out / args.variants[0] / "last.pt"
    baseline = evaluate(first, data, random_init=True)
    report = {
        "minutes": args.minutes,
        "subset": args.subset,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "setting": setting_values(SETTING),
        "study": STUDY,
        "runs": runs,
        "random_init": baseline,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The study's table."""
    lines = [
        f"Budget {report['minutes']:g} min per variant, {report['subset']} pre-training "
        f"images, {report['threads']} threads.",
        "",
        "| variant | teacher | epochs | images seen | wall s | linear avg | k-NN avg "
        "| linear [CLS] | feature std | eff. rank | teacher cos | same epochs: linear avg "
        "| same epochs: k-NN avg |",
        "|" + " --- |" * 13,
    ]
    for variant, r in report["runs"].items():
        b, s, h = r["budget"], r["same_epochs"], r["health"]
        teacher = f"{r['ema_every']}, {r['target_norm']}" if "teacher_cosine" in h else "-"
        cosine = f"{h['teacher_cosine']:.3f}" if "teacher_cosine" in h else "-"
        lines.append(
            f"| {variant} | {teacher} | {r['epochs']} | {r['images_seen']} | "
            f"{r['seconds']:.0f} | {b['linprobe_avg']:.2f} | {b['knn_avg']:.2f} | "
            f"{b['linprobe_cls']:.2f} | {h['feature_std']:.4f} | {h['effective_rank']:.1f} | "
            f"{cosine} | {s['linprobe_avg']:.2f} ({s['epochs']} ep) | {s['knn_avg']:.2f} |"
        )
    z = report["random_init"]
    lines.append(
        f"| random init | - | 0 | 0 | 0 | {z['linprobe_avg']:.2f} | {z['knn_avg']:.2f} | "
        f"{z['linprobe_cls']:.2f} | | | | | |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
