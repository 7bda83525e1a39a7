"""``dsmae finetune``: MAE's fine-tuning recipe on a tiny real-digits run."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from timm.data import create_transform
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import nn
from torchvision.transforms import InterpolationMode, Normalize, RandomHorizontalFlip

from dsmae.cli import main
from dsmae.config import FinetuneConfig, build_config
from dsmae.data.sources import ImageTensors
from dsmae.evaluation.finetune import (
    build_finetune_optimizer,
    classifier,
    to_pil,
    train_loader,
    train_transform,
)
from dsmae.models.vit import create_encoder

FAST = ["--epochs", "2", "--batch-size", "32", "--device", "cpu",
        "--set", "finetune.warmup_epochs=1"]  # fmt: skip
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.15]


def _encoder(depth: int = 4):
    cfg = build_config(overrides={"model.depth": depth, "model.embed_dim": 32,
                                  "model.num_heads": 2, "model.img_size": 8,
                                  "model.patch_size": 4})  # fmt: skip
    return create_encoder(cfg.model)


def _config(chans: int = 3, **overrides):
    mean, std = (MEAN, STD) if chans == 3 else (MEAN[:1], STD[:1])
    return build_config(overrides={"model.img_size": 16, "model.patch_size": 4,
                                   "model.in_chans": chans, "data.mean": mean,
                                   "data.std": std, "finetune.batch_size": 8,
                                   "finetune.workers": 0, **overrides})  # fmt: skip


def _images(n: int = 20, chans: int = 3) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, chans, 16, 16), generator=g, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n) % 10, tuple(str(i) for i in range(10)))


def test_layer_decay_scales_each_block_and_the_head_keeps_the_full_rate():
    ft = FinetuneConfig(layer_decay=0.5, drop_path=0.3, lr=1e-3)
    model = classifier(_encoder(depth=4), 10, ft)
    optimizer = build_finetune_optimizer(model, ft, torch.device("cpu"))
    scale_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[id(p)] = group["lr_scale"]
    # timm: patch embedding, [CLS], positions = layer 0; block i = layer i + 1; head = 5
    assert scale_of[id(model.patch_embed.proj.weight)] == pytest.approx(0.5**5)
    assert scale_of[id(model.blocks[0].mlp.fc1.weight)] == pytest.approx(0.5**4)
    assert scale_of[id(model.blocks[3].mlp.fc1.weight)] == pytest.approx(0.5**1)
    assert scale_of[id(model.head.weight)] == pytest.approx(1.0)
    assert scale_of[id(model.fc_norm.weight)] == pytest.approx(1.0)  # as in MAE
    # drop path grows linearly to 0.3 over the blocks, as timm does
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert model.head.out_features == 10 and not model.head.bias.any()


def test_avg_head_is_a_fresh_layernorm_over_the_mean_patch_token():
    encoder = _encoder(depth=2)
    with torch.no_grad():
        encoder.norm.weight.fill_(3.0)  # a "pre-trained" final norm, to be dropped
    model = classifier(encoder, 10, FinetuneConfig(pool="avg", drop_path=0.0)).eval()
    assert isinstance(model.norm, nn.Identity) and model.global_pool == "avg"
    assert isinstance(model.fc_norm, nn.LayerNorm) and model.fc_norm.eps == 1e-6
    assert torch.equal(model.fc_norm.weight, torch.ones(32))
    assert torch.equal(model.fc_norm.bias, torch.zeros(32))
    x = torch.randn(5, 3, 8, 8)
    logits = model(x)
    assert logits.shape == (5, 10)
    tokens = model.forward_features(x)  # (B, 1 + N, D), no final norm
    expected = model.head(model.fc_norm(tokens[:, 1:].mean(dim=1)))
    torch.testing.assert_close(logits, expected)


def test_cls_head_keeps_the_pretrained_norm():
    encoder = _encoder(depth=2)
    with torch.no_grad():
        encoder.norm.weight.fill_(3.0)
    model = classifier(encoder, 7, FinetuneConfig(pool="cls", drop_path=0.0)).eval()
    assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.fc_norm, nn.Identity)
    assert bool((model.norm.weight == 3.0).all()) and model.global_pool == "token"
    x = torch.randn(4, 3, 8, 8)
    logits = model(x)
    assert logits.shape == (4, 7)
    torch.testing.assert_close(logits, model.head(model.forward_features(x)[:, 0]))


def test_train_transform_is_timm_built_with_maes_arguments():
    ours = train_transform(_config()).transforms
    # MAE's main_finetune.build_transform with its default arguments
    maes = create_transform(input_size=16, is_training=True, color_jitter=None,
                            auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                            re_prob=0.25, re_mode="pixel", re_count=1,
                            mean=MEAN, std=STD).transforms  # fmt: skip
    assert [type(t) for t in ours] == [type(t) for t in maes]
    crop, flip, randaug, _, normalize, erase = ours
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert crop.size == (16, 16) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, RandomHorizontalFlip) and flip.p == 0.5
    # RandAugment comes after the crop and the flip
    assert isinstance(randaug, RandAugment) and [type(t) for t in ours].index(RandAugment) == 2
    assert [op.name for op in randaug.ops] == list(_RAND_INCREASING_TRANSFORMS)
    assert [op.name for op in randaug.ops] == [op.name for op in maes[2].ops]
    assert randaug.num_layers == 2 and randaug.choice_weights is None
    for op in randaug.ops:
        assert op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5
        assert op.kwargs["fillcolor"] == (128, 102, 76)  # round(255 * mean)
    assert isinstance(normalize, Normalize)
    assert normalize.mean.tolist() == pytest.approx(MEAN)
    assert normalize.std.tolist() == pytest.approx(STD)
    assert isinstance(erase, RandomErasing)
    assert erase.probability == 0.25 and erase.mode == "pixel" and erase.max_count == 1

    off = train_transform(_config(**{"finetune.auto_augment": "none",
                                     "finetune.crop_scale": [0.5, 1.0]})).transforms  # fmt: skip
    assert not any(isinstance(t, RandAugment) for t in off) and off[0].scale == (0.5, 1.0)


@pytest.mark.parametrize("chans", [1, 3])
def test_train_transform_takes_grey_and_colour_images(chans):
    transform = train_transform(_config(chans, **{"finetune.random_erase": 1.0}))
    images = _images(8, chans).images
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for image in images:  # 8 x 2 random ops: the geometric ones fill grey images too
        out = transform(to_pil(image))
        assert out.shape == (chans, 16, 16) and out.dtype == torch.float32
    assert to_pil(images[0]).mode == ("L" if chans == 1 else "RGB")


@pytest.mark.parametrize("chans", [1, 3])
def test_posterize_at_full_magnitude_gives_a_black_image(chans):
    # PosterizeIncreasing at magnitude 10 keeps 0 bits, which recent Pillow refuses
    transform = train_transform(_config(chans))
    (op,) = [op for op in transform.transforms[2].ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    image = to_pil(_images(1, chans).images[0])
    assert not np.asarray(op(image)).any()
    op.magnitude = 5  # keeps 2 bits: timm's own function
    assert np.array_equal(np.asarray(op(image)), np.asarray(image) & 0b11000000)


def _batches(cfg, train, epoch, **kwargs):
    loader, batches = train_loader(train, cfg, **kwargs)
    batches.set_epoch(epoch)
    return list(loader)


def test_training_batches_are_seeded_by_seed_epoch_and_image():
    cfg, train = _config(), _images(20)
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    first = _batches(cfg, train, epoch=0)
    # the main process's RNGs (mixup draws from them) are left as they were
    assert random.getstate() == state[0]
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])
    assert len(first) == 2  # 20 // 8, the partial batch dropped
    x, y = first[0]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    order = torch.randperm(20, generator=torch.Generator().manual_seed(cfg.train.seed))
    assert torch.equal(y, train.labels[order[:8]])

    again = _batches(cfg, train, epoch=0)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = _batches(cfg, train, epoch=1)
    assert not torch.equal(first[0][0], other[0][0])
    reseeded = _batches(_config(**{"train.seed": 1}), train, epoch=0)
    assert not torch.equal(first[0][0], reseeded[0][0])

    # each process takes its half of every global batch, augmented as in one process
    halves = [_batches(cfg, train, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(first, *halves):
        assert x0.shape[0] == 4 and torch.equal(torch.cat([x0, x1]), x)
        assert torch.equal(torch.cat([y0, y1]), y)


def test_training_batches_do_not_depend_on_the_number_of_workers():
    train = _images(20, chans=1)
    in_process = _batches(_config(1), train, epoch=3)
    in_workers = _batches(_config(1, **{"finetune.workers": 2}), train, epoch=3)
    for (x1, y1), (x2, y2) in zip(in_process, in_workers, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_finetune_end_to_end_reports_the_last_epoch(digits_run, capsys, tmp_path):
    checkpoint = digits_run / "last.pt"
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(checkpoint), *FAST, "--out", str(out),
            "--set", "finetune.workers=0"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fine-tune top-1 (pre-trained encoder, last epoch of 2):" in printed
    result = json.loads((digits_run / "last.finetune.json").read_text())
    assert result["top1"] == result["history"][-1] and len(result["history"]) == 2
    assert result["num_classes"] == 10 and result["num_test"] == 449
    assert result["pool"] == "avg"
    settings = result["settings"]
    assert settings["data"] == "digits" and settings["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert settings["epochs"] == 2 and settings["batch_size"] == 32
    assert "workers" not in settings  # how it runs, not what it computes
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [1, 2]

    args = ["finetune", "--checkpoint", str(checkpoint), *FAST, "--random-init",
            "--set", "finetune.workers=2", "--set", "finetune.pool=cls"]  # fmt: skip
    assert main(args) == 0
    assert "random init (scratch)" in capsys.readouterr().out
    result = json.loads((digits_run / "last.finetune-cls-random-init.json").read_text())
    assert result["pool"] == "cls" and result["settings"]["pool"] == "cls"
    assert result["random_init"] and len(result["history"]) == 2


def test_finetune_refuses_model_changes_and_odd_batches(digits_run, capsys):
    checkpoint = str(digits_run / "last.pt")
    assert main(["finetune", "--checkpoint", checkpoint, "--set", "model.depth=2"]) == 2
    assert "model.depth: fixed by the checkpoint" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", checkpoint, "--batch-size", "33"]) == 2
    assert "finetune.batch_size" in capsys.readouterr().err


def test_finetune_metrics_never_mix_with_another_runs(digits_run, capsys, tmp_path):
    checkpoint = shutil.copy(digits_run / "last.pt", tmp_path / "last.pt")
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)  # a pre-training run's folder: metrics, run id, ...
    before = (run / "metrics.jsonl").read_bytes()
    argv = ["finetune", "--checkpoint", str(checkpoint), *FAST, "--set", "finetune.workers=0"]
    assert main([*argv, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"--out {run} holds another run (run.json, last.pt, metrics.jsonl" in err
    assert (run / "metrics.jsonl").read_bytes() == before and "Traceback" not in err
    assert not list(tmp_path.glob("last.finetune*.json"))  # refused before any work
