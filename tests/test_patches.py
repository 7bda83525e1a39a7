import pytest
import torch

from dsmae.patches import gather_tokens, grid_size, patchify, scatter_tokens, unpatchify


def test_patchify_by_hand():
    # one 2-channel 4x4 image, patch 2: patch 1 is the top-right 2x2 block
    img = torch.arange(32.0).reshape(1, 2, 4, 4)
    patches = patchify(img, 2)
    assert patches.shape == (1, 4, 2 * 2 * 2)
    # pixels in (row, col, channel) order
    expected = torch.tensor([2.0, 18.0, 3.0, 19.0, 6.0, 22.0, 7.0, 23.0])
    assert torch.equal(patches[0, 1], expected)


def test_patch_order_matches_timm_patch_embed():
    # a conv patch embedding with identity-like weights reproduces patchify's order
    from timm.layers import PatchEmbed

    embed = PatchEmbed(img_size=8, patch_size=2, in_chans=1, embed_dim=4)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.eye(4).reshape(4, 1, 2, 2))
        embed.proj.bias.zero_()
    img = torch.randn(2, 1, 8, 8)
    assert torch.allclose(embed(img), patchify(img, 2), atol=1e-6)


@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 2), ((1, 3, 96, 96), 6), ((3, 1, 16, 16), 4)])
def test_round_trip(shape, p):
    img = torch.randn(shape)
    assert torch.equal(unpatchify(patchify(img, p), p, shape[1]), img)


def test_indivisible_size_is_an_error():
    with pytest.raises(ValueError, match="does not divide"):
        grid_size(32, 3)


def test_gather_and_scatter():
    tokens = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)
    idx = torch.tensor([[0, 3], [4, 1]])
    picked = gather_tokens(tokens, idx)
    assert torch.equal(picked[1, 0], tokens[1, 4]) and torch.equal(picked[0, 1], tokens[0, 3])
    back = scatter_tokens(picked, idx, 5)
    assert torch.equal(back[0, 3], tokens[0, 3]) and torch.equal(back[0, 1], torch.zeros(3))
