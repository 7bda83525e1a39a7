"""The pre-training monitor's representation health and gradient share: in a real tiny run
and on its own."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsmae.config import build_config
from dsmae.data.pipeline import eval_batch
from dsmae.metrics import MetricsLog, read_metrics
from dsmae.models import DSMAE, build_model
from dsmae.pretrain import monitor
from dsmae.pretrain.monitor import HEALTH_BATCH, HEALTH_IMAGES, Monitor
from dsmae.seeds import monitor_seed

HEALTH = ("health_feature_std", "health_effective_rank")
SHARE = ("health_grad_norm_y", "health_grad_norm_z", "health_grad_ratio_z_y",
         "health_grad_cosine_y_z")  # fmt: skip


def _config(tiny: dict, tmp_path: Path, source: str = "digits", **overrides):
    """The unit tests' tiny ViT (16 tokens of width 32) on grey-scale images."""
    base = {f"model.{k}": v for k, v in tiny.items()}
    base.update(
        {
            "model.in_chans": 1,
            "data.source": source,
            "data.mean": [0.3],
            "data.std": [0.25],
            "train.device": "cpu",
            "monitor.knn_every": 1,
            "monitor.every": 1,
            "monitor.images_every": 0,
            "out": str(tmp_path / "run"),
        }
    )
    base.update(overrides)
    return build_config(overrides=base)


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The splits the monitor asks ``load_split`` for, in order."""
    asked: list[str] = []
    real = monitor.load_split

    def load_split(data, model, split):
        asked.append(split)
        return real(data, model, split)

    monkeypatch.setattr(monitor, "load_split", load_split)
    return asked


def _check_ranges(record: dict, dim: int) -> None:
    assert 0 < record["health_feature_std"] <= 1
    assert 1 <= record["health_effective_rank"] <= dim
    if "health_teacher_cosine" in record:
        assert -1 <= record["health_teacher_cosine"] <= 1


@pytest.mark.parametrize("fixture", ["digits_run", "digits_mae_run"])
def test_a_tiny_run_logs_health_with_the_knn_lines(request, fixture):
    out = request.getfixturevalue(fixture)  # 2 epochs, k-NN monitor every epoch, width 32
    lines = [r for r in read_metrics(out / "metrics.jsonl") if "health_feature_std" in r]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"step", "epoch", "knn_top1", "wall_s", "flops", *HEALTH} <= set(r)
        _check_ranges(r, 32)
        assert ("health_teacher_cosine" in r) == (fixture == "digits_run")  # mae: no teacher
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert {f"pretrain/{k}" for k in HEALTH} <= set(board.Tags()["scalars"])


def test_health_of_a_model_whose_student_is_its_teacher(tmp_path, tiny):
    cfg = _config(tiny, tmp_path)
    torch.manual_seed(0)
    model = DSMAE(cfg.model).train()  # a new model's teacher is a copy of its student
    monitor = Monitor(cfg, torch.device("cpu"))
    health = monitor.health(model)
    assert health is not None and set(health) == {*HEALTH, "health_teacher_cosine"}
    assert health["health_teacher_cosine"] == pytest.approx(1.0, abs=1e-6)
    _check_ranges(health, cfg.model.embed_dim)
    # train mode restored, the teacher still in eval mode, no gradients kept
    assert model.training and model.encoder.training and not model.teacher.training
    assert all(p.grad is None for p in model.parameters())
    # a teacher that drifted away shows as a lower cosine
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p))
    assert monitor.health(model)["health_teacher_cosine"] < 0.99


def test_health_reads_a_fixed_sample_loaded_once(tmp_path, monkeypatch, tiny):
    asked = _count_loads(monkeypatch)
    cfg = _config(tiny, tmp_path, **{"monitor.images_every": 1})
    monitor = Monitor(cfg, torch.device("cpu"))
    model = DSMAE(cfg.model)
    with MetricsLog(tmp_path / "metrics") as metrics:
        for epoch in (1, 2, 3):
            monitor.after_epoch(model, epoch, 10 * epoch, 1.0, 2.0, metrics)
    assert asked == ["train", "test"]  # once, for k-NN, grid and health together
    sample = monitor.health_images()
    assert sample.shape == (HEALTH_IMAGES, 1, 8, 8) and sample.dtype == torch.uint8
    assert torch.equal(sample, Monitor(cfg, torch.device("cpu")).health_images())  # seeded
    records = read_metrics(tmp_path / "metrics" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all({"knn_top1", "wall_s", "flops", *HEALTH} <= set(r) for r in records)
    # the model did not change between the epochs: neither did its health
    assert records[0]["health_effective_rank"] == pytest.approx(records[2]["health_effective_rank"])


def test_health_runs_without_a_knn_split_and_on_small_data(tmp_path, monkeypatch, caplog, tiny):
    folder = tmp_path / "images"  # no train/ and test/: the whole folder, no test split
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    asked = _count_loads(monkeypatch)
    cfg = _config(tiny, tmp_path, str(folder), **{"model.method": "mae", "monitor.images_every": 1})
    monitor = Monitor(cfg, torch.device("cpu"))
    model = build_model(cfg.model)
    with (
        caplog.at_level(logging.INFO, logger="dsmae.pretrain.monitor"),
        MetricsLog(tmp_path / "metrics") as metrics,
    ):
        for epoch in (1, 2):
            monitor.after_epoch(model, epoch, 5 * epoch, 1.0, 2.0, metrics)
    assert asked == ["train", "test"]  # the test split is missing: not asked again
    assert len(monitor.health_images()) == 12  # fewer images than HEALTH_IMAGES: all
    records = [json.loads(line) for line in (tmp_path / "metrics" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert "knn_top1" not in r and "health_teacher_cosine" not in r
        assert {"step", "wall_s", "flops", *HEALTH} <= set(r)
        _check_ranges(r, cfg.model.embed_dim)
    assert "epoch 2: feature std" in caplog.text and "effective rank" in caplog.text


def test_each_monitor_on_its_own_rhythm(tmp_path, monkeypatch, tiny):
    asked = _count_loads(monkeypatch)
    for knn, every, epoch in ((0, 0, 1), (2, 2, 1)):
        cfg = _config(tiny, tmp_path, **{"monitor.knn_every": knn, "monitor.every": every})
        with MetricsLog(tmp_path / f"metrics-{knn}") as metrics:
            Monitor(cfg, torch.device("cpu")).after_epoch(
                DSMAE(cfg.model), epoch, 1, 1.0, 2.0, metrics
            )
        assert (tmp_path / f"metrics-{knn}" / "metrics.jsonl").read_text() == ""
    assert asked == []  # nothing was due: nothing loaded
    cfg = _config(tiny, tmp_path, **{"monitor.knn_every": 2, "monitor.every": 1})
    with MetricsLog(tmp_path / "metrics-health") as metrics:
        Monitor(cfg, torch.device("cpu")).after_epoch(DSMAE(cfg.model), 1, 1, 1.0, 2.0, metrics)
    (record,) = read_metrics(tmp_path / "metrics-health" / "metrics.jsonl")
    assert "knn_top1" not in record and {*HEALTH, *SHARE} <= set(record)


def test_gradient_share_equals_a_hand_computation(tmp_path, tiny):
    cfg = _config(tiny, tmp_path, **{"model.lam": 0.7})
    torch.manual_seed(0)
    model = DSMAE(cfg.model).train()
    watch = Monitor(cfg, torch.device("cpu"))
    share = watch.gradient_share(model)
    assert set(share) == set(SHARE)
    # by hand: the same batch and draw, each weighted term's encoder gradient
    x = eval_batch(watch.health_images()[:HEALTH_BATCH], cfg.model.img_size, [0.3], [0.25])
    draw = torch.Generator().manual_seed(monitor_seed(cfg.train.seed))
    mask, eps = model.sample_corruption(len(x), draw)
    out = model(x, mask=mask, eps=eps)
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    g_y = torch.cat([g.flatten() for g in torch.autograd.grad(0.7 * out.loss_y, params,
                                                              retain_graph=True)])  # fmt: skip
    g_z = torch.cat([g.flatten() for g in torch.autograd.grad(0.3 * out.loss_z, params)])
    assert share["health_grad_norm_y"] == pytest.approx(float(g_y.norm()), rel=1e-5)
    assert share["health_grad_norm_z"] == pytest.approx(float(g_z.norm()), rel=1e-5)
    assert share["health_grad_ratio_z_y"] == pytest.approx(float(g_z.norm() / g_y.norm()), rel=1e-5)
    cosine = float(torch.nn.functional.cosine_similarity(g_y, g_z, dim=0))
    assert share["health_grad_cosine_y_z"] == pytest.approx(cosine, abs=1e-5)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated
    # one term: its norm alone, unweighted
    mae = _config(tiny, tmp_path, **{"model.method": "mae"})
    share = Monitor(mae, torch.device("cpu")).gradient_share(build_model(mae.model))
    assert set(share) == {"health_grad_norm_y"}


@pytest.mark.parametrize("fixture", ["digits_run", "digits_mae_run"])
def test_a_tiny_run_logs_the_gradient_share(request, fixture):
    out = request.getfixturevalue(fixture)
    lines = [r for r in read_metrics(out / "metrics.jsonl") if "health_grad_norm_y" in r]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert r["health_grad_norm_y"] > 0
        if fixture == "digits_run":
            assert set(SHARE) <= set(r) and r["health_grad_norm_z"] > 0
            assert -1 <= r["health_grad_cosine_y_z"] <= 1
        else:
            assert "health_grad_norm_z" not in r


def test_the_gradient_share_monitor_leaves_training_as_it_was(tmp_path, tiny_run):
    from dsmae.checkpoint import load_checkpoint
    from dsmae.pretrain import pretrain

    weights = []
    for every in (0, 1):
        monitors = {"monitor.knn_every": 0, "monitor.every": every, "monitor.images_every": 0}
        overrides = {**tiny_run.overrides, **monitors, "out": str(tmp_path / f"every-{every}")}
        result = pretrain(build_config(tiny_run.preset, overrides=overrides))
        weights.append(load_checkpoint(result.checkpoint)["model"])
        monitored = [r for r in read_metrics(result.out / "metrics.jsonl") if SHARE[0] in r]
        assert len(monitored) == (2 if every else 0)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
