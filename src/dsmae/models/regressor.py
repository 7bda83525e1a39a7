"""The feature regressor (SPEC step 8): predicts the teacher's tokens from the student's."""

from __future__ import annotations

import torch
from timm.layers import LayerNorm
from torch import nn

from dsmae.models.vit import init_mae_weights, transformer_blocks


class FeatureRegressor(nn.Module):
    """``depth`` transformer blocks and a LayerNorm at the encoder width, no head:
    predicts the teacher's tokens from the student's. (B, K, D) -> (B, K, D)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(dim)
        self.apply(init_mae_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, D) student tokens -> (B, K, D) predicted teacher tokens."""
        return self.norm(self.blocks(tokens))
