"""One pre-training step (``dsmae.pretrain.step``): accumulation, checkpointed activations,
clipping, and a non-finite step that changes nothing."""

import math
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_config

import dsmae
from dsmae.checkpoint import load_checkpoint
from dsmae.config import build_config, model_config
from dsmae.models import DSMAE
from dsmae.pretrain import pretrain
from dsmae.pretrain.setup import build_optimizer
from dsmae.pretrain.step import step_unless_non_finite, train_step


def test_gradient_accumulation_equals_the_full_batch(tiny):
    # all patches corrupted with zero noise: the forward pass is deterministic
    options = dict(noise_ratio=1.0, noise_std=0.0, **tiny)
    images = torch.randn(8, 3, 16, 16)
    params = []
    losses = []
    for micro_batch in (8, 2):
        torch.manual_seed(0)
        model = dsmae.build("dsmae", **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        losses.append(train_step(model, optimizer, images, micro_batch=micro_batch)["loss"])
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert torch.allclose(params[0], params[1], atol=1e-5)


@pytest.mark.parametrize("ema_every", ["epoch", "step"])
def test_micro_batches_take_the_same_steps_as_whole_batches(tmp_path, ema_every, tiny):
    whole = tiny_config(tiny, tmp_path / "whole", **{"train.ema_every": ema_every})
    pretrain(whole)
    micro = tiny_config(
        tiny, tmp_path / "micro", **{"train.ema_every": ema_every, "train.micro_batch": 16}
    )
    pretrain(micro)
    a, b = (load_checkpoint(Path(c.out) / "last.pt")["model"] for c in (whole, micro))
    for name, tensor in a.items():  # float tolerance: the sums run in another order
        assert torch.allclose(tensor, b[name], atol=1e-4), name
    assert any(not torch.equal(a[n], a[n.replace("teacher.", "encoder.")])
               for n in a if n.startswith("teacher."))  # fmt: skip


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    images = torch.randn(4, 3, 16, 16)
    grads = []
    for method in ("dsmae", "mae"):
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = dsmae.build(method, **tiny)
            model.encoder.set_grad_checkpointing(checkpointing)
            out = model(images, generator=torch.Generator().manual_seed(0))
            out.loss.backward()
            grads.append(model.encoder.blocks[0].mlp.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(grads[2], grads[3], atol=1e-6)


def _digits_model(tiny: dict) -> DSMAE:
    """The tiny run's model: the tiny ViT on 8x8 grey images, one block."""
    return DSMAE(model_config(**{**tiny, "img_size": 8, "in_chans": 1, "depth": 1}))


def test_gradient_clipping_bounds_the_applied_gradient(tiny):
    model = _digits_model(tiny)
    cfg = build_config(overrides={"train.device": "cpu"})
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    images = torch.randn(4, 1, 8, 8)
    out = train_step(model, optimizer, images, generator=torch.Generator().manual_seed(0),
                     grad_clip=1e-3)  # fmt: skip
    assert out["grad_norm"] > 1e-3 and bool(out["finite"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1e-3 * 1.0001


def test_without_clipping_the_step_reports_the_norm_of_the_gradients_it_applied(tiny):
    model = _digits_model(tiny)
    cfg = build_config(overrides={"train.device": "cpu"})
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    out = train_step(model, optimizer, torch.randn(4, 1, 8, 8),
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(out["grad_norm"], torch.linalg.vector_norm(grads), rtol=1e-5)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_a_non_finite_step_changes_no_weight(amp, tiny):
    model = _digits_model(tiny)
    cfg = build_config(overrides={"train.device": "cpu"})
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask, eps = model.sample_corruption(4, torch.Generator().manual_seed(0))
    out = train_step(model, optimizer, torch.randn(4, 1, 8, 8), mask=mask,
                     eps=torch.full_like(eps, math.inf), amp=amp)  # fmt: skip
    assert not bool(out["finite"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the fused kernel skipped the step on the device: moments and step count still zero
    assert optimizer.defaults["fused"] and optimizer.state
    for state in optimizer.state.values():
        assert int(state["step"]) == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_a_non_fused_optimizer_skips_a_non_finite_step_too():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, foreach=False)
    weight.grad = torch.ones(3)
    step_unless_non_finite(optimizer, torch.tensor(False))
    assert torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state
    step_unless_non_finite(optimizer, torch.tensor(True))
    assert (weight.detach() < 1).all()


def test_a_skipped_step_leaves_the_teacher_as_it_is(tiny):
    model = _digits_model(tiny)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    teacher = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9, apply=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(teacher, model.teacher.parameters()))
    model.update_teacher(0.9, apply=torch.tensor(True))
    for before, after, student in zip(
        teacher, model.teacher.parameters(), model.encoder.parameters()
    ):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * student)
