"""Shared fixtures: tiny model settings and a few hundred real CIFAR-10 images."""

from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

# A ViT small enough for unit tests: 16x16 images, patch 4 -> 16 tokens.
TINY = dict(
    arch="vit_tiny",
    img_size=16,
    patch_size=4,
    depth=2,
    embed_dim=32,
    num_heads=2,
    decoder_depth=1,
    regressor_depth=1,
)

CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 images from ../shared/data: 40 train and 10 test images per class,
    as an image folder with train/ and test/ class sub-folders. Skips where absent."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_ARCHIVE}")
    out = tmp_path_factory.mktemp("cifar10")
    wanted = {"train": 40, "test": 10}
    taken: dict[tuple[str, str], int] = defaultdict(int)
    with tarfile.open(CIFAR_ARCHIVE, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10/<split>/<class>/<file>.jpg
            if not member.isfile() or len(parts) != 4 or parts[1] not in wanted:
                continue
            key = (parts[1], parts[2])
            if taken[key] >= wanted[parts[1]]:
                continue
            taken[key] += 1
            target = out / parts[1] / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return out


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch):
    """``serve(path)`` -> an http://127.0.0.1 URL of that file, for the test's duration."""
    from torchvision_fakes import serve_files

    yield from serve_files(monkeypatch)


def tiny_digits_run(out: Path, method: str = "dsmae") -> Path:
    """Pre-train a 1-block ViT on 128 real digits (8x8, patch 4) for 2 epochs, with the
    k-NN monitor every epoch; returns the run folder (last.pt, metrics.jsonl, ...)."""
    from dsmae.config import build_config
    from dsmae.engine import pretrain

    cfg = build_config(
        "quickstart",
        overrides={
            "model.method": method,
            "model.depth": 1,
            "model.embed_dim": 32,
            "model.num_heads": 2,
            "model.decoder_depth": 1,
            "model.regressor_depth": 1,
            "model.patch_size": 4,
            "data.subset": 128,
            "train.batch_size": 32,
            "train.epochs": 2,
            "train.warmup_epochs": 1,
            "train.log_every": 1,
            "train.device": "cpu",
            "monitor.knn_every": 1,
            "out": str(out),
        },
    )
    return pretrain(cfg).out


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished DSMAE run on real digits (see :func:`tiny_digits_run`)."""
    return tiny_digits_run(tmp_path_factory.mktemp("digits") / "dsmae")


@pytest.fixture(scope="session")
def digits_mae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny run with MAE."""
    return tiny_digits_run(tmp_path_factory.mktemp("digits") / "mae", "mae")
