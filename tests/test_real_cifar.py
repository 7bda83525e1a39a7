"""On real CIFAR-10 images (../shared/data), the pre-training loss falls clearly."""

import pytest

from dsmae.config import build_config
from dsmae.metrics import read_metrics
from dsmae.pretrain import pretrain


@pytest.mark.parametrize("method", ["dsmae", "mae"])
def test_loss_falls_on_real_images(tmp_path, cifar_folder, method):
    cfg = build_config(overrides={
        "model.method": method, "model.img_size": 32, "model.patch_size": 4,
        "model.depth": 2, "model.embed_dim": 64, "model.num_heads": 2,
        "model.decoder_depth": 1, "model.regressor_depth": 1,
        "data.source": str(cifar_folder), "train.epochs": 8, "train.warmup_epochs": 1,
        "train.batch_size": 50, "train.base_lr": 1e-3, "train.log_every": 1,
        "train.device": "cpu", "out": str(tmp_path / method),
    })  # fmt: skip
    pretrain(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / method / "metrics.jsonl")]
    assert len(losses) == 64  # 400 images // 50 x 8 epochs
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
