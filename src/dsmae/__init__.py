"""dsmae: Denoising Self-Distillation Masked Autoencoder pre-training of Vision Transformers.

>>> import dsmae
>>> model = dsmae.build("dsmae", arch="vit_tiny", img_size=32, patch_size=2)
>>> out = model(images, generator=torch.Generator().manual_seed(0))
>>> out.loss.backward(); model.update_teacher(dsmae.momentum_at(step, total_steps))
>>> encoder = dsmae.load_encoder("runs/dsmae/last.pt")  # or an export folder: a timm ViT
>>> feats = dsmae.extract_features("runs/dsmae/last.pt", "photos/")  # (N, D), as in training
>>> dsmae.pretrain(dsmae.build_config("quickstart"))  # what ``dsmae pretrain`` runs

The names below are imported on first use (PEP 562), so that ``import dsmae`` (and the
``dsmae`` command's ``--help``) does not wait for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsmae import pretrain
    from dsmae.config import ARCHS, METHODS, Config, ConfigError, ModelConfig, build_config
    from dsmae.export import export_encoder, load_encoder
    from dsmae.features import extract_features
    from dsmae.models import DSMAE, MAE, PretrainModel, PretrainOutput
    from dsmae.schedules import momentum_at

__version__ = "0.1.0"

# public name -> the module it comes from
_LAZY = {
    "ARCHS": "dsmae.config",
    "METHODS": "dsmae.config",
    "Config": "dsmae.config",
    "ConfigError": "dsmae.config",
    "ModelConfig": "dsmae.config",
    "export_encoder": "dsmae.export",
    "load_encoder": "dsmae.export",
    "extract_features": "dsmae.features",
    "DSMAE": "dsmae.models",
    "MAE": "dsmae.models",
    "PretrainModel": "dsmae.models",
    "PretrainOutput": "dsmae.models",
    "momentum_at": "dsmae.schedules",
    "build_config": "dsmae.config",
}
_PACKAGES = ("pretrain",)  # public subpackages, imported on first use too


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (then it is an attribute)."""
    if name in _PACKAGES:
        return importlib.import_module(f"{__name__}.{name}")  # also sets the attribute
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_PACKAGES})


def build(method: str = "dsmae", **options: Any) -> PretrainModel:
    """Build a pre-training model: a :class:`~dsmae.models.DSMAE` (dsmae, dsmae-ly,
    dsmae-lz) or a :class:`~dsmae.models.MAE`.

    Args:
        method: "dsmae", "dsmae-ly", "dsmae-lz" or "mae".
        **options: any field of :class:`~dsmae.config.ModelConfig`, e.g. ``arch``,
            ``img_size``, ``patch_size``, ``in_chans``, ``noise_ratio``, ``lam``,
            ``noise_std``, ``noise_mode``, ``norm_pix_loss``, ``decoder_depth``,
            ``target_norm``, or custom ``depth``/``embed_dim``/``num_heads``.

    Raises:
        ConfigError: an unknown option or an impossible value, naming it.
    """
    from dsmae.config import model_config
    from dsmae.models import build_model

    return build_model(model_config(method, **options))


__all__ = [
    "ARCHS",
    "DSMAE",
    "MAE",
    "METHODS",
    "Config",
    "ConfigError",
    "ModelConfig",
    "PretrainModel",
    "PretrainOutput",
    "__version__",
    "build",
    "build_config",
    "export_encoder",
    "extract_features",
    "load_encoder",
    "momentum_at",
    "pretrain",
]
