"""A run's set-up (``dsmae.pretrain.setup``): the optimizer's groups, and what is refused
before any work."""

import pytest
import torch
from tiny_runs import tiny_config

import dsmae
from dsmae.cli import main
from dsmae.config import build_config
from dsmae.pretrain import pretrain
from dsmae.pretrain.setup import build_optimizer


def test_weight_decay_only_on_weight_matrices(tiny):
    model = dsmae.build("mae", **tiny)
    optimizer = build_optimizer(model, build_config().train, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups}
    assert "encoder.cls_token" in decay[0.0] and "decoder.mask_token" in decay[0.0]
    assert "encoder.blocks.0.norm1.weight" in decay[0.0]
    assert "encoder.blocks.0.attn.qkv.bias" in decay[0.0]
    assert "encoder.blocks.0.attn.qkv.weight" in decay[0.05]
    assert "encoder.patch_embed.proj.weight" in decay[0.05]
    trained = {n for group in decay.values() for n in group}
    assert "encoder.pos_embed" not in trained  # fixed sin-cos


def test_batch_larger_than_the_data_is_refused(tmp_path, tiny):
    with pytest.raises(dsmae.ConfigError, match=r"train\.batch_size"):
        pretrain(tiny_config(tiny, tmp_path, **{"train.batch_size": 512}))


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, run_args):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*run_args, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"out='{blocker / 'run'}' is not a writable folder" in err
