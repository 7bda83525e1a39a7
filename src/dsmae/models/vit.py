"""The encoder: a timm ``VisionTransformer`` with a fixed 2-D sin-cos position embedding,
and the timm parts the heads are built from.

The student encoder of every method IS a timm ``VisionTransformer`` (no classifier:
``num_classes=0``), so it can be taken out and used wherever timm models are used. Nothing
here forks it or calls its private methods: :func:`encode_visible` and :func:`patch_tokens`
use its public parts only.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from dsmae.config import ModelConfig
from dsmae.patches import gather_tokens


def sincos_pos_embed(grid: int, dim: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of a ``grid x grid`` patch grid, in timm's
    layout (``build_sincos2d_pos_embed``: [sin h, sin w, cos h, cos w] columns).

    MAE's table has the same frequencies in another column order ([sin w, cos w, sin h,
    cos h]): for training from scratch the two are equivalent (SPEC section 3), but
    weights trained with MAE's own table load one-to-one only after the same permutation
    of its columns.

    Args:
        grid: patches per side.
        dim: embedding width, a multiple of 4.
        cls_token: prepend a zero row for the [CLS] token.

    Returns:
        (1, [1 +] grid*grid, dim), rows in patch order (row-major).
    """
    emb = build_sincos2d_pos_embed([grid, grid], dim=dim)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb.unsqueeze(0)


def init_mae_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linear layers (the patch projection as one
    too), zero biases, unit LayerNorms. Apply with ``model.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):  # the patch embedding
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def transformer_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Sequential:
    """``depth`` pre-norm timm Blocks (fused SDPA attention) of width ``dim``:
    (B, T, dim) -> (B, T, dim)."""
    return nn.Sequential(
        *[Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
    )


def create_encoder(cfg: ModelConfig) -> VisionTransformer:
    """A timm ViT for ``cfg`` (resolved): [CLS] token, fixed sin-cos positions, final LayerNorm.

    The position embedding is a frozen parameter (``requires_grad=False``), so that the
    model's state dict is the one timm expects.
    """
    encoder = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=0,
        global_pool="token",
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        weight_init="skip",
    )
    grid = cfg.img_size // cfg.patch_size
    with torch.no_grad():
        encoder.pos_embed.copy_(sincos_pos_embed(grid, cfg.embed_dim, cls_token=True))
        nn.init.normal_(encoder.cls_token, std=0.02)
    encoder.pos_embed.requires_grad_(False)
    encoder.blocks.apply(init_mae_weights)
    encoder.patch_embed.apply(init_mae_weights)
    encoder.norm.apply(init_mae_weights)
    return encoder


def embed_patches(
    encoder: VisionTransformer, images: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The input of the blocks, in ``forward_features``' order: patch embedding, [CLS],
    position embedding, then (given ``keep``) only the kept patches, then ``norm_pre``.

    Args:
        encoder: a timm ViT as :func:`create_encoder` builds: one [CLS] token, whose
            position embedding row comes first.
        images: (B, C, H, W).
        keep: (B, V) int64 indices of the patches to keep; None: all N.

    Returns:
        (B, 1 + V, D): [CLS] then the kept patch tokens.
    """
    x = encoder.patch_embed(images)  # (B, N, D)
    cls = encoder.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
    x = encoder.pos_drop(torch.cat([cls, x], dim=1) + encoder.pos_embed)  # (B, 1 + N, D)
    if keep is not None:
        x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], keep)], dim=1)  # (B, 1 + V, D)
    return encoder.norm_pre(x)


def encode_visible(
    encoder: VisionTransformer, images: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Encode only some patches of each image (MAE's encoder): the others are dropped
    after the position embedding, before the blocks (:func:`embed_patches`).

    Built from the ViT's public parts, in ``forward_features``' order: with every patch
    kept (``keep`` = 0..N-1 on every row) it equals ``encoder.forward_features(images)``
    bit for bit. Gradient checkpointing of the blocks applies as there (when enabled and
    gradients are on).

    Args:
        encoder: a timm ViT as :func:`create_encoder` builds.
        images: (B, C, H, W).
        keep: (B, V) int64 indices of the patches to keep.

    Returns:
        (B, 1 + V, D): [CLS] then the kept patch tokens, after the final norm.
    """
    x = embed_patches(encoder, images, keep)
    if encoder.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(encoder.blocks, x)
    else:
        x = encoder.blocks(x)
    return encoder.norm(x)


def block_outputs(
    encoder: VisionTransformer, images: torch.Tensor, last: int, keep: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The outputs of the encoder's last ``last`` blocks, as they leave each block (the
    residual stream, before the final norm): a list of (B, 1 + V, D), the deepest last.

    Args:
        images: (B, C, H, W).
        last: how many blocks, from the top (1 to the depth).
        keep: (B, V) int64 indices of the patches to encode; None: all N (V = N).
    """
    x = embed_patches(encoder, images, keep)
    depth = len(encoder.blocks)
    outputs = []
    for i, block in enumerate(encoder.blocks):
        x = block(x)
        if i >= depth - last:
            outputs.append(x)
    return outputs


def patch_tokens(encoder: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """All patch tokens of ``images`` after the final norm: (B, C, H, W) -> (B, N, D)."""
    return encoder.forward_features(images)[:, encoder.num_prefix_tokens :]
