"""MAE, the baseline (``dsmae.models.mae``): its parts, its encoder's view and its loss."""

import pytest
import torch

import dsmae
from dsmae.config import model_config
from dsmae.losses import normalize_patches
from dsmae.models import DSMAE, MAE, MaskedPixelDecoder, build_model
from dsmae.patches import patchify


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mae(tiny: dict, **options) -> MAE:
    return build_model(model_config("mae", **{**tiny, **options}))


def _selected(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, D) rows where mask is True -> (B, K, D), in patch order."""
    return x[mask].reshape(x.shape[0], -1, x.shape[-1])


def test_mae_has_a_mask_token_decoder_and_nothing_else(tiny):
    mae = _mae(tiny)
    assert isinstance(mae, MAE) and not isinstance(mae, DSMAE)
    assert isinstance(mae.decoder, MaskedPixelDecoder)
    assert mae.teacher is None and mae.regressor is None and mae.decoder.mask_token is not None
    assert mae.config.noise_ratio == 0.75 and mae.method == "mae"
    assert (mae.num_patches, mae.num_corrupted, mae.patch_size) == (16, 12, 4)
    images = torch.randn(2, 3, 16, 16)
    out = mae(images, generator=_gen())
    assert out.loss_z is None and torch.equal(out.loss, out.loss_y)
    before = [p.clone() for p in mae.parameters()]
    mae.update_teacher(0.5)  # no teacher: no-op
    assert all(torch.equal(a, b) for a, b in zip(before, mae.parameters()))


def test_mae_draws_a_mask_and_no_noise(tiny):
    mask, eps = _mae(tiny).sample_corruption(3, _gen())
    assert eps is None and mask.shape == (3, 16) and mask.sum(1).tolist() == [12, 12, 12]


def test_mae_encoder_sees_only_the_visible_tokens(tiny, tokens_seen):
    images = torch.randn(2, 3, 32, 32)
    mae = _mae(tiny, img_size=32, patch_size=2, noise_ratio=0.75, depth=1)
    assert tokens_seen(mae, images) == 1 + 64  # 1 + (1 - r) * N


def test_mae_student_input_zeroes_the_masked_patches(tiny):
    images = torch.randn(2, 3, 16, 16) + 5
    out = _mae(tiny).reconstruct(images, generator=_gen())
    zeroed = _selected(patchify(out.student_input, 4), out.mask)
    kept = _selected(patchify(out.student_input, 4), ~out.mask)
    assert zeroed.abs().sum() == 0
    assert torch.equal(kept, _selected(patchify(images, 4), ~out.mask))


def test_mae_loss_is_the_pixel_error_on_the_masked_patches_only(tiny):
    mae = _mae(tiny)  # norm_pix_loss on, as MAE's default
    images = torch.randn(2, 3, 16, 16)
    out = mae(images, generator=_gen(4))
    shown = mae.reconstruct(images, generator=_gen(4))
    assert torch.equal(shown.mask, out.mask) and shown.pred.shape == (2, 16, 48)
    target = normalize_patches(_selected(patchify(images, 4), out.mask))
    expected = ((_selected(shown.pred, out.mask) - target) ** 2).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-6)


def test_mae_ignores_a_given_noise_and_follows_a_given_mask(tiny):
    mae = _mae(tiny)
    images = torch.randn(2, 3, 16, 16)
    mask, _ = mae.sample_corruption(2, _gen(1))
    a = mae(images, mask=mask)
    b = mae(images, mask=mask, eps=torch.randn_like(images))
    assert torch.equal(a.mask, mask) and torch.equal(a.loss, b.loss)


def test_mae_refuses_masking_everything():
    with pytest.raises(dsmae.ConfigError, match="visible"):
        dsmae.build("mae", img_size=16, patch_size=4, noise_ratio=1.0)
