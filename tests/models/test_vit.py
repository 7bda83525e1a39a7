"""The encoder (``dsmae.models.vit``): timm's ViT with MAE's positions and init, and the
visible-token encoding built from its public parts."""

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from dsmae.config import model_config
from dsmae.models.vit import (
    create_encoder,
    encode_visible,
    init_mae_weights,
    patch_tokens,
    sincos_pos_embed,
    transformer_blocks,
)


def _encoder(tiny: dict) -> VisionTransformer:
    torch.manual_seed(0)
    return create_encoder(model_config("dsmae", **tiny))


def _no_private_pos_embed(encoder: VisionTransformer) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("encode_visible called timm's private _pos_embed")

    encoder._pos_embed = refuse


def test_sincos_positions_by_hand():
    # one patch: every angle is 0, so the sin half is 0 and the cos half is 1
    one = sincos_pos_embed(1, 8, cls_token=False)
    assert one.shape == (1, 1, 8)
    assert sorted(one.flatten().tolist()) == [0.0] * 4 + [1.0] * 4
    emb = sincos_pos_embed(4, 16, cls_token=True)
    assert emb.shape == (1, 1 + 16, 16)
    assert torch.equal(emb[0, 0], torch.zeros(16))  # [CLS] gets no position
    assert emb.abs().max() <= 1 and len({tuple(r.tolist()) for r in emb[0, 1:]}) == 16


def test_encoder_is_a_timm_vit_with_frozen_sincos_positions(tiny):
    encoder = _encoder(tiny)
    assert isinstance(encoder, VisionTransformer) and encoder.num_classes == 0
    assert not encoder.pos_embed.requires_grad
    assert torch.equal(encoder.pos_embed, sincos_pos_embed(4, 32, cls_token=True))
    assert encoder.num_prefix_tokens == 1 and len(encoder.blocks) == 2


def test_mae_init_xavier_linears_zero_biases_unit_norms():
    layers = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.LayerNorm(10))
    with torch.no_grad():
        for p in layers.parameters():
            p.fill_(7.0)
    layers.apply(init_mae_weights)
    bound = math.sqrt(6 / (6 + 10))  # xavier-uniform: U(-a, a), a = sqrt(6 / (in + out))
    assert layers[0].weight.abs().max() <= bound and layers[0].weight.std() > bound / 4
    assert torch.equal(layers[0].bias, torch.zeros(10))
    assert torch.equal(layers[1].weight, torch.ones(10))
    assert torch.equal(layers[1].bias, torch.zeros(10))


def test_transformer_blocks_keep_the_shape():
    blocks = transformer_blocks(16, 3, 2, 4.0)
    assert len(blocks) == 3 and blocks[0].mlp.fc1.out_features == 64
    assert blocks(torch.randn(2, 5, 16)).shape == (2, 5, 16)


@pytest.mark.parametrize("train", [True, False])
def test_encode_visible_with_every_patch_is_forward_features_bit_for_bit(train, tiny):
    encoder = _encoder(tiny).train(train)
    _no_private_pos_embed(encoder)
    images = torch.randn(3, 3, 16, 16)
    every = torch.arange(16).expand(3, -1)
    tokens = encode_visible(encoder, images, every)
    del encoder._pos_embed  # forward_features does use it
    assert torch.equal(tokens, encoder.forward_features(images))
    assert torch.equal(patch_tokens(encoder, images), tokens[:, 1:])


def test_encode_visible_feeds_the_blocks_exactly_the_kept_tokens(tiny):
    encoder = _encoder(tiny)
    images = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[0, 5, 15], [2, 3, 9]])
    seen = []
    encoder.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    encoder.forward_features(images)
    _no_private_pos_embed(encoder)
    tokens = encode_visible(encoder, images, keep)
    full, kept = seen
    assert tokens.shape == (2, 1 + 3, 32)
    assert torch.equal(kept[:, 0], full[:, 0])  # [CLS] with its position
    for b in range(2):  # each kept patch token, with its own position
        assert torch.equal(kept[b, 1:], full[b, 1 + keep[b]])


def test_encode_visible_under_grad_checkpointing_is_the_same(tiny):
    encoder = _encoder(tiny)
    images = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[1, 4, 6, 7], [0, 8, 12, 13]])
    plain = encode_visible(encoder, images, keep)
    plain.sum().backward()
    grad = encoder.blocks[0].attn.qkv.weight.grad.clone()
    encoder.zero_grad()
    encoder.set_grad_checkpointing(True)
    checkpointed = encode_visible(encoder, images, keep)
    checkpointed.sum().backward()
    assert torch.equal(plain, checkpointed)
    assert torch.allclose(encoder.blocks[0].attn.qkv.weight.grad, grad, rtol=0, atol=1e-6)
