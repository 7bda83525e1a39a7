"""The pixel decoders (``dsmae.models.decoder``): DSMAE's on the corrupted tokens, MAE's with
a mask token."""

import pytest
import torch

from dsmae.config import ModelConfig, model_config
from dsmae.models.decoder import MaskedPixelDecoder, PixelDecoder


@pytest.fixture
def cfg(tiny) -> ModelConfig:
    """The tiny ViT with a decoder of width 16 (2 heads): 16 patches, p*p*C = 48."""
    return model_config("dsmae", **tiny, decoder_dim=16, decoder_heads=2)


def _embedded_input(decoder: PixelDecoder, call) -> torch.Tensor:
    """What the decoder's first block gets during ``call()``."""
    seen = []
    handle = decoder.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    call()
    handle.remove()
    return seen[0]


def test_pixel_decoder_shapes_and_no_mask_token(cfg):
    decoder = PixelDecoder.from_config(cfg)
    assert decoder.mask_token is None and decoder.embed.out_features == 16
    assert "pos_embed" not in decoder.state_dict()  # fixed: not saved
    out = decoder(torch.randn(2, 5, 32), torch.tensor([[0, 1, 2, 3, 4], [15, 9, 8, 1, 0]]))
    assert out.shape == (2, 5, 48)


def test_pixel_decoder_adds_each_tokens_own_position(cfg):
    decoder = PixelDecoder.from_config(cfg)
    tokens, positions = torch.randn(1, 3, 32), torch.tensor([[2, 7, 11]])
    x = _embedded_input(decoder, lambda: decoder(tokens, positions))
    assert torch.equal(x, decoder.embed(tokens) + decoder.pos_embed[positions])
    # tokens and positions permuted together: the same predictions, permuted
    order = torch.tensor([2, 0, 1])
    a = decoder(tokens, positions)
    b = decoder(tokens[:, order], positions[:, order])
    assert torch.allclose(b, a[:, order], atol=1e-6)


def test_masked_decoder_puts_the_mask_token_where_no_token_is(cfg):
    decoder = MaskedPixelDecoder.from_config(cfg)
    latent, visible = torch.randn(1, 1 + 2, 32), torch.tensor([[3, 10]])
    out = decoder(latent, visible)
    assert out.shape == (1, 16, 48)  # every patch, [CLS] dropped
    x = _embedded_input(decoder, lambda: decoder(latent, visible))
    embedded = decoder.embed(latent)
    assert torch.equal(x[0, 0], embedded[0, 0])  # [CLS], no position
    for patch in range(16):
        row = (
            embedded[0, 1 + [3, 10].index(patch)] if patch in (3, 10) else decoder.mask_token[0, 0]
        )
        assert torch.equal(x[0, 1 + patch], row + decoder.pos_embed[patch]), patch


def test_mask_token_is_drawn_after_the_layers(cfg):
    torch.manual_seed(0)
    plain = PixelDecoder.from_config(cfg)
    expected = torch.empty(1, 1, 16).normal_(std=0.02)  # the next draw
    torch.manual_seed(0)
    masked = MaskedPixelDecoder.from_config(cfg)
    assert torch.equal(masked.mask_token, expected)
    for name, value in plain.state_dict().items():  # the layers: the same draws
        assert torch.equal(masked.state_dict()[name], value), name
    assert list(masked.state_dict()) == ["mask_token", *plain.state_dict()]  # as ever
