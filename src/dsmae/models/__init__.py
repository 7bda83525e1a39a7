"""Models: the timm ViT encoder, the student's heads and the pre-training modules."""

from dsmae.config import METHOD_TRAITS, ModelConfig
from dsmae.models.decoder import MaskedPixelDecoder, PixelDecoder
from dsmae.models.dsmae import DSMAE
from dsmae.models.mae import MAE
from dsmae.models.pretrain import DisplayOutput, PretrainModel, PretrainOutput
from dsmae.models.regressor import FeatureRegressor
from dsmae.models.vit import create_encoder, encode_visible, patch_tokens


def build_model(cfg: ModelConfig) -> PretrainModel:
    """The pre-training model of a resolved config: :class:`MAE` for the method that
    drops the masked patches (``mae``), else :class:`DSMAE` (dsmae, dsmae-ly, dsmae-lz)."""
    return MAE(cfg) if METHOD_TRAITS[cfg.method].drops_patches else DSMAE(cfg)


__all__ = [
    "DSMAE",
    "MAE",
    "DisplayOutput",
    "FeatureRegressor",
    "MaskedPixelDecoder",
    "PixelDecoder",
    "PretrainModel",
    "PretrainOutput",
    "build_model",
    "create_encoder",
    "encode_visible",
    "patch_tokens",
]
