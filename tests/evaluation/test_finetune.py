"""``dsmae finetune``: MAE's fine-tuning recipe on a tiny real-digits run."""

import json
import shutil

import pytest
import torch
from saved_results import latest_result
from torch import nn

from dsmae.cli import main
from dsmae.config import FinetuneConfig, build_config
from dsmae.evaluation.finetune import build_finetune_optimizer, classifier
from dsmae.models.vit import create_encoder

FAST = ["--epochs", "2", "--batch-size", "32", "--device", "cpu",
        "--set", "finetune.warmup_epochs=1"]  # fmt: skip


def _encoder(depth: int = 4):
    cfg = build_config(overrides={"model.depth": depth, "model.embed_dim": 32,
                                  "model.num_heads": 2, "model.img_size": 8,
                                  "model.patch_size": 4})  # fmt: skip
    return create_encoder(cfg.model)


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


def test_finetune_end_to_end_reports_the_last_epoch(digits_run, capsys, tmp_path):
    checkpoint = digits_run / "last.pt"
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(checkpoint), *FAST, "--out", str(out),
            "--set", "finetune.workers=0"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fine-tune top-1 (pre-trained encoder, last epoch of 2):" in printed
    result = latest_result(digits_run, "last.finetune")
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
