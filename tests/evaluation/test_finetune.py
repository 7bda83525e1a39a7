"""``dsmae finetune``: MAE's fine-tuning recipe on a tiny real-digits run."""

import json

import pytest
import torch

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
    # drop path grows linearly to 0.3 over the blocks, as timm does
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert model.head.out_features == 10 and not model.head.bias.any()


def test_finetune_end_to_end_reports_the_last_epoch(digits_run, capsys, tmp_path):
    checkpoint = digits_run / "last.pt"
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(checkpoint), *FAST, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fine-tune top-1 (pre-trained encoder, last epoch of 2):" in printed
    result = json.loads((digits_run / "last.finetune.json").read_text())
    assert result["top1"] == result["history"][-1] and len(result["history"]) == 2
    assert result["num_classes"] == 10 and result["num_test"] == 449
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [1, 2]

    assert main(["finetune", "--checkpoint", str(checkpoint), *FAST, "--random-init"]) == 0
    assert "random init (scratch)" in capsys.readouterr().out
    assert (digits_run / "last.finetune-random-init.json").is_file()


def test_finetune_refuses_model_changes_and_odd_batches(digits_run, capsys):
    checkpoint = str(digits_run / "last.pt")
    assert main(["finetune", "--checkpoint", checkpoint, "--set", "model.depth=2"]) == 2
    assert "model.depth: fixed by the checkpoint" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", checkpoint, "--batch-size", "33"]) == 2
    assert "finetune.batch_size" in capsys.readouterr().err
