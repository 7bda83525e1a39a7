"""Pre-training throughput on CPU from an image folder and from WebDataset shards of the
same images, the same ``dsmae pretrain`` command otherwise.

    python benchmarks/shards_vs_folder.py [--archive ../shared/data/cifar10-jpeg.tar.gz]
        [--images 5000] [--shard-size 625] [--epochs 3] [--work DIR]

It extracts ``--images`` real CIFAR-10 train JPEGs (as many of each class) into a folder
outside the repository (a new temporary one unless ``--work``), writes them as shards with
``dsmae shards``, runs the same small pre-training on the folder (decoded once into
memory) and on the shards (streamed: read and decoded every epoch by ``data.workers``
reader processes), and prints for each the steady images/s (the median of the metrics
lines after the first epoch), the images/s over all the steps, and the start-up time.
Nothing is written into the repository. Time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from runs import pretrain_args

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
BATCH = 128
# the same run on both sources: a 4-block width-96 ViT on 32x32 images in 4x4 patches
RUN = {
    "model.arch": "vit_tiny", "model.img_size": 32, "model.patch_size": 4,
    "train.batch_size": BATCH, "model.depth": 4, "model.embed_dim": 96, "model.num_heads": 3,
    "model.decoder_depth": 1, "model.regressor_depth": 1, "train.warmup_epochs": 1,
    "train.log_every": 5, "train.checkpoint_every": 0, "monitor.knn_every": 0,
    "monitor.images_every": 0, "train.device": "cpu",
}  # fmt: skip


def extract(archive: Path, folder: Path, images: int) -> None:
    """``images`` train JPEGs of the archive (``cifar10/train/<class>/<n>.jpg``), the first
    ``images // 10`` of each class, into ``folder/<class>/``."""
    per_class, taken = images // 10, Counter()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4 or parts[1] != "train":
                continue
            if taken[parts[2]] < per_class:
                taken[parts[2]] += 1
                target = folder / parts[2] / parts[3]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())


def dsmae(*args: str) -> str:
    """Run ``python -m dsmae ARGS`` on this checkout's ``src/``; its standard output."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "dsmae", *args]
    done = subprocess.run(command, env=env, text=True, capture_output=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def throughput(run: Path, steps_per_epoch: int) -> dict[str, float]:
    """Images/s of a finished run from its ``metrics.jsonl``: the median of the lines after
    the first epoch, and over all steps (from the first step to the last); start-up s."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "img_per_s" in line]
    setup, last = lines[0]["setup_s"], lines[-1]
    steady = [line["img_per_s"] for line in lines if line["step"] > steps_per_epoch]
    return {
        "steady_img_per_s": statistics.median(steady),
        "all_steps_img_per_s": last["step"] * BATCH / (last["wall_s"] - setup),
        "setup_s": setup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--images", type=int, default=5000)
    # 8 shards: 2 for each of the 4 readers (data.workers), so each image is read once an epoch
    parser.add_argument("--shard-size", type=int, default=625)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", type=Path, help="folder for the images, shards and runs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dsmae-shards-bench-"))
    if work.resolve().is_relative_to(REPO):
        parser.error(f"--work {work} is inside the repository; give a folder outside it")
    folder, shards = work / "images", work / "shards"
    extract(args.archive, folder, args.images)
    dsmae("shards", str(folder), str(shards), "--shard-size", str(args.shard_size), "--overwrite")
    count = len(list(shards.glob("shard-*.tar")))
    pattern = f"{shards}/shard-{{000000..{count - 1:06d}}}.tar"
    images = sum(1 for _ in folder.rglob("*.jpg"))
    sources = {
        "folder": {"data.source": str(folder)},
        "shards": {"data.source": pattern, "data.samples_per_epoch": images},
    }
    print(f"{images} CIFAR-10 images, {count} shards; batch {BATCH}, {args.epochs} epochs, CPU")
    for name, data in sources.items():
        run = work / f"run-{name}"
        settings = {**RUN, **data, "train.epochs": args.epochs, "out": str(run)}
        dsmae(*pretrain_args(overrides=settings), "--overwrite")
        figures = throughput(run, images // BATCH)
        print(
            f"{name:>7}: {figures['steady_img_per_s']:7.0f} img/s steady, "
            f"{figures['all_steps_img_per_s']:7.0f} img/s over all steps, "
            f"start-up {figures['setup_s']:5.1f} s"
        )


if __name__ == "__main__":
    main()
