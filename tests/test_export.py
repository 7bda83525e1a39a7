"""``dsmae export`` and ``dsmae.load_encoder``: an export loads with timm alone, offline,
and gives the same features; it holds tensors and JSON only."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import dsmae
from dsmae.checkpoint import CheckpointError
from dsmae.export import encoder_from_checkpoint, export_encoder


def test_an_export_loads_with_timm_alone_and_gives_the_same_features(digits_run, tmp_path):
    out = export_encoder(digits_run / "last.pt", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["img_size"] == 8 and config["model_args"]["patch_size"] == 4
    assert all(isinstance(t, torch.Tensor) for t in load_file(out / "model.safetensors").values())

    # exactly what a user writes, with timm and nothing of dsmae
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
        num_classes=10,
        **config["model_args"],
    ).eval()
    assert model.head.out_features == 10
    ours, _ = encoder_from_checkpoint(digits_run / "last.pt")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = ours.eval().forward_features(x)
        assert torch.allclose(model.forward_features(x), expected, atol=1e-6)
        assert torch.allclose(dsmae.load_encoder(out).eval().forward_features(x), expected)
        from_checkpoint = dsmae.load_encoder(digits_run / "last.pt").eval()
        assert torch.equal(from_checkpoint.forward_features(x), expected)


def test_the_teacher_can_be_exported_and_mae_has_none(digits_run, digits_mae_run, tmp_path):
    student, _ = encoder_from_checkpoint(digits_run / "last.pt")
    teacher, _ = encoder_from_checkpoint(digits_run / "last.pt", teacher=True)
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    out = export_encoder(digits_run / "last.pt", tmp_path / "t", teacher=True)
    assert json.loads((out / "config.json").read_text())["weights"] == "teacher"
    with pytest.raises(CheckpointError, match="has no teacher"):
        export_encoder(digits_mae_run / "last.pt", tmp_path / "m", teacher=True)


def test_load_encoder_refuses_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dsmae export"):
        dsmae.load_encoder(tmp_path)
