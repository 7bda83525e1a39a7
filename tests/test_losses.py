import math

import pytest
import torch

from dsmae.losses import (
    block_average_target,
    combine_losses,
    feature_loss,
    normalize_patches,
    pixel_loss,
)


def test_normalize_patches_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # mean 2.5; unbiased variance (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / (4 - 1) = 5/3, as MAE's
    expected = (x - 2.5) / math.sqrt(5 / 3 + 1e-6)
    assert torch.allclose(normalize_patches(x), expected)
    out = normalize_patches(torch.randn(5, 7, 12) * 3 + 2)
    assert torch.allclose(out.mean(-1), torch.zeros(5, 7), atol=1e-5)
    assert torch.allclose(out.var(-1), torch.ones(5, 7), atol=1e-4)  # unit unbiased variance


def test_pixel_target_is_maes_norm_pix_loss():
    """MAE's ``forward_loss``: ``(target - mean) / (var + 1e-6) ** 0.5`` with
    ``target.var(dim=-1, keepdim=True)``, i.e. torch's unbiased variance."""
    patches = torch.rand(2, 5, 12) * 4 - 1
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=True, keepdim=True)
    assert torch.allclose(normalize_patches(patches), (patches - mean) / (var + 1e-6) ** 0.5)


def test_pixel_loss_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # (B=1, K=2, P=2)
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    # squared errors: [0, 4] and [1, 1] -> mean 1.5
    assert pixel_loss(pred, target, norm_pix=False).item() == pytest.approx(1.5)
    # normalised target (unbiased variance): patch [1, 0] has mean 0.5 and variance
    # 0.5 -> [1/sqrt(2), -1/sqrt(2)]; patch [1, 1] -> [0, 0]
    # errors: [(1 - 1/sqrt(2))^2, (2 + 1/sqrt(2))^2] and [0, 0] -> their sum / 4
    r = 1 / math.sqrt(2)
    expected = ((1 - r) ** 2 + (2 + r) ** 2) / 4
    assert pixel_loss(pred, target, norm_pix=True).item() == pytest.approx(expected, rel=1e-5)


def test_feature_loss_is_one_minus_cosine_per_token():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 2.0], [3.0, 3.0]]])
    # token 0: cos 0 -> 1; token 1: cos 1 -> 0; mean 0.5
    assert feature_loss(pred, target).item() == pytest.approx(0.5)


def test_feature_loss_stops_the_gradient_to_the_target():
    pred = torch.randn(2, 3, 8, requires_grad=True)
    target = torch.randn(2, 3, 8, requires_grad=True)
    feature_loss(pred, target).backward()
    assert pred.grad is not None and target.grad is None


def test_feature_loss_layernorm_target():
    pred = torch.randn(2, 3, 8)
    target = torch.randn(2, 3, 8) * 5 + 3
    normed = (target - target.mean(-1, keepdim=True)) / torch.sqrt(
        target.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    expected = (1 - torch.nn.functional.cosine_similarity(pred, normed, dim=-1)).mean()
    assert feature_loss(pred, target, target_norm="layernorm").item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_combine():
    ly, lz = torch.tensor(2.0), torch.tensor(1.0)
    assert combine_losses(ly, lz, 0.6).item() == pytest.approx(0.6 * 2 + 0.4 * 1)
    assert combine_losses(ly, None, 0.6) is ly
    assert combine_losses(None, lz, 0.6) is lz
    with pytest.raises(ValueError):
        combine_losses(None, None, 0.5)


def test_block_average_target_by_hand():
    """data2vec's vision target: the mean of the blocks, then a layer norm without affine
    over the features of each token."""
    a = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])  # (1, 1, 4)
    b = torch.tensor([[[3.0, 2.0, 1.0, 2.0]]])
    # mean [2, 2, 2, 4]: its own mean 2.5, population variance (3 * 0.25 + 2.25) / 4 = 0.75
    want = torch.tensor([[[-0.5, -0.5, -0.5, 1.5]]]) / math.sqrt(0.75 + 1e-5)
    torch.testing.assert_close(block_average_target([a, b]), want)
    # one block: only its layer norm
    torch.testing.assert_close(block_average_target([b]), (b - 2.0) / math.sqrt(0.5 + 1e-5))
    with pytest.raises(ValueError, match="at least one block"):
        block_average_target([])
