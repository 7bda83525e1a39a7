"""Taking the encoder away: export a checkpoint's encoder for timm, and load it back.

An export is a folder of two files, tensors and JSON only (nothing that runs code when
read):

``model.safetensors``
    the encoder's state dict, with timm's ``VisionTransformer`` key names;
``config.json``
    ``architecture`` (the timm model name), ``model_args`` (what to pass to
    ``timm.create_model`` besides it), ``mean``/``std`` (the normalisation the encoder
    was trained with), and where the weights came from (method, step, student/teacher).

It loads with timm alone, offline::

    cfg = json.load(open(f"{DIR}/config.json"))
    model = timm.create_model(
        cfg["architecture"], pretrained=True, num_classes=10,
        pretrained_cfg_overlay=dict(file=f"{DIR}/model.safetensors"), **cfg["model_args"],
    )
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import load_file, save
from timm.models.vision_transformer import VisionTransformer

from dsmae.checkpoint import Checkpoint, load_weights
from dsmae.config import Config, ConfigError, ModelConfig
from dsmae.writes import atomic_write_bytes, atomic_write_text, written

# our architectures as timm names (their depth, width and heads; see config.ARCHS)
TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def timm_model_args(m: ModelConfig) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that rebuild the encoder of ``m``
    (resolved) from its timm architecture name."""
    return {
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "embed_dim": m.embed_dim,
        "depth": m.depth,
        "num_heads": m.num_heads,
        "mlp_ratio": m.mlp_ratio,
        "qkv_bias": True,
        "global_pool": "token",
    }


def encoder_from_checkpoint(
    checkpoint: str | Path, *, random_init: bool = False, seed: int = 0, teacher: bool = False
) -> tuple[VisionTransformer, Config]:
    """The student encoder of a ``dsmae pretrain`` checkpoint (the EMA teacher with
    ``teacher``; the same architecture freshly initialised from ``seed`` with
    ``random_init``) and the checkpoint's config: :meth:`Checkpoint.encoder` of the file.

    Raises:
        CheckpointError: unreadable or unsafe file, no teacher in it, or weights that do
            not fit the architecture its config describes.
    """
    read = Checkpoint.read(checkpoint)
    return read.encoder(random_init=random_init, seed=seed, teacher=teacher), read.config


def export_encoder(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    teacher: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the encoder of ``checkpoint`` (a file, or one already read) to
    ``out/model.safetensors`` and ``out/config.json`` (see the module docstring), each
    atomically. Returns ``out``.

    Raises:
        ConfigError: ``out`` is a file, or a folder that is not empty (unless
            ``overwrite``).
        CheckpointError: see :meth:`Checkpoint.read` and :meth:`Checkpoint.encoder`.
        WriteError: a file could not be written (e.g. a full disk); nothing half-written
            is left.
    """
    out = Path(out)
    _check_export_folder(out, overwrite)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.read(checkpoint)
    encoder = checkpoint.encoder(teacher=teacher)
    with written("export", out):
        out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS_FILE, save(weights, metadata={"format": "pt"}), "export")
    config = export_config(checkpoint, teacher)
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n", "export")
    return out


def _check_export_folder(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder unless ``overwrite``.

    Raises:
        ConfigError: naming ``--out``.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder to write the export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {out} is not empty; pick another folder, or pass --overwrite to replace "
            "its model.safetensors and config.json"
        )


def export_config(checkpoint: Checkpoint, teacher: bool) -> dict[str, Any]:
    """The ``config.json`` of an export of ``checkpoint``'s student (or ``teacher``)."""
    cfg = checkpoint.config
    return {
        "architecture": TIMM_NAMES[cfg.model.arch],
        "model_args": timm_model_args(cfg.model),
        "mean": cfg.data.mean,
        "std": cfg.data.std,
        "method": cfg.model.method,
        "weights": "teacher" if teacher else "student",
        "step": int(checkpoint.state["step"]),
        "checkpoint": Path(checkpoint.path).name,
        "dsmae_version": version("dsmae"),
    }


def load_encoder(path: str | Path, num_classes: int = 0, **timm_kwargs: Any) -> VisionTransformer:
    """A timm ``VisionTransformer`` with the weights of an export folder (the model from
    ``timm.create_model``, the weights loaded strictly: a ``config.json`` that does not
    describe the stored weights is an error naming the missing and unexpected ones) or of
    a ``dsmae pretrain`` checkpoint file.

    Args:
        path: a folder written by :func:`export_encoder`, or a checkpoint.
        num_classes: size of a new (randomly initialised) classifier; 0: none, the model
            returns pooled features.
        timm_kwargs: further ``timm.create_model`` arguments (export folders only), e.g.
            ``drop_path_rate``.
    """
    path = Path(path)
    if path.is_dir():
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a dsmae export")
        config = json.loads(config_file.read_text())
        model = timm.create_model(
            config["architecture"],
            pretrained=False,
            num_classes=num_classes,
            **{**config["model_args"], **timm_kwargs},
        )
        weights = load_file(str(path / WEIGHTS_FILE))
        if num_classes:  # a new classifier: its weights are the model's own, fresh ones
            weights.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        load_weights(model, weights, f"{path} (export)")
        return model
    encoder, _ = encoder_from_checkpoint(path)
    if num_classes:
        encoder.reset_classifier(num_classes)
    return encoder
