"""The feature regressor (``dsmae.models.regressor``)."""

import torch

from dsmae.models.regressor import FeatureRegressor


def test_regressor_maps_tokens_to_normalised_tokens_of_the_same_width():
    regressor = FeatureRegressor(dim=16, depth=2, num_heads=2)
    assert len(regressor.blocks) == 2 and regressor.blocks[0].mlp.fc1.out_features == 64
    out = regressor(torch.randn(3, 5, 16))
    assert out.shape == (3, 5, 16)
    # at initialisation the final LayerNorm is the identity affine: each token has mean 0
    # and (biased) variance 1 - eps
    assert torch.allclose(out.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-4)


def test_regressor_is_initialised_as_mae_and_trains():
    regressor = FeatureRegressor(dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
    assert regressor.blocks[0].mlp.fc1.out_features == 32
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in regressor.modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip
    regressor(torch.randn(2, 4, 16, requires_grad=True)).pow(2).sum().backward()
    assert all(p.grad is not None for p in regressor.parameters())
