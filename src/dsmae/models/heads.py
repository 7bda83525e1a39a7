"""The student's two heads: the pixel decoder (SPEC step 7) and the feature regressor (step 8)."""

from __future__ import annotations

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block
from torch import nn

from dsmae.models.vit import init_mae_weights, sincos_pos_embed


def transformer_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.Sequential:
    """``depth`` pre-norm timm Blocks (fused SDPA attention) of width ``dim``."""
    return nn.Sequential(
        *[Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
    )


class PixelDecoder(nn.Module):
    """Tokens -> pixels of their patches.

    ``Linear(in_dim, dim)``, plus the decoder's own fixed sin-cos position of each
    token's patch, then ``depth`` transformer blocks, LayerNorm and a linear head to
    ``out_dim = p*p*C`` values per token.

    DSMAE calls :meth:`forward` with the corrupted tokens only. MAE calls
    :meth:`forward_masked` with its visible tokens, which fills every other position
    with a learned mask token (created when ``mask_token=True``).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        grid: int,
        out_dim: int,
        mlp_ratio: float = 4.0,
        mask_token: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim, cls_token=False)[0], False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
        self.blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        self.apply(init_mae_weights)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decode a subset of tokens, each with its patch position.

        Args:
            tokens: (B, K, in_dim) encoder tokens.
            positions: (B, K) int64 patch indices of those tokens.

        Returns:
            (B, K, out_dim) predicted pixels.
        """
        x = self.embed(tokens) + self.pos_embed[positions]
        return self._decode(x)

    def forward_masked(self, latent: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """MAE's decoder: visible tokens in place, the mask token everywhere else.

        Args:
            latent: (B, 1 + V, in_dim) encoder output, [CLS] first.
            visible: (B, V) int64 patch indices of the visible tokens.

        Returns:
            (B, N, out_dim) predicted pixels for every patch.
        """
        if self.mask_token is None:
            raise RuntimeError("this decoder was built without a mask token")
        x = self.embed(latent)
        b, n, d = x.shape[0], self.pos_embed.shape[0], x.shape[-1]
        grid = self.mask_token.to(x.dtype).expand(b, n, d)  # x is bf16 under autocast
        grid = grid.scatter(1, visible.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], grid + self.pos_embed], dim=1)  # [CLS] has position 0
        return self._decode(x)[:, 1:]


class FeatureRegressor(nn.Module):
    """``depth`` transformer blocks and a LayerNorm at the encoder width, no head:
    predicts the teacher's tokens from the student's. (B, K, D) -> (B, K, D)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(dim)
        self.apply(init_mae_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(tokens))
