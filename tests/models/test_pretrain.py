"""What every pre-training model shares (``dsmae.models.pretrain``), ``build_model``, and the
weights every method draws (pinned against the code before the models were split)."""

import dataclasses
import hashlib

import pytest
import torch

import dsmae.models.dsmae
import dsmae.models.mae
from dsmae.config import model_config
from dsmae.models import DSMAE, MAE, PretrainModel, PretrainOutput, build_model
from dsmae.patches import patchify

METHODS = ["dsmae", "dsmae-ly", "dsmae-lz", "mae"]

# For the tiny ViT after torch.manual_seed(0), computed with the code of commit 7b45b84 (one DSMAE
# class for all four methods): the number of state-dict entries, a digest of their names and
# shapes in order, a digest of their values in order (the sin-cos position embeddings left
# out: computed, not drawn), and the next global random integer (as many numbers drawn).
WEIGHTS = {
    "dsmae": (92, "16a62f142972b776", "b9d60a0be9918f37", 1760315771),
    "dsmae-ly": (48, "8ecd569c7e6ee41f", "a7936096f25bcd90", 1178668777),
    "dsmae-lz": (74, "c5b484a7e7b7f975", "e49288085c54048f", 852745560),
    "mae": (49, "6966db0406dda37b", "99cbff86e6a134cb", 1488501282),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(tiny: dict, method: str, **options) -> PretrainModel:
    return build_model(model_config(method, **{**tiny, **options}))


def _digests(model: torch.nn.Module) -> tuple[int, str, str]:
    state = model.state_dict()
    names = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    values = hashlib.sha256()
    for key, value in state.items():
        if not key.endswith("pos_embed"):
            values.update(value.contiguous().numpy().tobytes())
    return len(state), hashlib.sha256(names.encode()).hexdigest()[:16], values.hexdigest()[:16]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_draws_the_weights_it_always_drew(method, tiny):
    torch.manual_seed(0)
    model = _model(tiny, method)
    after = torch.randint(0, 2**31, ()).item()
    assert (*_digests(model), after) == WEIGHTS[method]


def test_build_model_picks_the_class_of_the_method(tiny):
    assert [type(_model(tiny, m)) for m in METHODS] == [DSMAE, DSMAE, DSMAE, MAE]
    assert all(isinstance(_model(tiny, m), PretrainModel) for m in METHODS)
    with pytest.raises(TypeError, match="abstract"):
        PretrainModel(model_config("dsmae", **tiny))


def test_dsmae_refuses_to_build_mae(tiny):
    with pytest.raises(ValueError, match="build_model"):
        DSMAE(model_config("mae", **tiny))


def test_training_output_holds_the_losses_and_the_mask_only():
    assert [f.name for f in dataclasses.fields(PretrainOutput)] == [
        "loss", "loss_y", "loss_z", "mask"
    ]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_the_training_forward_computes_no_display_tensor(method, monkeypatch, tiny):
    def refuse(*args, **kwargs):
        raise AssertionError("a display tensor was computed")

    # the full-size DSMAE prediction and MAE's zeroed input: made for display only
    monkeypatch.setattr(dsmae.models.dsmae, "scatter_tokens", refuse)
    monkeypatch.setattr(dsmae.models.mae, "zero_patches", refuse)
    model = _model(tiny, method).train()
    images = torch.randn(2, 3, 16, 16)
    model(images, generator=_gen()).loss.backward()
    if model.decoder is not None:  # where they are asked for, they are computed
        with pytest.raises(AssertionError, match="display"):
            model.reconstruct(images, generator=_gen())


@pytest.mark.parametrize("method", METHODS)
def test_reconstruct_draws_as_the_forward_and_leaves_the_generator_alike(method, tiny):
    model = _model(tiny, method)
    images = torch.randn(2, 3, 16, 16)
    g1, g2 = _gen(5), _gen(5)
    out, shown = model(images, generator=g1), model.reconstruct(images, generator=g2)
    assert torch.equal(out.mask, shown.mask) and shown.student_input.shape == images.shape
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    if model.decoder is None:
        assert shown.pred is None
    else:
        assert shown.pred.shape == (2, 16, 48)


def test_a_given_corruption_is_used_as_given_and_a_missing_one_drawn(tiny):
    model = _model(tiny, "dsmae")
    images = torch.randn(2, 3, 16, 16)
    mask, eps = model.sample_corruption(2, _gen(2))
    given = model(images, mask=mask, eps=eps).loss
    assert torch.equal(model(images, _gen(9), mask=mask, eps=eps).loss, given)  # not asked
    assert torch.equal(model(images, _gen(2)).loss, given)  # the same draws, in the model
    noise = model.sample_noise(2, _gen(7), torch.device("cpu"))
    assert (
        noise.shape == images.shape and _model(tiny, "mae").sample_noise(2, _gen(7), None) is None
    )
    expected = model(images, mask=mask, eps=noise).loss
    assert torch.equal(model(images, _gen(7), mask=mask).loss, expected)  # the noise drawn


def test_pixel_loss_by_hand(tiny):
    model = _model(tiny, "dsmae-ly", norm_pix_loss=False)
    images = torch.zeros(1, 3, 16, 16)
    images[0, :, 4:8, 0:4] = 2.0  # patch 4 is all 2, every other patch 0
    pred = torch.ones(1, 2, 48)
    # patch 4: (1 - 2)^2 = 1 per value; patch 0: (1 - 0)^2 = 1; patch 4 twice
    assert model.pixel_loss(pred, images, torch.tensor([[4, 0]])).item() == 1.0
    assert model.pixel_loss(2 * pred, images, torch.tensor([[4, 4]])).item() == 0.0
    assert torch.equal(patchify(images, 4)[0, 4], torch.full((48,), 2.0))


@pytest.mark.parametrize("method", ["dsmae", "dsmae-ly", "dsmae-lz", "mae"])
def test_every_method_runs_under_bf16_autocast(method, tiny):
    """The GPU path: bf16 autocast (run here on the CPU), forward and backward."""
    model = build_model(model_config(method, **tiny))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 16, 16), generator=_gen())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.encoder.blocks.parameters())
