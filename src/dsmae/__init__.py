"""dsmae: Denoising Self-Distillation Masked Autoencoder pre-training of Vision Transformers.

>>> import dsmae
>>> model = dsmae.build("dsmae", arch="vit_tiny", img_size=32, patch_size=2)
>>> out = model(images, generator=torch.Generator().manual_seed(0))
>>> out.loss.backward(); model.update_teacher(dsmae.momentum_at(step, total_steps))
>>> encoder = dsmae.load_encoder("runs/dsmae/last.pt")  # or an export folder: a timm ViT
"""

from __future__ import annotations

from typing import Any

from dsmae.config import ARCHS, METHODS, Config, ConfigError, ModelConfig, model_config
from dsmae.export import export_encoder, load_encoder
from dsmae.models import DSMAE, PretrainOutput
from dsmae.schedules import momentum_at

__version__ = "0.1.0"


def build(method: str = "dsmae", **options: Any) -> DSMAE:
    """Build a pre-training model.

    Args:
        method: "dsmae", "dsmae-ly", "dsmae-lz" or "mae".
        **options: any field of :class:`~dsmae.config.ModelConfig`, e.g. ``arch``,
            ``img_size``, ``patch_size``, ``in_chans``, ``noise_ratio``, ``lam``,
            ``noise_std``, ``noise_mode``, ``norm_pix_loss``, ``decoder_depth``,
            ``target_norm``, or custom ``depth``/``embed_dim``/``num_heads``.

    Raises:
        ConfigError: an unknown option or an impossible value, naming it.
    """
    return DSMAE(model_config(method, **options))


__all__ = [
    "ARCHS",
    "DSMAE",
    "METHODS",
    "Config",
    "ConfigError",
    "ModelConfig",
    "PretrainOutput",
    "__version__",
    "build",
    "export_encoder",
    "load_encoder",
    "momentum_at",
]
