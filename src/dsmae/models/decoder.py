"""The pixel decoders: tokens -> the pixels of their patches (SPEC step 7; MAE's decoder)."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from timm.layers import LayerNorm
from torch import nn

from dsmae.config import ModelConfig
from dsmae.models.vit import init_mae_weights, sincos_pos_embed, transformer_blocks

_Decoder = TypeVar("_Decoder", bound="PixelDecoder")


class PixelDecoder(nn.Module):
    """DSMAE's decoder: the corrupted tokens -> the pixels of their patches.

    ``Linear(in_dim, dim)``, plus the decoder's own fixed sin-cos position of each
    token's patch, then ``depth`` transformer blocks, LayerNorm and a linear head to
    ``out_dim = p*p*C`` values per token. It has no mask token (``mask_token`` is None).
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
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim, cls_token=False)[0], False)
        self.mask_token: nn.Parameter | None = None
        self.blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        self.apply(init_mae_weights)

    @classmethod
    def from_config(cls: type[_Decoder], cfg: ModelConfig) -> _Decoder:
        """The decoder of a resolved model config: ``decoder_*`` width, depth and heads,
        one output per pixel value of a patch."""
        return cls(
            in_dim=cfg.embed_dim,
            dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            grid=cfg.img_size // cfg.patch_size,
            out_dim=cfg.patch_size**2 * cfg.in_chans,
            mlp_ratio=cfg.mlp_ratio,
        )

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks, norm and head on embedded, positioned tokens: (B, T, dim) -> (B, T, out_dim)."""
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
        return self.decode(x)


class MaskedPixelDecoder(PixelDecoder):
    """MAE's decoder: the encoder's visible tokens in place, a learned mask token at every
    other patch, and the [CLS] token in front; predicts the pixels of every patch.

    The same layers as :class:`PixelDecoder` plus ``mask_token`` (1, 1, dim), drawn
    (normal, std 0.02) after the layers are initialised.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments as :class:`PixelDecoder`'s."""
        super().__init__(*args, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed.out_features))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Decode every patch from the visible ones.

        Args:
            latent: (B, 1 + V, in_dim) encoder output, [CLS] first.
            visible: (B, V) int64 patch indices of the visible tokens.

        Returns:
            (B, N, out_dim) predicted pixels for every patch.
        """
        x = self.embed(latent)
        b, n, d = x.shape[0], self.pos_embed.shape[0], x.shape[-1]
        grid = self.mask_token.to(x.dtype).expand(b, n, d)  # x is bf16 under autocast
        grid = grid.scatter(1, visible.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        x = torch.cat([x[:, :1], grid + self.pos_embed], dim=1)  # [CLS] has position 0
        return self.decode(x)[:, 1:]
