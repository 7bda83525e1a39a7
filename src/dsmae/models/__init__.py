"""Models: the timm ViT encoder, the student's heads and the pre-training module."""

from dsmae.models.dsmae import DSMAE, PretrainOutput
from dsmae.models.heads import FeatureRegressor, PixelDecoder
from dsmae.models.vit import create_encoder, encode_visible, patch_tokens

__all__ = [
    "DSMAE",
    "FeatureRegressor",
    "PixelDecoder",
    "PretrainOutput",
    "create_encoder",
    "encode_visible",
    "patch_tokens",
]
